"""Cleaning: the paper's per-ion outlier rule, driven by ``params.yaml``, fitted on training rows.

Zhang et al. keep a row when |V - mean(V)| <= k * sigma (population sigma, per ion); k = 2 for
Li, Mg, Ca, Zn, 1.5 for Na, and K and Al are kept whole (k = None). They compute mean and sigma
over every row, test rows included, before splitting, so the test set's labels shape what is
dropped. Here the split comes first and mean and sigma come from each ion's training rows only;
the same thresholds are then applied to every split (a model is scored on the cleaned test rows,
and, as a check, on the uncleaned ones too).
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


def keep_mask(
    voltages: np.ndarray, k: float | None, reference: np.ndarray | None = None
) -> np.ndarray:
    """Boolean mask of rows the rule keeps; k=None keeps all. Mean and sigma come from
    ``reference`` (the training rows) when given, else from ``voltages`` themselves."""
    ref = voltages if reference is None else reference
    if k is None or voltages.size == 0 or ref.size == 0:
        return np.ones(voltages.shape, dtype=bool)
    mean, sigma = float(ref.mean()), float(ref.std())  # population sigma (ddof=0)
    return np.abs(voltages - mean) <= k * sigma + 1e-12


def clean_records(
    records: list[Record], k_by_ion: dict[str, float | None],
    fit_ids: set[str] | None = None,
) -> tuple[list[Record], dict[str, IonCleanStats]]:  # fmt: skip
    """Apply the rule per ion; records of ions without a k entry are an error, not dropped.

    ``fit_ids``: the battery ids whose voltages set mean and sigma (the training split); None
    fits on every row, as the paper did.
    """
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
        ref = v if fit_ids is None else v[[r.battery_id in fit_ids for r in rows]]
        mask = keep_mask(v, k, ref)
        kept.extend(r for r, m in zip(rows, mask, strict=True) if m)
        stats[ion] = IonCleanStats(
            ion=ion,
            k=k,
            mean=float(ref.mean()) if ref.size else float("nan"),
            sigma=float(ref.std()) if ref.size else float("nan"),
            kept=int(mask.sum()),
            removed=int((~mask).sum()),
        )
    return kept, stats
