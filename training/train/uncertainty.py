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


COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)
# The band a calibrated 90% interval's observed coverage should fall in on n crystals: the
# nominal 0.9 +- 2 binomial standard errors (so it narrows as the scored set grows).
def coverage_band(n: int, level: float = 0.9) -> tuple[float, float]:
    """(low, high) of observed coverage consistent with ``level`` on ``n`` crystals (+-2 SE)."""
    se = float(np.sqrt(level * (1 - level) / max(n, 1)))
    return max(0.0, level - 2 * se), min(1.0, level + 2 * se)


def interval_metrics(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """Proper scores and interval coverage of Gaussian predictions N(mean, std^2).

    coverage_<p>: fraction of targets inside the central p interval; nll: mean negative log
    likelihood (nats); crps: mean continuous ranked probability score (V, the MAE of a
    probabilistic forecast: equals the MAE when std -> 0); spearman_err_std: whether larger std
    goes with larger error; mean_std (V).
    """
    from scipy.stats import norm

    y, mean = np.asarray(y, float), np.asarray(mean, float)
    std = np.maximum(np.asarray(std, float), 1e-9)
    z = (y - mean) / std
    out = {f"coverage_{round(p * 100)}": float(np.mean(np.abs(z) <= norm.ppf(0.5 + p / 2)))
           for p in COVERAGE_LEVELS}  # fmt: skip
    out["nll"] = float(np.mean(0.5 * z**2 + np.log(std) + 0.5 * np.log(2 * np.pi)))
    crps = std * (z * (2 * norm.cdf(z) - 1) + 2 * norm.pdf(z) - 1 / np.sqrt(np.pi))
    out["crps"] = float(np.mean(crps))
    out["spearman_err_std"] = calibration(y, mean, std)["spearman_err_std"]
    out["mean_std"] = float(np.mean(std))
    out["mae"] = float(np.mean(np.abs(y - mean)))
    return out


def reliability_curve(
    y: np.ndarray, mean: np.ndarray, std: np.ndarray, levels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(nominal, observed) coverage of central Gaussian intervals: the reliability diagram."""
    from scipy.stats import norm

    levels = np.linspace(0.05, 0.95, 19) if levels is None else np.asarray(levels, float)
    z = np.abs(np.asarray(y, float) - np.asarray(mean, float)) / np.maximum(np.asarray(std), 1e-9)
    observed = np.array([np.mean(z <= norm.ppf(0.5 + p / 2)) for p in levels])
    return levels, observed


def cross_fitted_scale(
    y: np.ndarray, mean: np.ndarray, std: np.ndarray, fold: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """Per row, the std rescaled by the factor ``fit_std_scale`` finds on the *other* folds'
    rows in ``mask``: recalibration scored on rows it never saw."""
    out = np.asarray(std, float).copy()
    for k in np.unique(fold):
        other = mask & (fold != k)
        rows = fold == k
        out[rows] *= fit_std_scale(y[other], mean[other], std[other]) if other.any() else 1.0
    return out
