"""Stage ``ingest``: read the MP source (snapshot, or the MP API), validate, write records."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from training.config import Params, load_params
from training.data.ingest import DataSourceError, IngestReport, ingest

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


@dataclass(frozen=True)
class Options:
    out: Path
    reports: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> IngestReport:
    return run_ingest(load_params(opts.params), opts.out, opts.reports)
