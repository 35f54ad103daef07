"""The graphs stage: every distinct charged structure converted once, cached in one tensor file.

Hosts shared between ions are converted once (the cache is keyed by ``charged_id``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pymatgen.core import Structure

from training.config import GraphSettings, load_params
from training.data.records import iter_records
from training.graphs.store import GraphStore
from voltage_model.graphs.converter import GraphConverter

log = logging.getLogger(__name__)


def converter_from_params(settings: GraphSettings) -> GraphConverter:
    return GraphConverter.from_dict(settings.model_dump())


def _structures(records_path: Path) -> Iterator[tuple[str, Structure]]:
    seen: set[str] = set()
    for rec in iter_records(records_path):
        if rec.charged_id not in seen:
            seen.add(rec.charged_id)
            yield rec.charged_id, rec.structure()


def run_graphs(
    settings: GraphSettings, records_path: Path, out: Path, report_path: Path, workers: int
) -> dict:
    converter = converter_from_params(settings)
    t0 = time.perf_counter()
    store = GraphStore.build(_structures(records_path), converter, workers=workers, on_error="skip")
    seconds = time.perf_counter() - t0
    store.save(out)
    for key, reason in store.skipped.items():
        log.warning("graph for %s skipped: %s", key, reason)
    report = {
        "structures": len(store),
        "skipped": store.skipped,
        "seconds": round(seconds, 2),
        "converter": converter.to_dict(),
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class Options:
    records: Path
    out: Path
    report: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict:
    p = load_params(opts.params)
    return run_graphs(p.graph, opts.records, opts.out, opts.report, workers=p.data.workers)
