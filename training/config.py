"""Typed view of ``params.yaml``.

``params.yaml`` is the one home of settings. Each stage parses it into these objects so that a typo
or a wrong type fails loudly at the start of a stage, not halfway through a training run.
Sections that later stages add (model, train, tune, ...) are parsed by the same ``Params`` object.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class UsageError(Exception):
    """A problem the user can fix (bad option, missing input): the CLI prints it without a
    traceback and exits with status 2."""


class _Strict(BaseModel):
    """Base: unknown keys are errors, so a misspelt setting is never silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class IonSettings(_Strict):
    """Per-ion settings; the ion list itself is the key set of ``Params.ions``."""

    clean_k: float | None = Field(
        default=None, description="keep |V-mean| <= k*sigma; None keeps the ion whole"
    )
    pool: str | None = Field(
        default=None,
        description="ions with the same label pool their training crystals in each other's GP "
        "transfer heads; None: the ion's own crystals only",
    )

    @field_validator("clean_k")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError("clean_k must be a positive number or null")
        return v


class DataSettings(_Strict):
    source: Literal["auto", "snapshot", "mp_api"] = "auto"
    snapshot_dir: Path = Path("../shared/data/mp_electrodes_2020")
    workers: int = Field(default=2, ge=1)


class SplitSettings(_Strict):
    train: float = Field(default=0.8, gt=0, lt=1)
    val: float = Field(default=0.1, gt=0, lt=1)
    test: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 42

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitSettings:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError("split fractions train + val + test must sum to 1")
        return self

    def fractions(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}


class GraphSettings(_Strict):
    radius: float = Field(default=8.0, gt=0)
    max_neighbors: int = Field(default=12, ge=1)
    gaussian_dmin: float = 0.0
    gaussian_dmax: float = 8.0
    gaussian_step: float = Field(default=0.2, gt=0)
    gaussian_width: float = Field(default=0.2, gt=0)


class ChemsysSplitSettings(_Strict):
    """The source ion's chemical-system-grouped split check (stage ``chemsys_split``)."""

    epochs: int | None = Field(
        default=None, ge=1, description="CGCNN epochs; None: train.epochs, as the train stage"
    )


class MlflowSettings(_Strict):
    """``mlflow``: the tracking store and the registered models' name prefix."""

    tracking_uri: str | None = None
    experiment: str = "electrode-voltage"
    artifact_location: str | None = None
    model_name_prefix: str = "electrode-voltage"

class FloatRange(_Strict):
    low: float
    high: float
    log: bool = False


class SearchSpace(_Strict):
    """Each key is a train.* or model.* setting; ranges or lists of choices."""

    lr: FloatRange = FloatRange(low=5e-4, high=5e-3, log=True)
    weight_decay: FloatRange = FloatRange(low=1e-6, high=1e-3, log=True)
    batch_size: list[int] = [32, 64, 128]
    atom_fea_len: list[int] = [64]
    h_fea_len: list[int] = [64, 128]
    n_conv: list[int] = [3]


class TuneSettings(_Strict):
    """``tune``: the Optuna study of the source ion's CGCNN."""

    study_name: str = "cgcnn-Li"
    storage: str | None = None
    n_trials: int = Field(default=8, ge=1)
    epochs: int = Field(default=30, ge=1)
    pruner: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = 2
    n_warmup_steps: int = 8
    sampler_seed: int = 0
    space: SearchSpace = SearchSpace()

class InterpretSettings(_Strict):
    """``interpret``: what the interpretation stage fits and plots."""


    head_target: Literal["dft", "model"] = "dft"  # fit local voltages to DFT or to the model
    ridge: float = Field(default=0.0, ge=0)
    o_bond_tolerance: float = Field(default=1.3, gt=0)
    min_o_neighbors: int = Field(default=2, ge=1)
    min_sites_per_element: int = Field(default=5, ge=1)
    tsne_max_points: int = Field(default=3000, ge=10)
    tsne_perplexity: float = Field(default=30.0, gt=0)
    batch_size: int = Field(default=128, ge=1)
    seed: int = 0


class Params(BaseModel):
    """The whole ``params.yaml``. Sections owned by later stages are validated by their stage."""

    model_config = ConfigDict(extra="allow", frozen=True)

    ions: dict[str, IonSettings]
    source_ion: str = "Li"
    data: DataSettings = DataSettings()
    split: SplitSettings = SplitSettings()
    graph: GraphSettings = GraphSettings()
    chemsys_split: ChemsysSplitSettings = ChemsysSplitSettings()
    mlflow: MlflowSettings = MlflowSettings()
    tune: TuneSettings = TuneSettings()
    interpret: InterpretSettings = InterpretSettings()

    @model_validator(mode="after")
    def _source_ion_enabled(self) -> Params:
        if not self.ions:
            raise ValueError("params.ions must list at least one working ion")
        if self.source_ion not in self.ions:
            raise ValueError(f"source_ion {self.source_ion!r} is not among ions {list(self.ions)}")
        return self

    @property
    def ion_names(self) -> list[str]:
        return list(self.ions)

    def pool_partners(self, ion: str) -> list[str]:
        """The other target ions sharing ``ion``'s pool label, in ``ions`` order (never the
        source ion: its backbone was trained on its own training crystals, whose pooled vectors
        fit their targets better than any other ion's will)."""
        label = self.ions[ion].pool
        if label is None or ion == self.source_ion:
            return []
        return [i for i, s in self.ions.items()
                if s.pool == label and i not in (ion, self.source_ion)]  # fmt: skip

    def require_ion(self, ion: str) -> Params:
        """``self``, or a ``UsageError`` when ``ion`` is not enabled."""
        if ion not in self.ions:
            raise UsageError(f"ion {ion!r} is not enabled in params.yaml (ions: {self.ion_names})")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A section as a dict: a typed one dumped, else the raw section (parsed by its stage)."""
        typed = getattr(self, name, None) if name in type(self).model_fields else None
        if isinstance(typed, BaseModel):
            return typed.model_dump()
        extra = self.model_extra or {}
        if name not in extra:
            raise KeyError(f"params.yaml has no section {name!r}")
        return extra[name]


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return Params.model_validate(raw)
