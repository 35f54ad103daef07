"""The selection protocol (docs/protocol.md): nothing decided or served depends on test labels,
and the primary comparison is computed as stated."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from training.data.ion_inputs import IonInputs
from training.datasets import IonData, load_ion_data
from training.graphs.store import GraphStore
from training.protocol import best_baseline, holm, paired_test, primary_table
from training.stages.ion_model import evaluate_target, save_transfer_checkpoint


def _scrambled(data: IonData, splits: tuple[str, ...], seed: int = 0) -> IonData:
    """The same crystals with their targets in ``splits`` permuted and shifted by 3 V."""
    rng = np.random.default_rng(seed)
    out = copy.deepcopy(data)
    for s in splits:
        volts = [r.battery_avg_voltage for r in out.parts[s]]
        perm = rng.permutation(len(volts))
        out.parts[s] = [dataclasses.replace(r, battery_avg_voltage=volts[i] + 3.0)
                        for r, i in zip(out.parts[s], perm, strict=True)]  # fmt: skip
    return out


def _same(a: Any, b: Any, path: str = "") -> None:
    """Deep equality of checkpoint payloads (tensors exactly equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


DECISIONS = ("head", "bn_mode", "descriptor_weights", "pool_ions", "pool_selection",
             "served_variant", "variant_selection")  # fmt: skip


def test_no_decision_or_served_artifact_reads_test_labels(source, tiny_data, transfer_cfg,
                                                          chgnet_features, tmp_path):  # fmt: skip
    """Scrambling the ion's test targets (and its partner's val/test targets) changes no
    decision of the ion_model stage (CGCNN heads, pooling, and the CGCNN / CHGNet / average
    choice) and not one byte of meaning in the served checkpoint; the test figure itself does
    change, so the scrambling reached the stage."""
    mg, na, li = (load_ion_data(tiny_data["clean"], tiny_data["splits"], i)
                  for i in ("Mg", "Na", "Li"))  # fmt: skip
    store = GraphStore.load(tiny_data["graphs"])
    hosts = frozenset(li.host_ids("train"))
    runs = {}
    for name, (ion, partner) in {
        "real": (mg, na),
        "scrambled": (_scrambled(mg, ("test",)), _scrambled(na, ("val", "test"), seed=1)),
    }.items():
        inputs = IonInputs(ion, store, "Li", [partner], hosts, chgnet_features)
        target = evaluate_target(inputs, source, transfer_cfg)
        report = target.report
        ckpt = tmp_path / f"{name}.pt"
        save_transfer_checkpoint(ckpt, target, source, ion, run_id="run")
        runs[name] = (report, torch.load(ckpt, weights_only=True))
    (real, real_ckpt), (scr, scr_ckpt) = runs["real"], runs["scrambled"]
    assert real["test_mae"] != pytest.approx(scr["test_mae"])
    for key in DECISIONS:  # (JSON: NaN standard errors compare equal)
        assert json.dumps(real[key], sort_keys=True) == json.dumps(scr[key], sort_keys=True), key
    assert real["uncertainty"]["std_scale"] == scr["uncertainty"]["std_scale"]
    assert real["pool_selection"]["n_scored"] <= real["pool_selection"]["n"]
    assert set(real["variant_selection"]["cv_mae"]) == {"cgcnn", "chgnet", "average"}
    assert "chgnet_gp" in real["methods"] and "served" in real["methods"]
    _same(real_ckpt, scr_ckpt)


def test_holm_matches_the_step_down_rule():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.20}
    adj = holm(p)
    assert adj["a"] == pytest.approx(0.04)  # 4 x 0.01
    assert adj["c"] == pytest.approx(0.09)  # 3 x 0.03
    assert adj["b"] == pytest.approx(0.09)  # max(2 x 0.04, previous 0.09)
    assert adj["d"] == pytest.approx(0.20)
    assert all(adj[k] >= p[k] for k in p)


def test_paired_test_sign_and_significance():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, 200)
    better = paired_test(base - 0.05, base)
    assert better["diff"] == pytest.approx(-0.05) and better["p"] < 1e-6
    noise = paired_test(base + rng.normal(0, 0.05, 200), base)
    assert noise["p"] > 1e-3 and noise["n"] == 200


def _write_ion(root: Path, ion: str, cv_mae: dict[str, float], test_bias: dict[str, float],
               head: str = "gp") -> None:  # fmt: skip
    """Reports of one ion as the pipeline writes them: metrics JSONs, test and CV CSVs."""
    rng = np.random.default_rng(len(ion))
    (root / "metrics").mkdir(exist_ok=True)
    (root / "predictions").mkdir(exist_ok=True)
    (root / "cv").mkdir(exist_ok=True)
    (root / "metrics" / f"baselines_{ion}.json").write_text(
        json.dumps({"ion": ion, "cv_mae": cv_mae})
    )
    (root / "metrics" / f"ion_{ion}.json").write_text(json.dumps({"ion": ion, "head": head}))
    y = rng.uniform(1, 4, 40)
    served = "transfer" if ion != "Li" else "cgcnn"
    rows = ["battery_id,target," + served] + [f"b{i},{t},{t + 0.1}" for i, t in enumerate(y)]
    (root / "predictions" / f"ion_{ion}.csv").write_text("\n".join(rows) + "\n")
    names = list(cv_mae)
    rows = ["battery_id,target," + ",".join(names)]
    rows += [f"b{i},{t}," + ",".join(str(t + test_bias[n]) for n in names)
             for i, t in enumerate(y)]  # fmt: skip
    (root / "predictions" / f"baselines_{ion}.csv").write_text("\n".join(rows) + "\n")
    cols = ["transfer_gp", "transfer_gp_alone", *names]
    rows = ["battery_id,grouping,fold,scored,target," + ",".join(cols)]
    for grouping in ("host", "chemsys"):
        for i, t in enumerate(y):
            preds = [t + 0.1, t + 0.3, *(t + 0.2 for _ in names)]
            rows.append(f"b{i},{grouping},{i % 5},{int(i % 4 != 0)},{t}," +
                        ",".join(str(v) for v in preds))  # fmt: skip
    (root / "cv" / f"{ion}.csv").write_text("\n".join(rows) + "\n")


def test_primary_table_picks_the_baseline_on_inner_cv_never_on_test(tmp_path):
    """KRR has the lower inner-CV MAE, RF the better test figure: KRR is the best baseline.
    Only scored CV rows count, and the served GP variant is the one the ion report names."""
    cv_mae = {"krr": 0.30, "rf": 0.40, "mean": 0.10}  # the mean predictor is never "best"
    _write_ion(tmp_path, "Li", cv_mae, {"krr": 0.3, "rf": 0.05, "mean": 1.0})
    _write_ion(tmp_path, "Mg", cv_mae, {"krr": 0.3, "rf": 0.05, "mean": 1.0}, head="gp_alone")
    assert (
        best_baseline(json.loads((tmp_path / "metrics/baselines_Mg.json").read_text()))[0] == "krr"
    )
    table = primary_table(["Li", "Mg"], "Li", tmp_path / "metrics", tmp_path / "predictions",
                          tmp_path / "cv")  # fmt: skip
    mg = table["ions"]["Mg"]
    assert mg["best_baseline"] == "krr" and mg["served"] == "transfer_gp_alone"
    assert mg["cv_host"]["n"] == 30  # 10 of 40 rows unscored
    assert mg["cv_host"]["diff"] == pytest.approx(0.1)  # gp_alone is 0.3 off, krr 0.2
    assert table["family"] == ["Mg"] and "cv_host" not in table["ions"]["Li"]
    assert mg["cv_host"]["p_holm"] == pytest.approx(mg["cv_host"]["p"])  # family of one


def test_source_training_reads_no_test_label(tiny_data, tmp_path):
    """The Li stage (ensemble, GP-head weight chosen on validation, std scale) saves the same
    checkpoint when the Li test targets are scrambled."""
    import mlflow

    from training.stages.train import TrainPaths, run_train_stage
    from training.tracking import MlflowSettings
    from training.train.heads import HeadConfig
    from training.train.loop import TrainConfig
    from training.train.settings import TrainSettings
    from voltage_model.models.cgcnn import CGCNNConfig
    from voltage_model.models.gp_head import GPConfig

    settings = TrainSettings(
        model=CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1),
        train=TrainConfig(epochs=4, batch_size=8, optimizer="adamw", lr=3e-3, scheduler="none"),
        heads=HeadConfig(n_heads=1, epochs=10), n_models=2,
        gp=GPConfig(nu=0.5, descriptor_weights=(0.0, 1.0), select="validation"),
    )  # fmt: skip
    li = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    store = GraphStore.load(tiny_data["graphs"])
    payloads, reports = [], []
    try:
        for name, data in (("real", li), ("scrambled", _scrambled(li, ("test",)))):
            mls = MlflowSettings(tracking_uri=f"sqlite:///{tmp_path / name}.db", experiment=name)
            out = TrainPaths(tmp_path / f"{name}.pt", tmp_path / f"{name}.json",
                             tmp_path / f"{name}.png")  # fmt: skip
            reports.append(run_train_stage(data, store, settings, mls, out, log_model=False))
            payloads.append(torch.load(out.checkpoint, weights_only=True))
    finally:
        mlflow.set_tracking_uri(None)
    assert reports[0]["test_mae"] != pytest.approx(reports[1]["test_mae"])
    for p in payloads:
        p["extra"].pop("mlflow_run_id")
    _same(payloads[0], payloads[1])
