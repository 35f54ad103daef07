"""The data stages (ingest, clean, split) as plain functions: the CLI and tests call these."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from training.config import Params
from training.data.clean import clean_records
from training.data.ingest import DataSourceError, IngestReport, ingest
from training.data.records import read_records, write_records
from training.data.split import leakage, load_splits, make_splits, write_splits

log = logging.getLogger(__name__)


def resolve_source(params: Params) -> str:
    """Resolve "auto": the live MP API when a key is set, else the offline snapshot."""
    if params.data.source == "auto":
        return "mp_api" if os.environ.get("MP_API_KEY") else "snapshot"
    return params.data.source


def run_ingest(params: Params, out: Path, report_dir: Path, client: object = None) -> IngestReport:
    source = resolve_source(params)
    if source == "snapshot":
        from training.data.snapshot import snapshot_rows

        rows = snapshot_rows(params.data.snapshot_dir, params.ion_names)
    else:
        from training.data.mp_api import live_client, mp_api_rows

        rows = mp_api_rows(client or live_client(), params.ion_names)
    report = ingest(rows, params.ion_names, out, report_dir, source, workers=params.data.workers)
    if sum(report.valid.values()) == 0:
        raise DataSourceError(f"source {source} produced no valid record")
    for ion in params.ion_names:
        log.info("ingest %s: %d valid, %d invalid", ion, report.valid[ion], len(report.bad[ion]))
    return report


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
