"""Training one ion's CGCNN from scratch on cached graphs: the piece shared by the train, tune,
transfer and chemsys-split stages (which differ only in what they start from and what they log).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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
    torch.manual_seed(train_cfg.seed)
    normalizer = Normalizer.fit(data.targets("train"))
    model = CGCNN(model_cfg)
    ld = loaders(store, data, train_cfg.batch_size, train_cfg.seed)
    result = fit(
        model, FitLoaders(ld["train"], ld["val"]), train_cfg, normalizer, on_epoch=on_epoch
    )
    return Trained(model=model, normalizer=normalizer, fit=result)
