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

from training.data.records import iter_records
from voltage_model.models import chgnet_backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChgnetFeatures:
    """Features by host id, with the CHGNet that computed them."""

    ids: np.ndarray
    features: np.ndarray
    spec: dict[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {h: i for i, h in enumerate(self.ids.tolist())})

    def rows(self, hosts: list[str]) -> np.ndarray:
        """Features of ``hosts`` in order; a host without features is an error naming it."""
        index = self._row  # type: ignore[attr-defined]
        missing = [h for h in hosts if h not in index]
        if missing:
            raise KeyError(f"{len(missing)} hosts lack CHGNet features: {missing[:3]}")
        out = self.features[[index[h] for h in hosts]]
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if bad.size:
            raise ValueError(f"CHGNet could not featurise host {hosts[bad[0]]} "
                             f"({bad.size} of {len(hosts)})")  # fmt: skip
        return out

    def valid(self, hosts: list[str]) -> np.ndarray:
        """Mask of ``hosts`` with finite features."""
        index = self._row  # type: ignore[attr-defined]
        return np.array([h in index and bool(np.isfinite(self.features[index[h]]).all())
                         for h in hosts], dtype=bool)  # fmt: skip


def save(path: Path, feats: ChgnetFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, ids=feats.ids.astype(str), features=feats.features,
                        spec=np.array(json.dumps(feats.spec)))  # fmt: skip
    tmp.replace(path)


def load(path: Path, check: bool = True) -> ChgnetFeatures:
    """Read the stage's output; refuse features of another CHGNet than the installed one."""
    with np.load(path, allow_pickle=False) as z:
        feats = ChgnetFeatures(z["ids"].astype(str), z["features"],
                               json.loads(str(z["spec"])))  # fmt: skip
    if check:
        chgnet_backbone.check_spec(feats.spec, str(path))
    return feats


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
