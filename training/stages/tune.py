"""Stage ``tune``: the Optuna study of the source ion's CGCNN (``training/tune.py``); run it on
several machines against one storage to scale out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import load_params
from training.datasets import load_ion_data
from training.graphs.store import GraphStore
from training.tracking import setup_mlflow
from training.train.settings import TrainSettings
from training.tune import run_tune, study_key


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    splits: Path
    graphs: Path
    out: Path | None = None
    storage: str | None = None  # overrides tune.storage
    n_trials: int | None = None  # trials this worker may start (the total is set by params)
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params).require_ion(opts.ion)
    settings = p.tune
    if opts.storage:
        settings = settings.model_copy(update={"storage": opts.storage})
    base = TrainSettings.from_params(p.model, p.train, p.ensemble)
    settings = settings.model_copy(update={"study_name": study_key(settings, base, opts.splits)})
    setup_mlflow(p.mlflow)
    return run_tune(
        load_ion_data(opts.records, opts.splits, opts.ion), GraphStore.load(opts.graphs), base,
        settings, opts.out, opts.n_trials,
    )  # fmt: skip
