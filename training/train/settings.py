"""The source-ion CGCNN's settings as one object: params.yaml ``model``, ``train`` and ``ensemble``
sections, overridden by the tuning stage's best parameters."""

from __future__ import annotations

from dataclasses import dataclass

from training.train.heads import HeadConfig
from training.train.loop import TrainConfig
from voltage_model.models.cgcnn import CGCNNConfig
from voltage_model.models.gp_head import GPConfig


@dataclass(frozen=True)
class TrainSettings:
    model: CGCNNConfig
    train: TrainConfig
    heads: HeadConfig
    n_models: int = 1
    gp: GPConfig | None = None  # a GP head beside each member's own head (None: none)

    @classmethod
    def from_sections(
        cls, model: dict, train: dict, heads: dict, best: dict | None = None
    ) -> TrainSettings:
        """params.yaml sections, overridden by the tuning stage's best parameters if given."""
        best = best or {}
        heads = dict(heads)
        n_models = int(heads.pop("n_models", 1))
        gp_section = heads.pop("gp", None)
        gp = GPConfig(**gp_section) if gp_section is not None else None
        return cls(
            model=CGCNNConfig.from_dict({**model, **best.get("model", {})}),
            train=TrainConfig.from_dict({**train, **best.get("train", {})}),
            heads=HeadConfig(**heads),
            n_models=n_models,
            gp=gp,
        )
