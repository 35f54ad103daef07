"""Training one ion's model from cached graphs: the piece shared by the train, tune and
transfer stages (which differ only in what they start from and what they log).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from training.train.loop import FitResult, TrainConfig, fit, predict
from training.train.metrics import regression_metrics
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig
from voltage_model.normalizer import Normalizer

SPLITS = ("train", "val", "test")


def loaders(store: GraphStore, data: IonData, batch_size: int, seed: int) -> dict[str, GraphLoader]:
    """One loader per split; items are (charged_id, target) since graphs are keyed by host."""
    out = {}
    for split in SPLITS:
        items = list(zip(data.host_ids(split), data.targets(split).tolist(), strict=True))
        out[split] = GraphLoader(
            store, items, batch_size=batch_size, shuffle=split == "train", seed=seed
        )
    return out


def split_loader(store: GraphStore, data: IonData, split: str) -> GraphLoader:
    """An evaluation loader over one split, in split-file order (no shuffling)."""
    items = list(zip(data.host_ids(split), data.targets(split).tolist(), strict=True))
    return GraphLoader(store, items, batch_size=512, shuffle=False)


@dataclass
class Scored:
    """Metrics per split (volts) and the test predictions, keyed by battery id."""

    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, float]] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        return {f"{s}_{k}": v for s, m in self.metrics.items() for k, v in m.items()}


def score(
    predict_fn: Callable[[GraphLoader], np.ndarray],
    data: IonData,
    store: GraphStore,
    splits: tuple[str, ...] = SPLITS,
) -> Scored:
    """Score any predictor (volts out) on each split, in split-file order."""
    out = Scored(metrics={})
    for split in splits:
        y_pred = predict_fn(split_loader(store, data, split))
        out.metrics[split] = regression_metrics(data.targets(split), y_pred)
        out.predictions[split] = dict(zip(data.ids(split), y_pred.tolist(), strict=True))
    return out


def model_predictor(model: torch.nn.Module, normalizer: Normalizer):
    def _predict(loader: GraphLoader) -> np.ndarray:
        return predict(model, loader, normalizer)[2]

    return _predict


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
    result = fit(model, ld["train"], ld["val"], train_cfg, normalizer, on_epoch=on_epoch)
    return Trained(model=model, normalizer=normalizer, fit=result)
