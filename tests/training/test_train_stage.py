"""The training stage end to end on tiny data: checkpoint, metrics, MLflow run and pyfunc model."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from pymatgen.io.cif import CifWriter

from training.datasets import load_ion_data
from training.graphs.store import GraphStore
from training.stages.train import TrainPaths, run_train_stage
from training.tracking import MlflowSettings
from training.train.heads import HeadConfig
from training.train.loop import TrainConfig
from training.train.settings import TrainSettings
from voltage_model.models.cgcnn import CGCNNConfig
from voltage_model.predict import VoltageModel


@pytest.fixture
def settings() -> TrainSettings:
    return TrainSettings(
        model=CGCNNConfig(atom_fea_len=16, h_fea_len=16, n_conv=2),
        train=TrainConfig(epochs=25, batch_size=8, optimizer="adamw", lr=3e-3, scheduler="none"),
        heads=HeadConfig(n_heads=2, epochs=50),
        n_models=2,
    )


def test_train_stage_logs_everything(tiny_data, tmp_path, settings, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mls = MlflowSettings(
        tracking_uri=uri, experiment="exp", artifact_location=(tmp_path / "art").as_uri()
    )
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    ckpt, metrics, plot = tmp_path / "m.pt", tmp_path / "m.json", tmp_path / "p.png"
    report = run_train_stage(data, store, settings, mls, TrainPaths(ckpt, metrics, plot))
    try:
        # Learning: the loss falls and the model beats the mean predictor on its training data.
        run = mlflow.get_run(report["run_id"])
        client = mlflow.MlflowClient()
        losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert losses[-1] < losses[0]
        y = data.targets("train")
        mean_mae = float(np.mean(np.abs(y - y.mean())))
        assert report["single_model"]["train"]["mae"] < mean_mae
        # MLflow: params, per-epoch and final metrics, tags, artifacts.
        assert run.data.params["model.atom_fea_len"] == "16"
        assert "ensemble_test_mae" in run.data.metrics
        assert run.data.tags["git_commit"]
        assert run.data.tags["ion"] == "Li"
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"p.png", "m.json"} <= names
        assert json.loads(metrics.read_text())["test_mae"] == report["test_mae"]
        # The pyfunc model loads and predicts like the checkpoint it wraps.
        model = mlflow.pyfunc.load_model(report["model_uri"])
        structures = [r.structure() for r in data.parts["test"][:3]]
        frame = pd.DataFrame(
            {"structure": [str(CifWriter(s)) for s in structures], "format": ["cif"] * 3}
        )
        out = model.predict(frame)
        direct = VoltageModel.from_checkpoint(ckpt).predict(structures)
        assert list(out.columns) == ["voltage", "uncertainty"]
        np.testing.assert_allclose(out["voltage"], [p.voltage for p in direct], atol=1e-4)
        assert (out["uncertainty"] > 0).all()
    finally:
        mlflow.set_tracking_uri(None)


def test_checkpoint_is_self_describing(tiny_data, tmp_path, settings):
    import torch

    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    mls = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="e")
    ckpt = tmp_path / "m.pt"
    try:
        paths = TrainPaths(ckpt, tmp_path / "a.json", tmp_path / "a.png")
        run_train_stage(data, store, settings, mls, paths, log_model=False)
    finally:
        mlflow.set_tracking_uri(None)
    payload = torch.load(ckpt, weights_only=True)
    assert payload["model_config"]["atom_fea_len"] == 16
    assert payload["converter"]["radius"] == 8.0
    assert {"mean", "std"} <= set(payload["normalizer"])
    assert len(payload["heads"]) == 2 and len(payload["members"]) == 1
    assert payload["extra"]["ion"] == "Li" and payload["extra"]["train_elements"]


def test_gp_heads_beside_member_heads_are_served_as_scored(tiny_data, tmp_path, settings):
    """With ``ensemble.gp`` every member also carries a GP head, their descriptor weight chosen
    on validation; the saved model served on structures reproduces the stage's ensemble metrics,
    and its std includes the GP variance."""
    from dataclasses import replace

    from voltage_model.models.gp_head import GPConfig, GPHead

    gp = GPConfig(descriptor_weights=(0.0, 1.0), select="validation")
    gp_settings = replace(settings, gp=gp)
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    mls = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment="e")
    ckpt = tmp_path / "m.pt"
    try:
        paths = TrainPaths(ckpt, tmp_path / "a.json", tmp_path / "a.png")
        report = run_train_stage(data, store, gp_settings, mls, paths, log_model=False)
    finally:
        mlflow.set_tracking_uri(None)
    served = VoltageModel.from_checkpoint(ckpt)
    for _, heads in served.loaded.backbones():
        assert [type(h).__name__ for h in heads] == ["Head", "Head", "GPHead"]
        assert isinstance(heads[-1], GPHead)
    preds = served.predict([r.structure() for r in data.parts["test"]])
    got = np.array([p.voltage for p in preds])
    mae = float(np.mean(np.abs(got - data.targets("test"))))
    assert mae == pytest.approx(report["ensemble"]["test"]["mae"], abs=1e-4)
    assert all(p.uncertainty > 0 for p in preds)
    # Validation chose one weight for every member: the one whose ensemble scored best there.
    scores = report["gp_heads"]["val_mae_by_weight"]
    assert set(scores) == {"0.0", "1.0"}
    chosen = min(scores, key=scores.get)
    assert report["gp_heads"]["descriptor_weights"] == [float(chosen)] * 2
    assert scores[chosen] == pytest.approx(report["ensemble"]["val"]["mae"], abs=1e-4)
    assert TrainSettings.from_sections(
        {},
        {},
        {
            "n_models": 2,
            "gp": {"nu": 1.5, "descriptor_weights": [0.0, 0.5], "select": "validation"},
        },
    ).gp == GPConfig(nu=1.5, descriptor_weights=(0.0, 0.5), select="validation")


def test_side_by_side_runs_equal_one_thread_runs_and_learn(tiny_data) -> None:
    """Seeds trained at the same time give what each gives alone on one thread, bit for bit."""
    import torch

    from training.train.scratch import train_from_scratch, train_side_by_side

    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    model = CGCNNConfig(atom_fea_len=16, h_fea_len=16, n_conv=2)
    cfgs = [TrainConfig(epochs=12, batch_size=8, optimizer="adamw", lr=3e-3, scheduler="cosine",
                        seed=s, num_threads=1) for s in (3, 4, 5)]  # fmt: skip
    threads = torch.get_num_threads()
    together = train_side_by_side(data, store, model, cfgs)
    assert torch.get_num_threads() == threads  # the caller's thread count is back
    try:
        alone = [train_from_scratch(data, store, model, c) for c in cfgs]
    finally:
        torch.set_num_threads(threads)  # fit set one thread for the rest of this process
    for a, b in zip(together, alone, strict=True):
        assert [h["train_loss"] for h in a.fit.history] == [h["train_loss"] for h in b.fit.history]
        for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values(),
                             strict=True):  # fmt: skip
            assert torch.equal(x, y), k
        losses = [h["train_loss"] for h in a.fit.history]
        assert losses[-1] < 0.7 * losses[0]  # each run learns
    assert not torch.equal(together[0].model.fc_out.weight, together[1].model.fc_out.weight)
