"""Typed view of ``params.yaml``.

``params.yaml`` is the one home of settings. Each stage parses it into these objects so that a typo
or a wrong type fails loudly at the start of a stage, not halfway through a training run. One class
per section; an unknown section or key is an error. A key left out takes the default its consumer
always took (the runtime configs these feed: ``TrainConfig``, ``CGCNNConfig``, ``HeadConfig``,
``BaselineConfig``, ``GPConfig``). This module imports neither torch nor ``voltage_model``: every
stage, the data stages too, reads it.
"""

from __future__ import annotations

import dataclasses
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


class GPSettings(_Strict):
    """A GP head's kernel and candidate weights: the fields of ``voltage_model``'s ``GPConfig``
    (``training.train.settings.gp_config`` builds it), checked here as it checks them."""

    nu: float = Field(default=0.5, description="Matern smoothness: 0.5, 1.5 or 2.5")
    n_restarts: int = Field(default=0, ge=0, description="optimiser restarts (0: deterministic)")
    descriptor_weights: tuple[float, ...] = Field(
        default=(0.0,), min_length=1, description="candidate composition-descriptor weights"
    )
    select: Literal["likelihood", "validation"] = "likelihood"
    task_weights: tuple[float, ...] = Field(
        default=(1.0,), min_length=1, description="candidate ion-column scales (pooled heads)"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_config(cls, value: Any) -> Any:
        """A ``GPConfig`` instance is taken as its fields."""
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return dataclasses.asdict(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> GPSettings:
        if self.nu not in (0.5, 1.5, 2.5):
            raise ValueError(f"gp nu must be one of (0.5, 1.5, 2.5), got {self.nu}")
        if any(w < 0 for w in self.descriptor_weights):
            raise ValueError(f"gp descriptor_weights must be >= 0, got {self.descriptor_weights}")
        if any(u <= 0 for u in self.task_weights):
            raise ValueError(f"gp task_weights must be > 0, got {self.task_weights}")
        return self


class SVRSettings(_Strict):
    C: float = 10.0
    epsilon: float = Field(default=0.1, description="volts")
    gamma: float | str = 0.02


class KRRSettings(_Strict):
    alpha: float = 0.03
    kernel: str = "laplacian"
    gamma: float | None = Field(default=0.01, description="None: 1 / n_features")


class RFSettings(_Strict):
    n_estimators: int = Field(default=300, ge=1)
    max_depth: int | None = None
    min_samples_leaf: int = Field(default=1, ge=1)
    max_features: float | int | str | None = Field(
        default=1.0, description="a float: the fraction of columns tried per split"
    )
    seed: int = 0
    n_jobs: int = -1


class BaselinesSettings(_Strict):
    """``baselines``: the composition baselines and how they are tuned (``BaselineConfig``)."""

    select: Literal["fixed", "group_cv"] = "group_cv"
    cv_folds: int = Field(default=5, ge=2)
    cv_rf_trees: int | None = Field(
        default=50, ge=1, description="trees per forest in the grid search; None: rf.n_estimators"
    )
    svr: SVRSettings = SVRSettings()
    krr: KRRSettings = KRRSettings()
    rf: RFSettings = RFSettings()
    seeds: list[int] | None = Field(
        default=None, min_length=1, description="forest seeds; None: rf.seed alone"
    )
    svr_grid: dict[str, list[Any]] = {
        "C": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
        "gamma": [0.001, 0.003, 0.01, 0.02, 0.05],
    }
    krr_grid: dict[str, list[Any]] = {
        "alpha": [0.003, 0.01, 0.03, 0.1, 0.3],
        "gamma": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05],
    }
    rf_grid: dict[str, list[Any]] = {"min_samples_leaf": [1, 3], "max_features": [1.0, 0.33]}


class ModelSettings(_Strict):
    """``model``: the CGCNN architecture (``CGCNNConfig``); tuned values override."""

    orig_atom_fea_len: int = Field(default=92, ge=1, description="the atom encoding's width")
    nbr_fea_len: int = Field(default=41, ge=1, description="the graphs' edge width (graph.*)")
    atom_fea_len: int = Field(default=64, ge=1)
    h_fea_len: int = Field(default=128, ge=1)
    n_conv: int = Field(default=3, ge=0)
    n_h: int = Field(default=1, ge=1)


class TrainLoopSettings(_Strict):
    """``train`` (and ``transfer.scratch``): one CGCNN's optimisation (``TrainConfig``)."""

    epochs: int = Field(default=100, ge=1)
    batch_size: int = Field(default=256, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0)
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: Literal["step", "multistep", "cosine", "onecycle", "none"] = "multistep"
    milestones: list[int] = [100]
    gamma: float = 0.1
    step_size: int = 30
    seed: int = 0
    device: str = "cpu"
    log_every: int = Field(default=1, ge=1)
    grad_clip: float | None = None
    num_threads: int | None = Field(default=None, description="None: the cores this process has")
    loss: Literal["mse", "l1", "huber"] = "mse"


class EnsembleSettings(_Strict):
    """``ensemble``: the source model's members and their heads (``HeadConfig``)."""

    n_models: int = Field(default=1, ge=1, description="whole CGCNNs, seeds seed..seed+n-1")
    n_heads: int = Field(default=5, ge=1)
    epochs: int = Field(default=400, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = 1e-4
    bootstrap: bool = True
    patience: int = 60
    seed: int = 0
    gp: GPSettings | None = Field(default=None, description="a GP head per member; None: none")


class ChgnetSettings(_Strict):
    """``transfer.chgnet``: GP heads over frozen CHGNet features and the served variants grouped
    CV may choose from (``gp_cv.choose_variant``)."""

    enabled: bool = True
    gp: GPSettings = GPSettings()
    variants: list[Literal["cgcnn", "chgnet", "average"]] = Field(
        default=["cgcnn", "chgnet", "average"], min_length=1
    )
    cv_folds: int = Field(default=5, ge=2)


class TransferSettings(_Strict):
    """``transfer``: heads over the frozen source backbones, the comparison's seeds and the
    scratch CGCNN."""

    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    bn_modes: list[Literal["adapt", "frozen"]] = ["adapt", "frozen"]
    select_heads: list[Literal["fc", "gp", "gp_alone"]] = Field(default=["gp", "fc"], min_length=1)
    gp: GPSettings = GPSettings()
    pool_cv_folds: int = Field(default=5, ge=0, description="pooling CV folds; 0: always pool")
    chgnet: ChgnetSettings = ChgnetSettings()
    n_heads: int = 3
    epochs: int = 600
    lr: float = 3e-3
    weight_decay: float = 1e-3
    patience: int = 80
    bootstrap: bool = True
    scratch: TrainLoopSettings = TrainLoopSettings(
        epochs=100, batch_size=32, optimizer="adamw", lr=2e-3, weight_decay=1e-4,
        scheduler="cosine",
    )  # fmt: skip


class CvSettings(_Strict):
    """``cv``: the grouped cross-validation check (stage ``cv``)."""

    folds: int = Field(default=5, ge=2)
    backbones: int | None = Field(
        default=None, ge=1, description="GP heads on the first N source backbones; None: all"
    )


class ChemsysSplitSettings(_Strict):
    """The source ion's chemical-system-grouped split check (stage ``chemsys_split``)."""

    epochs: int | None = Field(
        default=None, ge=1, description="CGCNN epochs; None: train.epochs, as the train stage"
    )


class RegistrySettings(_Strict):
    """``registry``: what the register stage does on its own."""

    auto_promote_first: bool = Field(
        default=True, description="promote each ion's first version to champion"
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


class Params(_Strict):
    """The whole ``params.yaml``, one typed section each (in the file's order)."""

    ions: dict[str, IonSettings]
    source_ion: str = "Li"
    data: DataSettings = DataSettings()
    split: SplitSettings = SplitSettings()
    graph: GraphSettings = GraphSettings()
    baselines: BaselinesSettings = BaselinesSettings()
    mlflow: MlflowSettings = MlflowSettings()
    model: ModelSettings = ModelSettings()
    train: TrainLoopSettings = TrainLoopSettings()
    ensemble: EnsembleSettings = EnsembleSettings()
    tune: TuneSettings = TuneSettings()
    transfer: TransferSettings = TransferSettings()
    cv: CvSettings = CvSettings()
    chemsys_split: ChemsysSplitSettings = ChemsysSplitSettings()
    registry: RegistrySettings = RegistrySettings()
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


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate ``params.yaml``; errors name the offending key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    return Params.model_validate(raw)
