"""Optuna tuning: pruning on a tiny study, two workers sharing one storage, MLflow nesting."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import optuna
import pytest
import yaml
from conftest import REPO

from training.datasets import load_ion_data
from training.graphs.store import GraphStore
from training.tracking import MlflowSettings, setup_mlflow
from training.train.heads import HeadConfig
from training.train.loop import TrainConfig
from training.train.settings import TrainSettings
from training.tune import TuneSettings, run_tune
from voltage_model.models.cgcnn import CGCNNConfig

TINY_MODEL = {"atom_fea_len": 16, "h_fea_len": 16, "n_conv": 1}
SPACE = {
    "lr": {"low": 1e-6, "high": 0.3, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-3, "log": True},
    "batch_size": [8, 16],
    "atom_fea_len": [16],
    "h_fea_len": [8, 16],
    "n_conv": [1],
}


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    yield exp
    mlflow.set_tracking_uri(None)


def test_tiny_study_prunes_and_nests_runs(tiny_data, tmp_path, mlflow_store):
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    base = TrainSettings(
        model=CGCNNConfig(**TINY_MODEL),
        train=TrainConfig(epochs=6, batch_size=8, optimizer="adamw", lr=1e-3, scheduler="none"),
        heads=HeadConfig(),
    )
    settings = TuneSettings.model_validate({
        "study_name": "tiny", "storage": f"sqlite:///{tmp_path / 'optuna.db'}", "n_trials": 8,
        "epochs": 6, "pruner": "median", "n_startup_trials": 2, "n_warmup_steps": 1,
        "sampler_seed": 3, "space": SPACE,
    })  # fmt: skip
    best = run_tune(data, GraphStore.load(tiny_data["graphs"]), base, settings, tmp_path / "b.json")
    study = optuna.load_study(study_name="tiny", storage=settings.storage)
    states = [t.state for t in study.trials]
    assert len(states) == 8
    assert optuna.trial.TrialState.PRUNED in states, states
    assert all(len(t.intermediate_values) >= 1 for t in study.trials)
    assert best["value"] == pytest.approx(study.best_value)
    assert set(best["train"]) == {"lr", "weight_decay", "batch_size"}
    assert (tmp_path / "b.json").is_file()
    # One parent run, one nested run per trial.
    runs = mlflow.search_runs(experiment_ids=[mlflow_store], output_format="list")
    parents = [r for r in runs if r.data.tags.get("stage") == "tune"]
    children = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert len(parents) == 1 and len(children) == 8
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    # A rerun (dvc repro after a code change) finds the budget spent and adds no trial.
    again = run_tune(data, GraphStore.load(tiny_data["graphs"]), base, settings, None)
    assert len(optuna.load_study(study_name="tiny", storage=settings.storage).trials) == 8
    assert again["value"] == best["value"] and again["trial"] == best["trial"]


def test_two_workers_share_one_study(tiny_data, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ions"] = {"Li": {"clean_k": None}, "Na": {"clean_k": None}, "Mg": {"clean_k": None}}
    params["model"].update(TINY_MODEL)
    params["tune"].update({"study_name": "two", "n_trials": 4, "epochs": 2, "space": SPACE})
    params["tune"]["storage"] = f"sqlite:///{tmp_path / 'optuna.db'}"
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params["mlflow"]["artifact_location"] = (tmp_path / "art").as_uri()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        sys.executable, "-m", "training.cli", "tune", "--ion", "Li",
        "--records", str(tiny_data["clean"]), "--splits", str(tiny_data["splits"]),
        "--graphs", str(tiny_data["graphs"]), "--params", str(tmp_path / "params.yaml"),
    ]  # fmt: skip
    # The MLflow store is created first: two processes creating one sqlite schema at once race.
    setup_mlflow(MlflowSettings.model_validate(params["mlflow"]))
    mlflow.set_tracking_uri(None)
    procs = [subprocess.Popen(cmd, env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-3000:] for e in errs]
    (name,) = optuna.get_all_study_names(params["tune"]["storage"])
    assert name.startswith("two-")
    study = optuna.load_study(study_name=name, storage=params["tune"]["storage"])
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 4 <= len(finished) <= 5  # the budget is global; one in-flight trial may overshoot
    # A trial drawn past the budget is marked surplus before it records a worker.
    workers = {t.user_attrs["worker"] for t in study.trials if "surplus" not in t.user_attrs}
    assert len(workers) == 2, workers
    # Both workers wrote the best to the shared parent run; it holds the study's final best.
    client = mlflow.MlflowClient(params["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
    (parent,) = [r for r in client.search_runs([exp.experiment_id])
                 if r.data.tags.get("stage") == "tune"]  # fmt: skip
    assert parent.data.tags["best.train.lr"] == str(study.best_params["lr"])
