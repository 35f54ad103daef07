"""The source-ion CGCNN's settings as one object: params.yaml ``model``, ``train`` and ``ensemble``
sections, overridden by the tuning stage's best parameters; and the GP heads' runtime config from
their params.yaml settings."""

from __future__ import annotations

from dataclasses import dataclass

from training.config import EnsembleSettings, GPSettings, ModelSettings, TrainLoopSettings
from training.train.heads import HeadConfig
from training.train.loop import TrainConfig
from voltage_model.models.cgcnn import CGCNNConfig
from voltage_model.models.gp_head import GPConfig


def gp_config(settings: GPSettings | GPConfig) -> GPConfig:
    """A GP head's runtime config (``voltage_model``) from its params.yaml settings (a config
    already, e.g. set with ``model_copy(update=...)``, passes as it is)."""
    if isinstance(settings, GPConfig):
        return settings
    return GPConfig(**settings.model_dump())


@dataclass(frozen=True)
class TrainSettings:
    model: CGCNNConfig
    train: TrainConfig
    heads: HeadConfig
    n_models: int = 1
    gp: GPConfig | None = None  # a GP head beside each member's own head (None: none)

    @classmethod
    def from_params(
        cls, model: ModelSettings, train: TrainLoopSettings,
        ensemble: EnsembleSettings | None = None, best: dict | None = None,
    ) -> TrainSettings:  # fmt: skip
        """The typed sections (``ensemble`` None: one member, default heads, no GP head),
        overridden by the tuning stage's best parameters if given."""
        heads = {} if ensemble is None else ensemble.model_dump()
        return cls.from_sections(model.model_dump(), train.model_dump(), heads, best)

    @classmethod
    def from_sections(
        cls, model: dict, train: dict, heads: dict, best: dict | None = None
    ) -> TrainSettings:
        """Section dicts (as ``from_params`` dumps them; the tuning trials merge their samples
        into these), overridden by the tuning stage's best parameters if given."""
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
