"""Training one ion's CGCNN from scratch on cached graphs: the piece shared by the train, tune,
transfer and chemsys-split stages (which differ only in what they start from and what they log).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import torch

from training.datasets import IonData
from training.graphs.store import GraphStore
from training.train.loaders import loaders
from training.train.loop import FitLoaders, FitResult, TrainConfig, fit
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig
from voltage_model.normalizer import Normalizer


@dataclass
class Trained:
    model: CGCNN
    normalizer: Normalizer
    fit: FitResult


def train_from_scratch(
    data: IonData,
    store: GraphStore,
    model_cfg: CGCNNConfig,
    train_cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
) -> Trained:
    """Fit a fresh CGCNN on the ion's train split, selecting the epoch on validation MAE."""
    normalizer = Normalizer.fit(data.targets("train"))
    return _fit_fresh(data, store, _fresh_model(model_cfg, train_cfg.seed), normalizer, train_cfg,
                      on_epoch)  # fmt: skip


def _fresh_model(model_cfg: CGCNNConfig, seed: int) -> CGCNN:
    """A CGCNN initialised from ``seed`` (the global generator: call on one thread at a time)."""
    torch.manual_seed(seed)
    return CGCNN(model_cfg)


def _fit_fresh(
    data: IonData, store: GraphStore, model: CGCNN, normalizer: Normalizer, cfg: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], Any] | None = None,
) -> Trained:  # fmt: skip
    """``fit`` on the ion's train split with its own seeded loaders, epoch chosen on val."""
    ld = loaders(store, data, cfg.batch_size, cfg.seed)
    result = fit(model, FitLoaders(ld["train"], ld["val"]), cfg, normalizer, on_epoch=on_epoch)
    return Trained(model=model, normalizer=normalizer, fit=result)


def train_side_by_side(
    data: IonData, store: GraphStore, model_cfg: CGCNNConfig, train_cfgs: Sequence[TrainConfig]
) -> list[Trained]:
    """``train_from_scratch`` once per config (e.g. per seed), every run at the same time, each
    on one torch thread; in ``train_cfgs``' order. Epoch histories are in each ``fit``.

    Why: a CGCNN batch is too small for two threads to share its ops well (Li, batch 64, 2 cores:
    358 crystals/s with two threads, 342 with one), while independent runs share out: three Li
    members side by side trained at 567 crystals/s (torch releases the GIL inside its ops). Each
    model is initialised here, in order, from its seed (the global generator is not thread-safe;
    shuffling uses each loader's own), and one thread per run keeps every run deterministic: the
    results equal sequential one-thread runs' bit for bit (tests/training/test_train_stage.py).
    """
    if len(train_cfgs) <= 1:
        return [train_from_scratch(data, store, model_cfg, c) for c in train_cfgs]
    normalizer = Normalizer.fit(data.targets("train"))
    models = [_fresh_model(model_cfg, cfg.seed) for cfg in train_cfgs]

    def run(i: int) -> Trained:
        cfg = replace(train_cfgs[i], num_threads=1)
        return _fit_fresh(data, store, models[i], normalizer, cfg)

    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(len(train_cfgs), thread_name_prefix="cgcnn") as pool:
            return list(pool.map(run, range(len(train_cfgs))))
    finally:
        torch.set_num_threads(threads)
