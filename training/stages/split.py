"""Stage ``split``: the seeded per-ion split of every ingested row, grouped by host across ions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.config import Params, load_params
from training.data.records import read_records
from training.data.split import leakage, make_splits, write_splits


@dataclass(frozen=True)
class Options:
    records: Path
    out: Path
    report: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict:
    return run_split(load_params(opts.params), opts.records, opts.out, opts.report)


def run_split(params: Params, records_path: Path, out: Path, report_path: Path) -> dict:
    """Split every ingested row (before cleaning: the cleaning rule is fitted on training rows)."""
    records = read_records(records_path)
    splits = make_splits(records, params.split.fractions(), params.split.seed)
    leaked = leakage(records, splits)
    if leaked:  # cannot happen by construction; refuse to write a leaking split if it ever does
        raise RuntimeError(f"split leaks {len(leaked)} hosts between train and val/test")
    write_splits(out, splits, params.split.seed)
    report = {ion: {s: len(ids) for s, ids in parts.items()} for ion, parts in splits.items()}
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
