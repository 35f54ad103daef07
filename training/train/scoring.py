"""Scoring any predictor (volts out) on one ion's splits, in split-file order: a fresh, a
fine-tuned and a loaded CGCNN all get the same metrics and per-battery predictions, so the train,
transfer and chemsys-split stages report numbers that compare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from training.train.loaders import SPLITS, split_loader
from training.train.loop import predict
from training.train.metrics import regression_metrics
from voltage_model.normalizer import Normalizer


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
