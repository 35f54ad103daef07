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
from training.model.cgcnn import CGCNN, Head
from training.model.descriptors import store_descriptors
from training.model.gp_head import GPConfig, GPHead, fit_gp_head, head_mean_var
from training.train.normalizer import Normalizer

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


def fit_heads(
    start: Head,
    train_x: Tensor,
    train_y: np.ndarray,
    val_x: Tensor,
    val_y: np.ndarray,
    normalizer: Normalizer,
    cfg: HeadConfig,
) -> list[Head]:
    """K heads, each fine-tuned from ``start`` on a (bootstrap) resample of the training rows."""
    y = torch.as_tensor(normalizer.norm(np.asarray(train_y, np.float64)), dtype=torch.float32)
    yv = torch.as_tensor(normalizer.norm(np.asarray(val_y, np.float64)), dtype=torch.float32)
    rng = np.random.default_rng(cfg.seed)
    heads = []
    with single_thread():
        for k in range(cfg.n_heads):
            heads.append(_one_head(start, k, rng, train_x, y, val_x, yv, cfg))
    return heads


def _one_head(
    start: Head,
    k: int,
    rng: np.random.Generator,
    train_x: Tensor,
    y: Tensor,
    val_x: Tensor,
    yv: Tensor,
    cfg: HeadConfig,
) -> Head:
    """Head k: a bootstrap resample, and (k > 0) a slightly perturbed start."""
    torch.manual_seed(cfg.seed * 1000 + k)
    boot = cfg.bootstrap and cfg.n_heads > 1
    idx = rng.integers(0, len(y), len(y)) if boot else np.arange(len(y))
    head = copy.deepcopy(start)
    if k > 0:  # perturb the start so heads do not collapse onto one solution
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.01 * torch.randn_like(p))
    return _fit_one(head, train_x[idx], y[idx], val_x, yv, cfg)


@torch.no_grad()
def heads_volts(heads: list[Head], x: Tensor, normalizer: Normalizer) -> np.ndarray:
    """Predictions in volts of every head, (K, n), for pooled features ``x``."""
    for h in heads:
        h.eval()
    preds = torch.stack([h(x) for h in heads]).double().numpy()
    return normalizer.denorm(preds)


def split_descriptors(
    store: GraphStore, data: IonData, cfg: GPConfig
) -> dict[str, Tensor] | None:
    """Composition descriptors of every split's crystals, when ``cfg`` offers them to GP heads
    (computed once per ion and shared by every backbone's head)."""
    if not cfg.uses_descriptors:
        return None
    return {s: torch.from_numpy(store_descriptors(store, data.host_ids(s))) for s in data.parts}


@dataclass
class GPFit:
    """A GP head on one backbone and its outputs in volts per split: means and predictive
    variances, (1, n) each, shaped like ``heads_volts`` rows."""

    head: GPHead
    means: dict[str, np.ndarray]
    variances: dict[str, np.ndarray]


def fit_gp_volts(
    feats: dict[str, Tensor], desc: dict[str, Tensor] | None, y_train: np.ndarray,
    normalizer: Normalizer, cfg: GPConfig,
) -> GPFit:  # fmt: skip
    """Fit a GP head on the training split's pooled vectors (and descriptors, when given) and
    evaluate it on every split: the one routine the Li ensemble and transfer learning share."""
    d = desc or {}
    train_desc = d["train"].numpy() if "train" in d else None
    head = fit_gp_head(feats["train"], normalizer.norm(y_train), cfg, train_desc)
    log.info("GP head: descriptor weight %.3g of %s", float(head.desc_weight),
             cfg.descriptor_weights)  # fmt: skip
    means, variances = {}, {}
    with torch.no_grad():
        for s, f in feats.items():
            mean, var = head_mean_var(head, f, d.get(s))
            means[s] = normalizer.denorm(mean.double().numpy())[None]
            variances[s] = var.double().numpy()[None] * normalizer.std**2
    return GPFit(head, means, variances)
