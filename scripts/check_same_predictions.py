"""Same predictions before and after a refactor: the served answers on test-split crystals.

For every ion in params.yaml this loads the pretrained release model the way the service does
(``serving.models.load_release_model``) and predicts the first ``--max-per-ion`` crystals of the
ion's test split (``data/splits.json``) twice:

* ``record``: from the structure stored in the clean records (``data/clean/records.jsonl.gz``);
* ``cif``: from the crystal's CIF in the snapshot (``params.yaml`` ``data.snapshot_dir``), parsed
  the way a request is (``serving.inputs.to_structure``: the fast P1 path, else pymatgen).

It also computes the local voltages of ``explain`` where the ion's sidecar head
(``models/local_voltage/<Ion>.json``) fits the release model. Everything is written to ``--out``
(JSON); with ``--compare OTHER.json`` it exits 1 when any voltage, std or local voltage differs
from OTHER's by more than ``--tol`` (1e-6 V), or when the two files do not hold the same crystals.

Written for issue 18 (the ``voltage_model`` package): run it with ``--out before.json`` before a
change to the served code, then ``--out after.json --compare before.json`` after it.

    python scripts/check_same_predictions.py --out /tmp/preds_before.json
    python scripts/check_same_predictions.py --out /tmp/preds_after.json \
        --compare /tmp/preds_before.json
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARBALLS = ("cifs_r.tar.gz", "cifs_f_supplement.tar.gz")
MAX_SITES = 10_000


def _test_records(records: Path, splits: Path, ion: str, n: int) -> list[dict[str, Any]]:
    ids = json.loads(splits.read_text())["ions"][ion]["test"][:n]
    wanted = set(ids)
    by_id = {}
    with gzip.open(records, "rt") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                if row["working_ion"] == ion and row["battery_id"] in wanted:
                    by_id[row["battery_id"]] = row
    missing = wanted - set(by_id)
    if missing:
        raise SystemExit(f"{ion}: {len(missing)} test ids missing from {records}")
    return [by_id[b] for b in ids]


def _cif_texts(snapshot: Path, battery_ids: set[str]) -> dict[str, str]:
    """battery_id -> its charged CIF text, read from the snapshot's tarballs."""
    with (snapshot / "electrodes.csv").open(newline="") as fh:
        member = {r["battery_id"]: r["charged_cif"].strip() for r in csv.DictReader(fh)
                  if r["battery_id"] in battery_ids}  # fmt: skip
    wanted = set(member.values())
    texts: dict[str, str] = {}
    for name in TARBALLS:
        path = snapshot / name
        if not path.is_file():
            continue
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                key = m.name.removeprefix("./")
                if m.isfile() and key in wanted:
                    fh = tar.extractfile(m)
                    if fh is not None:
                        texts[key] = fh.read().decode("utf-8", errors="replace")
    return {b: texts[rel] for b, rel in member.items() if rel in texts}


def _local_voltages(served: Any, structure: Any, heads_dir: Path) -> list[float] | str:
    from serving.local_heads import sidecar_head
    from voltage_model.local_voltage import explain_graph

    try:
        head = sidecar_head(heads_dir, served)
    except (OSError, ValueError) as exc:
        return f"no head: {exc}"
    graph = served.model.prepare(structure)
    sites = explain_graph(served.model, structure, graph, head)
    return [float(site["local_voltage"]) for site in sites]


def predict_all(args: argparse.Namespace) -> dict[str, Any]:
    from pymatgen.core import Structure

    from serving.inputs import to_structure
    from serving.models import load_release_model

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    snapshot = (ROOT / params["data"]["snapshot_dir"]).resolve()
    out: dict[str, Any] = {"max_per_ion": args.max_per_ion, "ions": {}}
    for ion in params["ions"]:
        t0 = time.perf_counter()
        served = load_release_model(ion, args.release)
        rows = _test_records(args.records, args.splits, ion, args.max_per_ion)
        cifs = _cif_texts(snapshot, {r["battery_id"] for r in rows})
        from_records = [Structure.from_dict(r["charged_structure"]) for r in rows]
        preds = served.model.predict(from_records)
        entries = {}
        for row, p in zip(rows, preds, strict=True):
            entry: dict[str, Any] = {"record": [p.voltage, p.uncertainty]}
            text = cifs.get(row["battery_id"])
            if text is not None:
                parsed = to_structure(text, "cif", MAX_SITES)
                q = served.model.predict([parsed])[0]
                entry["cif"] = [q.voltage, q.uncertainty]
                if args.heads is not None:
                    entry["local"] = _local_voltages(served, parsed, args.heads)
            entries[row["battery_id"]] = entry
        out["ions"][ion] = {"model": f"{served.name} v{served.version} ({served.source})",
                            "crystals": entries}  # fmt: skip
        n_cif = sum("cif" in e for e in entries.values())
        print(f"{ion}: {len(entries)} crystals ({n_cif} from CIF) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
    return out


def _diffs(a: Any, b: Any) -> list[float]:
    """|a - b| of every number, pairwise; inf when the shapes or kinds differ."""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [float("inf")]
        return [d for x, y in zip(a, b, strict=True) for d in _diffs(x, y)]
    if isinstance(a, int | float) and isinstance(b, int | float):
        return [abs(float(a) - float(b))]
    return [0.0] if a == b else [float("inf")]


def compare(new: dict[str, Any], old: dict[str, Any], tol: float) -> list[str]:
    problems = []
    worst = {"record": 0.0, "cif": 0.0, "local": 0.0}
    if set(new["ions"]) != set(old["ions"]):
        problems.append(f"ions differ: {sorted(new['ions'])} vs {sorted(old['ions'])}")
    for ion in sorted(set(new["ions"]) & set(old["ions"])):
        a, b = new["ions"][ion]["crystals"], old["ions"][ion]["crystals"]
        if set(a) != set(b):
            problems.append(f"{ion}: the crystals differ")
        for bid in sorted(set(a) & set(b)):
            for key in ("record", "cif", "local"):
                if (key in a[bid]) != (key in b[bid]):
                    problems.append(f"{ion} {bid}: {key} present in one file only")
                    continue
                if key not in a[bid]:
                    continue
                d = max(_diffs(a[bid][key], b[bid][key]), default=0.0)
                worst[key] = max(worst[key], d)
                if d > tol:
                    problems.append(f"{ion} {bid} {key}: differs by {d:.3g} (> {tol:g})")
    print("max |difference|: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, default=None)
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--max-per-ion", type=int, default=24)
    ap.add_argument("--release", type=Path, default=ROOT / "release")
    ap.add_argument("--records", type=Path, default=ROOT / "data/clean/records.jsonl.gz")
    ap.add_argument("--splits", type=Path, default=ROOT / "data/splits.json")
    ap.add_argument("--heads", type=Path, default=ROOT / "models/local_voltage",
                    help="folder of local-voltage sidecar heads (explain)")  # fmt: skip
    args = ap.parse_args(argv)
    result = predict_all(args)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.compare is None:
        return 0
    problems = compare(result, json.loads(args.compare.read_text()), args.tol)
    for p in problems[:50]:
        print(p)
    if problems:
        print(f"FAIL: {len(problems)} differences above {args.tol:g}")
        return 1
    print(f"OK: same predictions as {args.compare} (within {args.tol:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
