"""Stage ``chgnet_features``: CHGNet features of every distinct charged host, once per pipeline.

Why a stage of its own: every later consumer (the per-ion heads, the CV check, the pooling CV,
the physics cross-check) needs the same frozen features of the same hosts; computed once as a DVC
output, they cost ~3 minutes for the ~2,700 hosts on 2 cores and nothing afterwards.

Output (``.npz``): ``ids`` (charged_id, str), ``features`` (n, FEATURE_DIM) float64 (NaN rows
where CHGNet could not graph a structure), ``spec`` (JSON of ``chgnet_backbone.spec()``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.chgnet_store import ChgnetFeatures, save
from training.data.records import iter_records
from voltage_model.models import chgnet_backbone

log = logging.getLogger(__name__)


def run_chgnet_features(records: Path, out: Path, report: Path) -> dict[str, Any]:
    """Featurise each distinct charged host of ``records`` (all ions) once."""
    from tqdm import tqdm

    hosts: dict[str, Any] = {}
    for r in iter_records(records):
        hosts.setdefault(r.charged_id, r)
    ids = sorted(hosts)
    start = time.perf_counter()
    structures = [hosts[h].structure() for h in ids]
    with tqdm(total=len(ids), desc="CHGNet features", unit="host") as bar:
        x, errors = chgnet_backbone.featurise(structures, progress=bar.update)
    seconds = time.perf_counter() - start
    save(out, ChgnetFeatures(np.array(ids), x, chgnet_backbone.spec()))
    failed = {h: e for h, e in zip(ids, errors, strict=True) if e is not None}
    summary = {"hosts": len(ids), "failed": failed, "seconds": round(seconds, 1),
               "hosts_per_s": round(len(ids) / max(seconds, 1e-9), 2),
               "feature_dim": chgnet_backbone.FEATURE_DIM,
               "spec": chgnet_backbone.spec()}  # fmt: skip
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("CHGNet features of %d hosts in %.0f s (%d failed)", len(ids), seconds, len(failed))
    return summary


@dataclass(frozen=True)
class Options:
    records: Path
    out: Path
    report: Path


def run(opts: Options) -> dict[str, Any]:
    return run_chgnet_features(opts.records, opts.out, opts.report)
