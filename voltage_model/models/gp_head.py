"""A Gaussian-process head over a frozen backbone's pooled crystal vectors.

Why: with 100-400 crystals per ion, fine-tuning the 64 -> 128 -> 1 MLP head selects its epoch on
a validation split of 13-43 crystals and overfits that choice (measured on our grouped split:
Al test MAE 1.00 V against 0.75 V for this head). A GP on the same frozen features has three
hyperparameters, fitted by marginal likelihood on the training split alone, and its posterior
variance grows away from the training crystals, which is the uncertainty a researcher screening
unfamiliar chemistries needs.

Fitting uses scikit-learn (``GaussianProcessRegressor``: constant * Matern + white noise, inputs
standardised; ``voltage_model.models.gp_fit.HeadGPR`` only speeds up its likelihood gradient). The
fitted posterior (training inputs, ``alpha = K^-1 y``, the Cholesky factor of ``K``, kernel
hyperparameters) is stored as tensors, so a checkpoint stays ``weights_only`` loadable and
inference is a few torch ops; ``tests/voltage_model/test_gp_head.py`` pins it to
scikit-learn's own ``predict(return_std=True)``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)
GP_KEYS = ("x_mean", "x_scale", "x_train", "alpha", "chol", "kernel")
MATERN_NU = (0.5, 1.5, 2.5)
GP_SELECT = ("likelihood", "validation")


@dataclass(frozen=True)
class GPConfig:
    """Kernel smoothness (Matern nu), the optimiser's restarts (0 = deterministic start) and the
    candidate weights of the composition descriptors beside the pooled vector.

    ``descriptor_weights``: each weight w scales the standardised descriptors before the one
    isotropic kernel sees them (w = 0: the pooled vector alone; large w: composition dominates).
    ``select`` says who chooses among them. ``"likelihood"``: the highest log marginal likelihood
    on the training split, like the kernel's other hyperparameters; right when the backbone never
    saw the training crystals (transfer). ``"validation"``: the caller fits one head per weight and
    keeps the best on validation; needed on the backbone's own training crystals, whose pooled
    vectors fit their targets better than they will fit new crystals', so the evidence overrates
    the pooled vector (on the Li backbones it chose weight 0 on all three).

    ``task_weights``: for a head fitted on several ions' crystals (``PooledRows``), the candidate
    scales of the one-hot ion columns; a larger scale decorrelates ions more. Chosen, jointly with
    the descriptor weight, by marginal likelihood.
    """

    nu: float = 0.5
    n_restarts: int = 0
    descriptor_weights: tuple[float, ...] = (0.0,)
    select: str = "likelihood"
    task_weights: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        # params.yaml gives a list; the frozen config keeps a hashable tuple of floats
        weights = tuple(float(w) for w in self.descriptor_weights)
        object.__setattr__(self, "descriptor_weights", weights)
        object.__setattr__(self, "task_weights", tuple(float(u) for u in self.task_weights))
        if not self.task_weights or any(u <= 0 for u in self.task_weights):
            raise ValueError(f"gp task_weights must be > 0, got {self.task_weights}")
        if self.nu not in MATERN_NU:
            raise ValueError(f"gp nu must be one of {MATERN_NU}, got {self.nu}")
        if not self.descriptor_weights or any(w < 0 for w in self.descriptor_weights):
            raise ValueError(f"gp descriptor_weights must be >= 0, got {self.descriptor_weights}")
        if self.select not in GP_SELECT:
            raise ValueError(f"gp select must be one of {GP_SELECT}, got {self.select!r}")

    @property
    def uses_descriptors(self) -> bool:
        return any(w > 0 for w in self.descriptor_weights)

    def candidates(self) -> list[GPConfig]:
        """One config per descriptor weight, for a caller that selects on validation."""
        return [replace(self, descriptor_weights=(w,)) for w in self.descriptor_weights]


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
    variance (observation noise included), both in normalised target units like an MLP head.

    A head fitted with composition descriptors also reads ``descriptors`` (the full
    ``voltage_model.models.descriptors`` row of each crystal): it keeps columns ``desc_cols``, fills
    missing values with the training medians ``desc_fill`` and appends them to the pooled vector.
    Their weight is folded into ``x_scale``; ``desc_weight`` records it for reports.

    A head fitted on several ions' crystals (``fit_gp_head(..., tasks=...)``) also holds ``task``,
    the scaled one-hot row of the ion it serves: appended after standardisation, as the training
    rows' own ion columns were, so every query is a crystal of that ion.
    """

    def __init__(self, x_mean: Tensor, x_scale: Tensor, x_train: Tensor, alpha: Tensor,
                 chol: Tensor, kernel: Tensor, desc_cols: Tensor | None = None,
                 desc_fill: Tensor | None = None, desc_weight: float = 0.0,
                 task: Tensor | None = None) -> None:  # fmt: skip
        super().__init__()
        for name, value in zip(GP_KEYS, (x_mean, x_scale, x_train, alpha, chol, kernel),
                               strict=True):  # fmt: skip
            self.register_buffer(name, value.detach().to(torch.float64).clone())
        cols = torch.zeros(0, dtype=torch.int64) if desc_cols is None else desc_cols
        fill = torch.zeros(0, dtype=torch.float64) if desc_fill is None else desc_fill
        self.register_buffer("desc_cols", cols.detach().to(torch.int64).clone())
        self.register_buffer("desc_fill", fill.detach().to(torch.float64).clone())
        self.register_buffer("desc_weight", torch.tensor([float(desc_weight)], dtype=torch.float64))
        task = torch.zeros(0, dtype=torch.float64) if task is None else task
        self.register_buffer("task", task.detach().to(torch.float64).reshape(-1).clone())
        if self.desc_cols.shape != self.desc_fill.shape or self.desc_cols.ndim != 1:
            raise ValueError("GP head desc_cols and desc_fill must be 1-d and the same length")
        if self.n_descriptors and int(self.desc_cols.min()) < 0:
            raise ValueError("GP head desc_cols must be non-negative column indices")
        n, d = self.x_train.shape
        d -= self.n_tasks  # the ion columns are not standardised
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
        extra = {}
        if "desc_cols" in state:
            weight = state.get("desc_weight", torch.zeros(1))
            extra = {"desc_cols": state["desc_cols"], "desc_fill": state.get("desc_fill"),
                     "desc_weight": float(weight.reshape(-1)[0])}  # fmt: skip
            if extra["desc_fill"] is None:
                raise ValueError("GP head state has desc_cols but lacks desc_fill")
        if "task" in state:
            extra["task"] = state["task"]
        return cls(*(state[k] for k in GP_KEYS), **extra)

    @property
    def amplitude(self) -> float:
        return float(self.kernel[0])

    @property
    def n_tasks(self) -> int:
        """Ion columns of a head fitted on several ions' crystals (0: one ion's)."""
        return int(self.task.numel())

    @property
    def n_descriptors(self) -> int:
        return int(self.desc_cols.numel())

    def inputs(self, pooled: Tensor, descriptors: Tensor | None = None) -> Tensor:
        """The head's input row: the pooled vector, then its descriptor columns (float64)."""
        x = pooled.to(torch.float64)
        if not self.n_descriptors:
            return x
        if descriptors is None:
            raise ValueError("this GP head reads composition descriptors; none were given")
        if descriptors.shape[0] != x.shape[0] or descriptors.shape[1] <= int(self.desc_cols.max()):
            raise ValueError(
                f"descriptors of shape {tuple(descriptors.shape)} do not fit this head "
                f"({x.shape[0]} crystals, column {int(self.desc_cols.max())} needed)"
            )
        d = descriptors.to(torch.float64).index_select(1, self.desc_cols)
        d = torch.where(torch.isnan(d), self.desc_fill.expand_as(d), d)
        return torch.cat([x, d], dim=1)

    def _cross(self, pooled: Tensor, descriptors: Tensor | None) -> Tensor:
        """k(x*, X_train), (n*, n)."""
        x = (self.inputs(pooled, descriptors) - self.x_mean) / self.x_scale
        if self.n_tasks:
            x = torch.cat([x, self.task.expand(x.shape[0], -1)], dim=1)
        r = torch.cdist(x, self.x_train) / self.kernel[1]
        return self.kernel[0] * _matern(r, float(self.kernel[3]))

    def forward(self, pooled: Tensor, descriptors: Tensor | None = None) -> Tensor:
        return (self._cross(pooled, descriptors) @ self.alpha).to(pooled.dtype)

    def variance(self, pooled: Tensor, descriptors: Tensor | None = None) -> Tensor:
        """Posterior predictive variance: k(x*,x*) + noise - k*^T K^-1 k*."""
        v = torch.linalg.solve_triangular(self.chol, self._cross(pooled, descriptors).T,
                                          upper=False)  # fmt: skip
        var = self.kernel[0] + self.kernel[2] - (v * v).sum(dim=0)
        return var.clamp_min(0.0).to(pooled.dtype)


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-12] = 1.0  # a dead feature: keep it constant rather than divide by zero
    return (x - mean) / scale, mean, scale


def _fit_sklearn(z: np.ndarray, y: np.ndarray, cfg: GPConfig) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    from voltage_model.models.gp_fit import HeadGPR

    kernel = ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=math.sqrt(z.shape[1]), length_scale_bounds=(1e-1, 1e4), nu=cfg.nu
    ) + WhiteKernel(0.1, (1e-4, 1.0))
    gp = HeadGPR(kernel, n_restarts_optimizer=cfg.n_restarts, random_state=0)
    with warnings.catch_warnings():  # a bound reached is reported in the fitted kernel, not fatal
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(z, y)
    return gp


def _descriptor_block(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns with data that varies over the training crystals, NaN filled with their medians."""
    with warnings.catch_warnings():  # an all-NaN column is dropped below
        warnings.simplefilter("ignore", RuntimeWarning)
        fill = np.nanmedian(d, axis=0)
    filled = np.where(np.isnan(d), fill, d)
    cols = np.flatnonzero(np.isfinite(fill) & (np.nanstd(filled, axis=0) > 1e-12))
    return filled[:, cols], cols, fill[cols]


def fit_gp_head(
    x: Tensor, y_norm: np.ndarray, cfg: GPConfig, descriptors: np.ndarray | None = None,
    tasks: np.ndarray | None = None,
) -> GPHead:  # fmt: skip
    """Fit hyperparameters by marginal likelihood on (pooled vectors, normalised targets).

    With ``descriptors`` (the training crystals' ``voltage_model.models.descriptors`` rows) and a
    positive weight in ``cfg.descriptor_weights``, one GP is fitted per weight and the one with
    the highest log marginal likelihood is kept (weight 0 = the pooled vector alone).

    ``tasks`` (n, k), one-hot: the rows come from k ions (targets normalised per ion by the
    caller) and the head serves the ion of column 0. The ion columns, scaled by each of
    ``cfg.task_weights``, join the kernel's input, so crystals of different ions correlate less
    than crystals of the same ion; that scale is chosen with the descriptor weight.
    The candidates are fitted side by side (``parallel_fits``).
    """
    from voltage_model.models.gp_fit import parallel_fits  # scikit-learn: fitting only

    y = np.asarray(y_norm, dtype=np.float64)
    zp, mean_p, scale_p = _standardise(x.detach().to(torch.float64).numpy())
    weights = cfg.descriptor_weights if descriptors is not None else (0.0,)
    if descriptors is not None and cfg.uses_descriptors:
        block, cols, fill = _descriptor_block(np.asarray(descriptors, dtype=np.float64))
        zd, mean_d, scale_d = _standardise(block)
    scales: tuple[float, ...] = cfg.task_weights if tasks is not None else (0.0,)

    def fit(candidate: tuple[float, float]) -> Any:
        w, u = candidate
        z = zp if w == 0 else np.concatenate([zp, w * zd], axis=1)
        if u > 0:
            z = np.concatenate([z, u * np.asarray(tasks, dtype=np.float64)], axis=1)
        return _fit_sklearn(z, y, cfg)

    candidates = [(w, u) for w in weights for u in scales]
    best: tuple[float, float, float, Any] | None = None
    for (w, u), gp in zip(candidates, parallel_fits(fit, candidates), strict=True):
        lml = float(gp.log_marginal_likelihood_value_)
        log.debug("GP head, descriptor weight %s, task scale %s: log marginal likelihood %.2f",
                  w, u, lml)  # fmt: skip
        if best is None or lml > best[0]:
            best = (lml, w, u, gp)
    assert best is not None
    _, w, u, gp = best
    k = gp.kernel_
    params = [k.k1.k1.constant_value, k.k1.k2.length_scale, k.k2.noise_level, cfg.nu]
    mean, scale, extra = mean_p, scale_p, {}
    if w > 0:
        mean = np.concatenate([mean_p, mean_d])
        scale = np.concatenate([scale_p, scale_d / w])
        extra = {"desc_cols": torch.from_numpy(cols), "desc_fill": torch.from_numpy(fill),
                 "desc_weight": float(w)}  # fmt: skip
    if u > 0:
        extra["task"] = torch.from_numpy(u * np.eye(np.shape(tasks)[1])[0])
    return GPHead(
        torch.from_numpy(mean), torch.from_numpy(scale), torch.from_numpy(gp.X_train_),
        torch.from_numpy(gp.alpha_), torch.from_numpy(gp.L_),
        torch.tensor(params, dtype=torch.float64), **extra,
    )  # fmt: skip


def is_gp_state(state: dict[str, Tensor]) -> bool:
    return "x_train" in state and "alpha" in state


def head_mean_var(
    head: nn.Module, pooled: Tensor, descriptors: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A head's output and own predictive variance (0 for MLP heads, whose spread is across
    heads), normalised units. Every caller that serves heads goes through here."""
    if isinstance(head, GPHead):
        return head(pooled, descriptors), head.variance(pooled, descriptors)
    return head(pooled), torch.zeros(pooled.shape[0], dtype=pooled.dtype)


def needs_descriptors(heads: Sequence[nn.Module]) -> bool:
    return any(isinstance(h, GPHead) and h.n_descriptors for h in heads)
