"""Transfer learning per ion and the paper's comparison, honestly measured.

For a target ion the source (Li) checkpoint's backbones (embedding + convolutions, every ensemble
member) are frozen; only the heads (``conv_to_fc`` .. ``fc_out``) are fine-tuned, on pooled features
computed once per structure, with the normaliser refitted on the ion's training split.

Every method is selected on validation only and scored once on the same grouped test split, over
several seeds: mean predictor, the source model unchanged, the source model plus a constant offset
fitted on the ion's training split, CGCNN from scratch on the ion alone, and transfer learning.
(The composition baselines come from the ``baselines`` stage, on the same ids.)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from training.datasets import IonData
from training.graphs.store import GraphStore
from training.model.artifact import LoadedModel
from training.model.cgcnn import CGCNN, CGCNNConfig, Head
from training.train.core import model_predictor, score, split_loader, train_from_scratch
from training.train.heads import (
    HeadConfig,
    adapt_batchnorm,
    fit_heads,
    heads_volts,
    pooled_features,
)
from training.train.loop import TrainConfig
from training.train.metrics import regression_metrics
from training.train.normalizer import Normalizer
from training.train.uncertainty import calibration, fit_std_scale

log = logging.getLogger(__name__)
BnMode = Literal["adapt", "frozen"]


class TransferSettings(BaseModel):
    """params.yaml ``transfer``: heads fine-tuning, the comparison's seeds and scratch training."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    bn_modes: list[Literal["adapt", "frozen"]] = ["adapt", "frozen"]
    n_heads: int = 3
    epochs: int = 600
    lr: float = 3e-3
    weight_decay: float = 1e-3
    patience: int = 80
    bootstrap: bool = True
    scratch: dict = Field(
        default_factory=lambda: {"epochs": 100, "batch_size": 32, "optimizer": "adamw", "lr": 2e-3,
                                 "weight_decay": 1e-4, "scheduler": "cosine"}
    )  # fmt: skip

    def head_config(self, seed: int) -> HeadConfig:
        return HeadConfig(
            n_heads=self.n_heads, epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay,
            bootstrap=self.bootstrap, patience=self.patience, seed=seed,
        )  # fmt: skip


@dataclass
class Member:
    """One adapted backbone with its fine-tuned heads."""

    model: CGCNN
    heads: list[Head]
    preds: dict[str, np.ndarray]  # split -> (K, n) volts


@dataclass
class TransferResult:
    members: list[Member]
    normalizer: Normalizer
    bn_mode: str
    seed: int

    def mean_std(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        stacked = np.concatenate([m.preds[split] for m in self.members], axis=0)
        return stacked.mean(axis=0), stacked.std(axis=0)


def transfer(
    source: LoadedModel,
    data: IonData,
    store: GraphStore,
    cfg: TransferSettings,
    bn_mode: BnMode,
    seed: int,
) -> TransferResult:
    """Freeze every source backbone, fine-tune heads on the target ion (normaliser refitted)."""
    normalizer = Normalizer.fit(data.targets("train"))
    loaders = {s: split_loader(store, data, s) for s in data.parts}
    members = []
    for i, (src_model, src_heads) in enumerate(source.backbones()):
        model = copy.deepcopy(src_model)
        if bn_mode == "adapt":
            adapt_batchnorm(model, loaders["train"])
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        feats = {s: pooled_features(model, ld) for s, ld in loaders.items()}
        start = src_heads[0] if src_heads else Head.from_model(src_model)
        heads = fit_heads(
            start, feats["train"], data.targets("train"), feats["val"], data.targets("val"),
            normalizer, cfg.head_config(seed * 100 + i),
        )  # fmt: skip
        preds = {s: heads_volts(heads, f, normalizer) for s, f in feats.items()}
        members.append(Member(model=model, heads=heads, preds=preds))
    return TransferResult(members=members, normalizer=normalizer, bn_mode=bn_mode, seed=seed)


def source_predictions(
    source: LoadedModel, data: IonData, store: GraphStore
) -> dict[str, np.ndarray]:
    """The source model applied unchanged (its own normaliser), per split."""
    out = {}
    for split in data.parts:
        preds = [
            source.predict_with_std(b)[0].double().numpy() for b in split_loader(store, data, split)
        ]
        out[split] = np.concatenate(preds) if preds else np.empty(0)
    return out


def scratch_cgcnn(
    data: IonData, store: GraphStore, model_cfg: CGCNNConfig, cfg: TransferSettings, seed: int
) -> dict[str, np.ndarray]:
    """CGCNN trained from scratch on the target ion alone: test predictions per split."""
    train_cfg = replace(TrainConfig.from_dict(cfg.scratch), seed=seed)
    trained = train_from_scratch(data, store, model_cfg, train_cfg)
    scored = score(model_predictor(trained.model, trained.normalizer), data, store)
    return {s: np.array([scored.predictions[s][b] for b in data.ids(s)]) for s in data.parts}


def metrics_by_split(data: IonData, preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {s: regression_metrics(data.targets(s), p) for s, p in preds.items()}


def uncertainty_report(data: IonData, result: TransferResult) -> dict[str, float]:
    """Std rescaled on validation only; calibration reported on test."""
    vm, vs = result.mean_std("val")
    scale = fit_std_scale(data.targets("val"), vm, vs)
    tm, ts = result.mean_std("test")
    return {"std_scale": scale, **calibration(data.targets("test"), tm, ts * scale)}
