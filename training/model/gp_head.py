"""A Gaussian-process head over a frozen backbone's pooled crystal vectors.

Why: with 100-400 crystals per ion, fine-tuning the 64 -> 128 -> 1 MLP head selects its epoch on
a validation split of 13-43 crystals and overfits that choice (measured on our grouped split:
Al test MAE 1.00 V against 0.75 V for this head). A GP on the same frozen features has three
hyperparameters, fitted by marginal likelihood on the training split alone, and its posterior
variance grows away from the training crystals, which is the uncertainty a researcher screening
unfamiliar chemistries needs.

Fitting uses scikit-learn (``GaussianProcessRegressor``: constant * Matern + white noise, inputs
standardised). The fitted posterior (training inputs, ``alpha = K^-1 y``, the Cholesky factor of
``K``, kernel hyperparameters) is stored as tensors, so a checkpoint stays ``weights_only``
loadable and inference is a few torch ops; ``tests/test_gp_head.py`` pins it to scikit-learn's
own ``predict(return_std=True)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

GP_KEYS = ("x_mean", "x_scale", "x_train", "alpha", "chol", "kernel")
MATERN_NU = (0.5, 1.5, 2.5)


@dataclass(frozen=True)
class GPConfig:
    """Kernel smoothness (Matern nu) and the optimiser's restarts (0 = deterministic start)."""

    nu: float = 0.5
    n_restarts: int = 0

    def __post_init__(self) -> None:
        if self.nu not in MATERN_NU:
            raise ValueError(f"gp nu must be one of {MATERN_NU}, got {self.nu}")


def _matern(r: Tensor, nu: float) -> Tensor:
    """Matern correlation of scaled distances ``r = d / length_scale`` (unit amplitude)."""
    if nu == 0.5:
        return torch.exp(-r)
    if nu == 1.5:
        s = math.sqrt(3.0) * r
        return (1.0 + s) * torch.exp(-s)
    s = math.sqrt(5.0) * r
    return (1.0 + s + s * s / 3.0) * torch.exp(-s)


class GPHead(nn.Module):
    """GP posterior on pooled vectors: ``forward`` gives the mean, ``variance`` the predictive
    variance (observation noise included), both in normalised target units like an MLP head."""

    def __init__(self, x_mean: Tensor, x_scale: Tensor, x_train: Tensor, alpha: Tensor,
                 chol: Tensor, kernel: Tensor) -> None:  # fmt: skip
        super().__init__()
        for name, value in zip(GP_KEYS, (x_mean, x_scale, x_train, alpha, chol, kernel),
                               strict=True):  # fmt: skip
            self.register_buffer(name, value.detach().to(torch.float64).clone())
        n, d = self.x_train.shape
        shapes = {"x_mean": (d,), "x_scale": (d,), "alpha": (n,), "chol": (n, n), "kernel": (4,)}
        for name, shape in shapes.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"GP head field {name} has shape {got}, expected {shape}")
        if float(self.kernel[3]) not in MATERN_NU:
            raise ValueError(f"GP head Matern nu {float(self.kernel[3])} not in {MATERN_NU}")

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> GPHead:
        missing = [k for k in GP_KEYS if k not in state]
        if missing:
            raise ValueError(f"GP head state lacks {missing}")
        return cls(*(state[k] for k in GP_KEYS))

    @property
    def amplitude(self) -> float:
        return float(self.kernel[0])

    def _cross(self, pooled: Tensor) -> Tensor:
        """k(x*, X_train), (n*, n)."""
        x = (pooled.to(torch.float64) - self.x_mean) / self.x_scale
        r = torch.cdist(x, self.x_train) / self.kernel[1]
        return self.kernel[0] * _matern(r, float(self.kernel[3]))

    def forward(self, pooled: Tensor) -> Tensor:
        return (self._cross(pooled) @ self.alpha).to(pooled.dtype)

    def variance(self, pooled: Tensor) -> Tensor:
        """Posterior predictive variance: k(x*,x*) + noise - k*^T K^-1 k*."""
        v = torch.linalg.solve_triangular(self.chol, self._cross(pooled).T, upper=False)
        var = self.kernel[0] + self.kernel[2] - (v * v).sum(dim=0)
        return var.clamp_min(0.0).to(pooled.dtype)


def fit_gp_head(x: Tensor, y_norm: np.ndarray, cfg: GPConfig) -> GPHead:
    """Fit hyperparameters by marginal likelihood on (pooled vectors, normalised targets)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    xs = x.detach().to(torch.float64).numpy()
    mean = xs.mean(axis=0)
    scale = xs.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a dead feature: keep it constant rather than divide by zero
    z = (xs - mean) / scale
    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=math.sqrt(z.shape[1]), length_scale_bounds=(1e-1, 1e4), nu=cfg.nu
    ) + WhiteKernel(0.1, (1e-4, 1.0))
    gp = GaussianProcessRegressor(kernel, n_restarts_optimizer=cfg.n_restarts, random_state=0)
    with warnings.catch_warnings():  # a bound reached is reported in the fitted kernel, not fatal
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(z, np.asarray(y_norm, dtype=np.float64))
    k = gp.kernel_
    params = [k.k1.k1.constant_value, k.k1.k2.length_scale, k.k2.noise_level, cfg.nu]
    return GPHead(
        torch.from_numpy(mean), torch.from_numpy(scale), torch.from_numpy(gp.X_train_),
        torch.from_numpy(gp.alpha_), torch.from_numpy(gp.L_),
        torch.tensor(params, dtype=torch.float64),
    )  # fmt: skip


def is_gp_state(state: dict[str, Tensor]) -> bool:
    return "x_train" in state and "alpha" in state


def head_variance(head: nn.Module, pooled: Tensor) -> Tensor:
    """A head's own predictive variance (0 for MLP heads, whose spread is across heads)."""
    if isinstance(head, GPHead):
        return head.variance(pooled)
    return torch.zeros(pooled.shape[0], dtype=pooled.dtype)
