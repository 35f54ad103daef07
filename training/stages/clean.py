"""Stage ``clean``: the per-ion k-sigma outlier rule, its thresholds fitted on training rows."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.config import Params, load_params
from training.data.clean import clean_records
from training.data.records import read_records, write_records
from training.data.split import load_splits, write_splits


@dataclass(frozen=True)
class Options:
    records: Path
    splits_all: Path
    out: Path
    splits_out: Path
    report: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict:
    return run_clean(load_params(opts.params), opts.records, opts.splits_all, opts.out,
                     opts.splits_out, opts.report)  # fmt: skip


def run_clean(
    params: Params, records_path: Path, splits_all: Path, out: Path, splits_out: Path,
    report_path: Path,
) -> dict:  # fmt: skip
    """The k-sigma rule with thresholds from each ion's training rows, applied to every split;
    writes the kept records and the split file restricted to them (what every model reads)."""
    records = read_records(records_path)
    splits = load_splits(splits_all)
    train_ids = {b for parts in splits.values() for b in parts["train"]}
    k_by_ion = {ion: s.clean_k for ion, s in params.ions.items()}
    kept, stats = clean_records(records, k_by_ion, fit_ids=train_ids)
    write_records(out, kept)
    kept_ids = {r.battery_id for r in kept}
    cleaned = {ion: {s: [b for b in ids if b in kept_ids] for s, ids in parts.items()}
               for ion, parts in splits.items()}  # fmt: skip
    write_splits(splits_out, cleaned, params.split.seed)
    report = {
        ion: {**st.as_dict(), "fit_on": "train",
              "removed_by_split": {s: len(splits[ion][s]) - len(cleaned[ion][s])
                                   for s in splits.get(ion, {})}}
        for ion, st in stats.items()
    }  # fmt: skip
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
