"""Write ``voltage_model/data/composition_table.json``: the elemental data and column names of
the composition descriptors, taken from matminer (the field's maintained source).

Why a table: matminer's featurisers import scikit-learn, pandas and scipy.stats (seconds) for
what is, per formula, a handful of weighted statistics over 22 elemental properties. The served
model and the command line compute the same numbers from this table with numpy
(``voltage_model.composition``); ``tests/voltage_model/test_descriptors.py`` checks that the shipped
table is what the installed matminer holds and that the numbers equal matminer's, so an upgrade that
changes either is caught. Run after upgrading matminer::

    .venv/bin/python scripts/make_composition_table.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TABLE = Path(__file__).resolve().parents[1] / "voltage_model" / "data" / "composition_table.json"


def build_table() -> dict[str, Any]:
    """The featurisers' settings, labels and per-element values, as matminer has them."""
    from matminer.featurizers.composition import ElementProperty, Stoichiometry, ValenceOrbital

    magpie = ElementProperty.from_preset("magpie", impute_nan=False)
    valence = ValenceOrbital(impute_nan=False)
    stoich = Stoichiometry()
    valence_props = [f"N{o}Valence" for o in valence.orbitals] + ["NValence"]

    def values(source: Any, props: list[str]) -> dict[str, dict[str, float]]:
        return {p: {el: float(v) for el, v in source.all_elemental_props[p].items()} for p in props}

    return {
        "source": "matminer " + __import__("matminer").__version__,
        "magpie": {
            "properties": list(magpie.features),
            "stats": list(magpie.stats),
            "labels": magpie.feature_labels(),
            "values": values(magpie.data_source, list(magpie.features)),
        },
        "valence": {
            "orbitals": list(valence.orbitals),
            "props": list(valence.props),
            "labels": valence.feature_labels(),
            "values": values(valence.data_source, valence_props),
        },
        "stoichiometry": {
            "p_list": list(stoich.p_list),
            "num_atoms": bool(stoich.num_atoms),
            "labels": stoich.feature_labels(),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=TABLE)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # NaN (missing elemental data) is kept: JSON's NaN literal, read back by json.loads.
    args.out.write_text(json.dumps(build_table(), indent=0, sort_keys=False) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
