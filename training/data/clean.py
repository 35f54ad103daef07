"""Cleaning: the paper's per-ion outlier rule, driven by ``params.yaml``.

Zhang et al. keep a row when |V - mean(V)| <= k * sigma (population sigma, per ion); k = 2 for
Li, Mg, Ca, Zn, 1.5 for Na, and K and Al are kept whole (k = None).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from training.data.records import Record


@dataclass(frozen=True)
class IonCleanStats:
    ion: str
    k: float | None
    mean: float
    sigma: float
    kept: int
    removed: int

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {
            "k": self.k,
            "mean_V": round(self.mean, 4),
            "sigma_V": round(self.sigma, 4),
            "kept": self.kept,
            "removed": self.removed,
        }


def keep_mask(voltages: np.ndarray, k: float | None) -> np.ndarray:
    """Boolean mask of rows the rule keeps; k=None keeps all."""
    if k is None or voltages.size == 0:
        return np.ones(voltages.shape, dtype=bool)
    mean, sigma = float(voltages.mean()), float(voltages.std())  # population sigma (ddof=0)
    return np.abs(voltages - mean) <= k * sigma + 1e-12


def clean_records(
    records: list[Record], k_by_ion: dict[str, float | None]
) -> tuple[list[Record], dict[str, IonCleanStats]]:
    """Apply the rule per ion; records of ions without a k entry are an error, not dropped."""
    by_ion: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        if rec.working_ion not in k_by_ion:
            raise ValueError(f"record {rec.battery_id}: ion {rec.working_ion} has no clean setting")
        by_ion[rec.working_ion].append(rec)
    kept: list[Record] = []
    stats: dict[str, IonCleanStats] = {}
    for ion, k in k_by_ion.items():
        rows = by_ion.get(ion, [])
        v = np.array([r.battery_avg_voltage for r in rows], dtype=float)
        mask = keep_mask(v, k)
        kept.extend(r for r, m in zip(rows, mask, strict=True) if m)
        stats[ion] = IonCleanStats(
            ion=ion,
            k=k,
            mean=float(v.mean()) if v.size else float("nan"),
            sigma=float(v.std()) if v.size else float("nan"),
            kept=int(mask.sum()),
            removed=int((~mask).sum()),
        )
    return kept, stats
