"""Fitting the per-atom local-voltage head (Zhang et al. 2022, Eq. 2) for the ``interpret`` stage.

The head itself (``LocalVoltageHead``: storage, fingerprint check, ``explain``) is
``voltage_model/local_voltage.py``, which the service applies; fitting it is training's part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from voltage_model.local_voltage import LocalVoltageHead


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float = 0.0) -> tuple[np.ndarray, float]:
    """Least squares ``y ~ x . w + b`` (bias unpenalised); ``ridge`` > 0 adds an L2 penalty on w.

    ``ridge = 0`` uses ``lstsq`` (minimum-norm solution), so collinear atom-vector features, common
    after softplus saturation, never make the fit fail.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need x (n, F) and y (n,) with n > 0, got {x.shape} and {y.shape}")
    if ridge <= 0:
        design = np.hstack([x, np.ones((x.shape[0], 1))])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        return coef[:-1], float(coef[-1])
    xm, ym = x.mean(axis=0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + ridge * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, float(ym - xm @ w)


def fit_local_head(
    pooled: Sequence[np.ndarray],
    targets: np.ndarray,
    fingerprint: str,
    ridge: float = 0.0,
    info: Mapping[str, Any] | None = None,
) -> LocalVoltageHead:
    """Fit one linear head per backbone on that backbone's per-crystal mean atom vectors."""
    weights, biases = [], []
    for x in pooled:
        w, b = fit_linear(x, targets, ridge)
        weights.append(tuple(float(v) for v in w))
        biases.append(b)
    return LocalVoltageHead(tuple(weights), tuple(biases), fingerprint, dict(info or {}))
