"""The CHGNet backbone (issue 16): real CHGNet features, GP heads over them, the served variant
chosen by CV, the self-describing artifact, serving and explain."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.chgnet_heads import fit_chgnet_head, served_part, variant_predictions
from training.data.ion_inputs import IonInputs
from training.datasets import load_ion_data
from training.gp_cv import mixture
from training.graphs.store import GraphStore
from training.stages.ion_model import evaluate_target, save_transfer_checkpoint, served_mean_std
from voltage_model.artifact import CheckpointError, blend, load_checkpoint
from voltage_model.models import chgnet_backbone
from voltage_model.predict import ModelInput, VoltageModel


@pytest.fixture(scope="module")
def ions(tiny_data):
    return {i: load_ion_data(tiny_data["clean"], tiny_data["splits"], i) for i in ("Mg", "Na")}


@pytest.fixture(scope="module")
def store(tiny_data):
    return GraphStore.load(tiny_data["graphs"])


@pytest.fixture(scope="module")
def served(ions, store, source, chgnet_features, tmp_path_factory):
    """Mg's ion_model outputs with CHGNet features, and its artifact written with the average
    variant forced (whatever the tiny CV chose), so every path of a mixed model is exercised."""
    from training.train.settings import gp_config
    from training.transfer import TransferSettings

    cfg = TransferSettings(seeds=[0], n_heads=2, epochs=40, patience=10, bn_modes=["frozen"],
                           scratch={"epochs": 2, "batch_size": 8, "optimizer": "adamw",
                                    "lr": 2e-3, "scheduler": "none"})  # fmt: skip
    mg, na = ions["Mg"], ions["Na"]
    inputs = IonInputs(mg, store, "Li", [na], frozenset(), chgnet_features)
    report, final, part = target = evaluate_target(inputs, source, cfg)
    fit = fit_chgnet_head(mg, store, chgnet_features, gp_config(cfg.chgnet.gp))
    path = tmp_path_factory.mktemp("chg") / "Mg.pt"
    served = target._replace(
        report={**report, "served_variant": "average"}, chgnet=served_part("average", fit)
    )
    save_transfer_checkpoint(path, served, source, mg, run_id="run")
    return {"report": report, "final": final, "part": part, "fit": fit, "path": path}


def test_features_follow_the_recipe_and_refuse_another_chgnet(chgnet_features):
    x = chgnet_features.features
    assert x.shape[1] == chgnet_backbone.FEATURE_DIM == 257
    assert np.isfinite(x).all()
    # atom std block is non-negative, the max block bounds the mean block, energies vary
    assert (x[:, 128:192] >= 0).all() and (x[:, 192:256] >= x[:, 64:128] - 1e-9).all()
    assert np.ptp(x[:, 256]) > 0.1
    chgnet_backbone.check_spec(chgnet_features.spec)
    with pytest.raises(chgnet_backbone.ChgnetMismatch, match=r"model '0\.2\.0'"):
        chgnet_backbone.check_spec({**chgnet_features.spec, "model": "0.2.0"})


def test_variant_choice_is_recorded_and_lowest_cv_wins(served):
    sel = served["report"]["variant_selection"]
    assert set(sel["cv_mae"]) == {"cgcnn", "chgnet", "average"}
    assert sel["choice"] == min(sel["cv_mae"], key=sel["cv_mae"].get)
    assert 0 < sel["n_scored"] <= sel["n"]
    assert sel["std_scale"] > 0 and "chgnet" in sel["pooling"]
    assert served["report"]["served_variant"] == sel["choice"]
    methods = served["report"]["methods"]
    assert {"chgnet_gp", "chgnet_gp_alone", "chgnet_gp_pooled", "served"} <= set(methods)


def test_mixture_is_the_two_gaussians_equal_mixture():
    rng = np.random.default_rng(0)
    ma, mb = rng.normal(size=5), rng.normal(size=5)
    sa, sb = rng.uniform(0.1, 1, 5), rng.uniform(0.1, 1, 5)
    mean, std = mixture(ma, sa, mb, sb)
    samples_a = rng.normal(ma, sa, (200_000, 5))
    samples_b = rng.normal(mb, sb, (200_000, 5))
    both = np.concatenate([samples_a, samples_b])
    assert np.allclose(mean, both.mean(axis=0), atol=0.01)
    assert np.allclose(std, both.std(axis=0), atol=0.01)
    a = (torch.from_numpy(ma), torch.from_numpy(sa))
    t = blend(a, (torch.from_numpy(mb), torch.from_numpy(sb)), 0.5)
    assert np.allclose(t[0].numpy(), mean) and np.allclose(t[1].numpy(), std)


def test_artifact_serves_the_mixture_it_was_scored_as(served, ions, store, chgnet_features):
    mg = ions["Mg"]
    loaded = load_checkpoint(served["path"])
    assert loaded.needs_chgnet and loaded.needs_graphs and loaded.chgnet.weight == 0.5
    got = served_mean_std(loaded, store, mg, "test", chgnet_features)
    cgcnn = {s: served["final"].mean_std(s) for s in mg.parts}
    want = variant_predictions("average", cgcnn, served["fit"])["test"]
    assert np.allclose(got[0], want[0], atol=1e-6) and np.allclose(got[1], want[1], atol=1e-6)
    # from structures, as the service does: CHGNet graphs built per request, one batch forward
    model = VoltageModel(loaded)
    structures = [r.structure() for r in mg.parts["test"]]
    inputs = model.graphs(structures)
    assert all(isinstance(i, ModelInput) and i.chgnet_graph is not None for i in inputs)
    mean, std = model.predict_graphs(inputs)
    assert np.allclose(mean, want[0], atol=1e-4)
    assert np.allclose(std, want[1] * model.std_scale, atol=1e-4)
    assert model.backbone == "cgcnn+chgnet"


def test_artifact_refuses_another_installed_chgnet(served, tmp_path):
    payload = torch.load(served["path"], weights_only=True)
    payload["chgnet"]["spec"]["package"] = "0.0.1"
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)
    with pytest.raises(CheckpointError, match="CHGNet features were computed with package"):
        load_checkpoint(bad)


def test_scrambled_test_targets_leave_the_chgnet_head_unchanged(ions, store, chgnet_features):
    from voltage_model.models.gp_head import GPConfig

    mg = ions["Mg"]
    scrambled = type(mg)(mg.ion, {**mg.parts, "test": [
        type(r).from_mapping({**json.loads(r.to_json()), "battery_avg_voltage": 9.0})
        for r in mg.parts["test"]]})  # fmt: skip
    a = fit_chgnet_head(mg, store, chgnet_features, GPConfig())
    b = fit_chgnet_head(scrambled, store, chgnet_features, GPConfig())
    for k, v in a.part.head.state_dict().items():
        assert torch.equal(v, b.part.head.state_dict()[k]), k


def test_chgnet_local_voltages_average_to_the_linear_head(ions, chgnet_features, served):
    from training.stages.interpret import InterpretSettings, fit_chgnet_local_head
    from voltage_model.local_voltage import CHGNET_MEAN_COLUMNS

    mg = ions["Mg"]
    head, metrics = fit_chgnet_local_head(mg, chgnet_features, chgnet_features.spec,
                                          InterpretSettings())  # fmt: skip
    assert metrics["train"]["linear_head_vs_dft"]["n"] == len(mg.parts["train"])
    rec = mg.parts["test"][0]
    atoms = chgnet_backbone.atom_features(rec.structure())
    crystal = chgnet_features.rows([rec.charged_id])[0, CHGNET_MEAN_COLUMNS]
    assert head.local(atoms).mean() == pytest.approx(float(crystal @ np.asarray(head.weights))
                                                     + head.bias, abs=1e-4)  # fmt: skip
    head.check_matches(load_checkpoint(served["path"]))


def test_explain_mixes_both_heads_by_the_served_share(served, ions, chgnet_features):
    from training.stages.interpret import InterpretSettings, fit_chgnet_local_head
    from voltage_model.local_voltage import (
        LocalVoltageHead,
        backbone_fingerprint,
        explain_graph,
    )

    model = VoltageModel.from_checkpoint(served["path"])
    mg = ions["Mg"]
    chg_head, _ = fit_chgnet_local_head(mg, chgnet_features, model.loaded.chgnet.spec,
                                        InterpretSettings())  # fmt: skip
    dim = model.loaded.model.config.atom_fea_len
    head = LocalVoltageHead(tuple((0.0,) * dim for _ in model.loaded.backbones()),
                            tuple(1.0 for _ in model.loaded.backbones()),
                            backbone_fingerprint(model.loaded), chgnet=chg_head)  # fmt: skip
    head.check_matches(model.loaded)
    s = mg.parts["test"][0].structure()
    sites = explain_graph(model, s, model.prepare(s), head)
    atoms = chgnet_backbone.atom_features(s)
    want = 0.5 * 1.0 + 0.5 * chg_head.local(atoms)  # CGCNN head: constant 1 V per site
    assert [x["local_voltage"] for x in sites] == pytest.approx(want.tolist(), abs=1e-5)


def test_cv_check_adds_the_chgnet_rows_and_serves_the_average(
    ions, store, source, chgnet_features, tmp_path
):
    """With CHGNet features the CV check scores the CHGNet GP (pooled as served, and alone) and
    the average; under the chemsys grouping an ``average``-serving ion runs both parts."""
    from training.baselines.models import BaselineConfig
    from training.config import CvSettings
    from training.stages.cv import CvPaths, CvPlan, run_cv_stage
    from voltage_model.models.gp_head import GPConfig

    small = BaselineConfig(svr_grid={"C": [10.0]}, krr_grid={"alpha": [0.1]},
                           rf_grid={"min_samples_leaf": [1]}, cv_rf_trees=10)  # fmt: skip
    gp = GPConfig(descriptor_weights=(0.0,))
    inputs = IonInputs(ions["Mg"], store, "Li", [ions["Na"]], frozenset(), chgnet_features)
    plan = CvPlan(small, gp, CvSettings(folds=3), gp, ("average", "transfer_gp", True), "krr")
    report = run_cv_stage(
        inputs,
        load_checkpoint(source),
        plan,
        CvPaths(tmp_path / "f.npz", tmp_path / "cv.json", tmp_path / "cv.csv"),
    )
    host = report["groupings"]["host"]["methods"]
    assert {"chgnet_gp", "chgnet_gp_alone", "average"} <= set(host)
    chem = report["groupings"]["chemsys"]["methods"]
    assert set(chem) == {"transfer_gp", "chgnet_gp", "average", "krr"}
    assert "average_minus_this" in chem["krr"]
    assert report["served"] == "average"
