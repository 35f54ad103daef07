"""Heads over a frozen backbone: transfer learning and cheap ensembles.

With the embedding and convolutions frozen, a crystal's pooled vector never changes, so it is
computed once per structure and the (conv_to_fc, fc_out) heads train on a small matrix in
milliseconds per epoch. K heads from different seeds and bootstrap resamples give a mean and a
spread (the uncertainty) for almost no extra inference cost: the backbone still runs once.

BatchNorm in the frozen layers: ``bn_mode="adapt"`` re-estimates the running statistics on the
target ion's training structures before freezing (what the paper's code did implicitly by leaving
the model in train mode); ``"frozen"`` keeps the source ion's statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from voltage_model.models.cgcnn import CGCNN, Head
from voltage_model.models.descriptors import store_descriptors
from voltage_model.models.gp_head import GPConfig, GPHead, fit_gp_head, head_mean_var
from voltage_model.normalizer import Normalizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadConfig:
    """Settings for fitting heads on frozen features (params.yaml ``heads``/``transfer``)."""

    n_heads: int = 5
    epochs: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-4
    bootstrap: bool = True
    patience: int = 60
    seed: int = 0


@torch.no_grad()
def pooled_features(model: CGCNN, loader: GraphLoader) -> Tensor:
    """Pooled crystal vectors (n, atom_fea_len) in loader order, backbone in eval mode."""
    was = model.training
    model.eval()
    feats = [model.pooled(batch) for batch in loader]
    model.train(was)
    return torch.cat(feats) if feats else torch.empty(0, model.config.atom_fea_len)


@torch.no_grad()
def adapt_batchnorm(model: CGCNN, loader: GraphLoader) -> None:
    """Re-estimate BatchNorm running statistics on ``loader`` (cumulative average, no grads)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    model.train()
    for batch in loader:
        model.pooled(batch)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.eval()


def _fit_one(
    head: Head, x: Tensor, y: Tensor, x_val: Tensor, y_val: Tensor, cfg: HeadConfig
) -> Head:
    """Full-batch AdamW on the head; keep the state with the best validation MSE."""
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, stale = float("inf"), copy.deepcopy(head.state_dict()), 0
    for _ in range(cfg.epochs):
        head.train()
        opt.zero_grad()
        loss = nn.functional.mse_loss(head(x), y)
        loss.backward()
        opt.step()
        head.eval()
        with torch.no_grad():
            val = float(nn.functional.mse_loss(head(x_val), y_val))
        if val < best - 1e-6:
            best, best_state, stale = val, copy.deepcopy(head.state_dict()), 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    head.load_state_dict(best_state)
    head.eval()
    return head


@contextmanager
def single_thread() -> Iterator[None]:
    """Tiny matrices gain nothing from threads, and lose badly when another process holds a core
    (OpenMP spin-waiting: measured 35x slower with 2 threads on a busy 2-core machine)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@dataclass(frozen=True)
class HeadRows:
    """The rows heads are fitted on: pooled vectors and targets of the training split, and of
    the validation split that chooses each head's epoch. Targets in volts, or already
    normalised (``fit_heads`` normalises them into tensors)."""

    train_x: Tensor
    train_y: np.ndarray | Tensor
    val_x: Tensor
    val_y: np.ndarray | Tensor

    @classmethod
    def of(cls, feats: dict[str, Tensor], data: IonData) -> HeadRows:
        """An ion's training and validation rows from its pooled vectors per split."""
        return cls(feats["train"], data.targets("train"), feats["val"], data.targets("val"))


def fit_heads(start: Head, rows: HeadRows, normalizer: Normalizer, cfg: HeadConfig) -> list[Head]:
    """K heads, each fine-tuned from ``start`` on a (bootstrap) resample of the training rows."""
    y = torch.as_tensor(normalizer.norm(np.asarray(rows.train_y, np.float64)), dtype=torch.float32)
    yv = torch.as_tensor(normalizer.norm(np.asarray(rows.val_y, np.float64)), dtype=torch.float32)
    normed = HeadRows(rows.train_x, y, rows.val_x, yv)
    rng = np.random.default_rng(cfg.seed)
    heads = []
    with single_thread():
        for k in range(cfg.n_heads):
            heads.append(_one_head(start, k, rng, normed, cfg))
    return heads


def _one_head(
    start: Head, k: int, rng: np.random.Generator, rows: HeadRows, cfg: HeadConfig
) -> Head:
    """Head k: a bootstrap resample, and (k > 0) a slightly perturbed start (``rows``: targets
    normalised, as tensors)."""
    torch.manual_seed(cfg.seed * 1000 + k)
    y = rows.train_y
    boot = cfg.bootstrap and cfg.n_heads > 1
    idx = rng.integers(0, len(y), len(y)) if boot else np.arange(len(y))
    head = copy.deepcopy(start)
    if k > 0:  # perturb the start so heads do not collapse onto one solution
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return _fit_one(head, rows.train_x[idx], y[idx], rows.val_x, rows.val_y, cfg)


@torch.no_grad()
def heads_volts(heads: list[Head], x: Tensor, normalizer: Normalizer) -> np.ndarray:
    """Predictions in volts of every head, (K, n), for pooled features ``x``."""
    for h in heads:
        h.eval()
    preds = torch.stack([h(x) for h in heads]).double().numpy()
    return normalizer.denorm(preds)


def split_descriptors(store: GraphStore, data: IonData, cfg: GPConfig) -> dict[str, Tensor] | None:
    """Composition descriptors of every split's crystals, when ``cfg`` offers them to GP heads
    (computed once per ion and shared by every backbone's head)."""
    if not cfg.uses_descriptors:
        return None
    return {s: torch.from_numpy(store_descriptors(store, data.host_ids(s))) for s in data.parts}


@dataclass(frozen=True)
class PooledRows:
    """Other ions' training crystals that join a GP head's training rows (``ions.<ion>.pool``).

    Why: a multivalent ion has 100-400 crystals, and many of its host structures also host
    another multivalent ion, whose voltage on that host is informative. The rows enter one GP
    whose kernel also reads a one-hot ion column (``fit_gp_head(tasks=...)``), so same-ion
    crystals correlate more than cross-ion ones. Each ion's targets are normalised by its own
    training statistics; ``ion_index`` is 1.. (0 is the head's own ion).
    """

    feats: Tensor
    desc: Tensor | None
    y_norm: np.ndarray
    ion_index: np.ndarray
    n_ions: int

    def __post_init__(self) -> None:
        n = self.feats.shape[0]
        if len(self.y_norm) != n or len(self.ion_index) != n:
            raise ValueError("pooled rows: features, targets and ion indices differ in length")
        if n and (self.ion_index.min() < 1 or self.ion_index.max() >= self.n_ions):
            raise ValueError(f"pooled rows: ion indices must lie in 1..{self.n_ions - 1}")

    @classmethod
    def normalised(
        cls, feats: Tensor, desc: Tensor | None, y: np.ndarray, ion_index: np.ndarray, n_ions: int
    ) -> PooledRows:
        """Rows with targets in volts, each ion's normalised by its own rows' mean and std."""
        y_norm = np.empty(len(y))
        for i in np.unique(ion_index):
            rows = ion_index == i
            y_norm[rows] = Normalizer.fit(y[rows]).norm(y[rows])
        return cls(feats=feats, desc=desc, y_norm=y_norm, ion_index=ion_index, n_ions=n_ions)


def pooled_rows(
    partners: list[IonData], feats: list[Tensor], desc: list[Tensor] | None
) -> PooledRows | None:
    """The training split of each partner ion as ``PooledRows`` (None without partners).
    ``feats``/``desc``: per partner, its training crystals' pooled vectors and descriptors."""
    if not partners:
        return None
    y = [p.targets("train") for p in partners]
    index = np.concatenate([np.full(len(t), i + 1) for i, t in enumerate(y)])
    return PooledRows.normalised(torch.cat(feats), None if desc is None else torch.cat(desc),
                                 np.concatenate(y), index, len(partners) + 1)  # fmt: skip


def with_pooled_rows(
    feats: Tensor, desc: Tensor | None, y_norm: np.ndarray, pooled: PooledRows | None
) -> tuple[Tensor, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(pooled vectors, normalised targets, descriptors, one-hot ions) a GP head is fitted on."""
    d = None if desc is None else desc.numpy()
    if pooled is None:
        return feats, y_norm, d, None
    own = np.zeros(len(y_norm), dtype=np.int64)
    tasks = np.eye(pooled.n_ions)[np.concatenate([own, pooled.ion_index])]
    if d is not None:
        if pooled.desc is None:
            raise ValueError("pooled rows lack the descriptors the head's own rows have")
        d = np.concatenate([d, pooled.desc.numpy()])
    return (torch.cat([feats, pooled.feats.to(feats.dtype)]),
            np.concatenate([y_norm, pooled.y_norm]), d, tasks)  # fmt: skip


@dataclass
class GPFit:
    """A GP head on one backbone and its outputs in volts per split: means and predictive
    variances, (1, n) each, shaped like ``heads_volts`` rows."""

    head: GPHead
    means: dict[str, np.ndarray]
    variances: dict[str, np.ndarray]


def fit_gp_volts(
    feats: dict[str, Tensor], desc: dict[str, Tensor] | None, y_train: np.ndarray,
    normalizer: Normalizer, cfg: GPConfig, pooled: PooledRows | None = None,
) -> GPFit:  # fmt: skip
    """Fit a GP head on the training split's pooled vectors (and descriptors, when given; and
    other ions' ``pooled`` rows) and evaluate it on every split: the one routine the Li ensemble
    and transfer learning share."""
    d = desc or {}
    x, y, train_desc, tasks = with_pooled_rows(
        feats["train"], d.get("train"), normalizer.norm(y_train), pooled
    )
    head = fit_gp_head(x, y, cfg, train_desc, tasks)
    log.info("GP head: descriptor weight %.3g of %s, %d training rows",
             float(head.desc_weight), cfg.descriptor_weights, len(y))  # fmt: skip
    means, variances = {}, {}
    with torch.no_grad():
        for s, f in feats.items():
            mean, var = head_mean_var(head, f, d.get(s))
            means[s] = normalizer.denorm(mean.double().numpy())[None]
            variances[s] = var.double().numpy()[None] * normalizer.std**2
    return GPFit(head, means, variances)
