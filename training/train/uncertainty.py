"""Uncertainty calibration: is the ensemble spread honest?

Head ensembles over a frozen backbone under-disperse (they share every layer but the last two), so
their std is rescaled by one factor fitted on the *validation* split so that 90% of validation
targets fall inside mean +- 1.645 std. Test calibration is then reported, never fitted.
(Gaussian-process heads carry their own fitted variance and are not rescaled:
``training.transfer.uncertainty_report``.)
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

Z90 = 1.6448536269514722


def fit_std_scale(y: np.ndarray, mean: np.ndarray, std: np.ndarray, coverage: float = 0.9) -> float:
    """The factor s such that a fraction ``coverage`` of |y - mean| <= Z90 * s * std."""
    std = np.maximum(np.asarray(std, float), 1e-6)
    ratio = np.abs(np.asarray(y, float) - np.asarray(mean, float)) / std
    if ratio.size == 0:
        return 1.0
    return float(max(np.quantile(ratio, coverage) / Z90, 1e-3))


def calibration(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """Coverage of mean +- 1.645 std (target ~0.9) and Spearman rho of |error| vs std."""
    y, mean, std = (np.asarray(a, float) for a in (y, mean, std))
    err = np.abs(y - mean)
    inside = float(np.mean(err <= Z90 * std)) if y.size else float("nan")
    rho = float(spearmanr(err, std).statistic) if y.size > 2 and np.ptp(std) > 0 else float("nan")
    return {"coverage_90": inside, "spearman_err_std": rho, "mean_std": float(np.mean(std))}
