"""Composition descriptors of the charged formula, for the baselines and the GP heads.

The features are matminer's (the field's maintained library): Magpie elemental-property
statistics (132 columns), valence-orbital occupations (8) and stoichiometric p-norms (6), with
missing elemental data kept as NaN. They are computed here with numpy from matminer's own
elemental table, shipped as ``data/composition_table.json`` (``scripts/make_composition_table.py``
writes it from the installed matminer): importing matminer's featurisers pulls in scikit-learn,
pandas and scipy.stats, seconds that a served model's cold start (the command line, a new worker)
should not pay for a few weighted statistics. Each statistic below repeats matminer's operation
for operation (``matminer.featurizers.utils.stats.PropertyStats``, ``ValenceOrbital``,
``Stoichiometry``), so the numbers are identical, not just close:
``tests/voltage_model/test_descriptors.py`` compares both on many formulas and checks the table
against the installed matminer.

Featurising ~2000 formulas still takes a moment, so `featurize_cached` keeps a compressed
``.npz`` keyed by formula that every pipeline stage can share. The cache holds only plain
numeric/unicode arrays and is read with ``allow_pickle=False``: a cache file is data, never code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Composition

# Bump when the featuriser set or its settings change, so stale caches are recomputed.
FEATURE_VERSION = "magpie+valence+stoich/v1"

MAGPIE_PREFIX = "MagpieData "
MAGPIE_STATS = ("minimum", "maximum", "range", "mean", "avg_dev", "mode")
#: matminer's elemental data and labels (scripts/make_composition_table.py).
TABLE_PATH = Path(__file__).resolve().parent / "data" / "composition_table.json"


@cache
def _table() -> dict[str, Any]:
    """The shipped elemental table, read once."""
    return json.loads(TABLE_PATH.read_text())


def feature_names() -> list[str]:
    """Column names of `composition_features`, in order (matminer's own labels)."""
    t = _table()
    return t["magpie"]["labels"] + t["valence"]["labels"] + t["stoichiometry"]["labels"]


def feature_group(name: str) -> str:
    """The underlying quantity a feature column summarises.

    Magpie columns are ``"MagpieData <stat> <Property>"`` -> ``<Property>`` (e.g.
    ``"CovalentRadius"``), so importances can be totalled per elemental property; valence-orbital
    and stoichiometry columns form one group each.
    """
    if name.startswith(MAGPIE_PREFIX):
        stat, _, prop = name[len(MAGPIE_PREFIX) :].partition(" ")
        if stat in MAGPIE_STATS and prop:
            return prop
    if "valence electrons" in name:
        return "ValenceOrbital"
    if name.endswith("-norm"):
        return "Stoichiometry"
    return name


# matminer's PropertyStats, operation for operation (weights are element amounts).
def _minimum(data: list[float], weights: Sequence[float]) -> float:
    return min(data) if not np.any(np.isnan(data)) else float("nan")


def _maximum(data: list[float], weights: Sequence[float]) -> float:
    return max(data) if not np.any(np.isnan(data)) else float("nan")


def _range(data: list[float], weights: Sequence[float]) -> float:
    return (max(data) - min(data)) if not np.any(np.isnan(data)) else float("nan")


def _mean(data: list[float], weights: Sequence[float]) -> float:
    return np.average(data, weights=weights)


def _avg_dev(data: list[float], weights: Sequence[float]) -> float:
    return np.average(np.abs(np.subtract(data, _mean(data, weights))), weights=weights)


def _mode(data: list[float], weights: Sequence[float]) -> float:
    """The value of the most abundant element; the smallest among equally abundant ones."""
    w = np.array(weights)
    return np.array(data)[np.isclose(w, w.max())].min()


_STATS: dict[str, Callable[[list[float], Sequence[float]], float]] = {
    "minimum": _minimum,
    "maximum": _maximum,
    "range": _range,
    "mean": _mean,
    "avg_dev": _avg_dev,
    "mode": _mode,
}


def _magpie(elements: Sequence[str], amounts: Sequence[float]) -> list[float]:
    t = _table()["magpie"]
    out = []
    for prop in t["properties"]:
        data = [t["values"][prop][el] for el in elements]
        out.extend(_STATS[stat](data, amounts) for stat in t["stats"])
    return out


def _valence(elements: Sequence[str], amounts: Sequence[float]) -> list[float]:
    t = _table()["valence"]

    def avg(prop: str) -> float:
        return _mean([t["values"][prop][el] for el in elements], amounts)

    parts = {"avg": [avg(f"N{orb}Valence") for orb in t["orbitals"]]}
    total = avg("NValence")
    parts["frac"] = [a / total for a in parts["avg"]]
    return [v for prop in t["props"] for v in parts[prop]]


def _stoichiometry(comp: Composition) -> list[float]:
    el_amt = comp.get_el_amt_dict()
    n_atoms = sum(el_amt.values())
    norms: list[float] = []
    for p in _table()["stoichiometry"]["p_list"]:
        if p == 0:
            norms.append(len(el_amt.values()))
            continue
        acc = 0.0
        for amount in el_amt.values():
            acc += (amount / n_atoms) ** p
        norms.append(acc ** (1.0 / p))
    return norms


def _featurize_one(formula: str) -> list[float]:
    """All descriptors of one formula.

    A formula that does not parse, or names an unknown element (pymatgen accepts those as
    dummy species), raises ValueError: a silent NaN row would hide a data bug.
    """
    comp = Composition(formula)
    if not comp.valid or comp.num_atoms <= 0:
        raise ValueError(f"not a composition of real elements: {formula!r}")
    items = list(comp.element_composition.items())
    elements = [el.symbol for el, _ in items]
    amounts = [amount for _, amount in items]
    row = _magpie(elements, amounts) + _valence(elements, amounts) + _stoichiometry(comp)
    return [float(v) for v in row]


def composition_features(formulas: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Descriptor matrix (len(formulas), n_features) float64 and its column names.

    Duplicate formulas are featurised once: the electrode table repeats charged formulas.
    """
    names = feature_names()
    unique = list(dict.fromkeys(formulas))
    rows = {formula: _featurize_one(formula) for formula in unique}
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    return X, names


def _load_cache(cache_path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Formula -> feature row from an existing cache; empty when missing or stale."""
    if not cache_path.exists():
        return {}
    with np.load(cache_path, allow_pickle=False) as npz:
        if str(npz["version"]) != FEATURE_VERSION or npz["names"].tolist() != names:
            return {}
        return dict(zip(npz["formulas"].tolist(), npz["X"], strict=True))


def _save_cache(cache_path: Path, rows: dict[str, np.ndarray], names: list[str]) -> None:
    """Write the cache atomically so a concurrent or interrupted stage never sees half a file."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    formulas = sorted(rows)
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                version=np.array(FEATURE_VERSION),
                names=np.array(names, dtype=str),
                formulas=np.array(formulas, dtype=str),
                X=X,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared by stages and users
        os.replace(tmp, cache_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def featurize_cached(formulas: Sequence[str], cache_path: Path) -> tuple[np.ndarray, list[str]]:
    """`composition_features` backed by an ``.npz`` cache keyed by formula.

    Only formulas absent from the cache are featurised; the cache is rewritten only when it
    grew, so a stage that finds everything cached does no featurisation and no write.
    """
    cache_path = Path(cache_path)
    names = feature_names()
    rows = _load_cache(cache_path, names)
    missing = [f for f in dict.fromkeys(formulas) if f not in rows]
    if missing:
        X_new, _ = composition_features(missing)
        rows.update(zip(missing, X_new, strict=True))
        _save_cache(cache_path, rows, names)
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    return X, names
