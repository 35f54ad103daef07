"""Transfer learning, the comparison's baselines, uncertainty, and the registry with its gate."""

from __future__ import annotations

import copy
import dataclasses
import json

import mlflow
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from training.data.ion_inputs import IonInputs
from training.datasets import load_ion_data
from training.gp_cv import chemsys_keys
from training.graphs.store import GraphStore
from training.registry import (
    VAL_PREDICTIONS_DIR,
    PromotionRefused,
    by_alias,
    check_gate,
    promote,
    register,
)
from training.stages.ion_model import baseline_rows, evaluate_target, selectable_kinds
from training.train.uncertainty import calibration, fit_std_scale
from training.transfer import (
    TransferInputs,
    TransferSettings,
    source_predictions,
    transfer,
    uncertainty_report,
)
from voltage_model.artifact import load_checkpoint
from voltage_model.naming import CANDIDATE, CHAMPION


@pytest.fixture
def cfg(transfer_cfg: TransferSettings) -> TransferSettings:
    return transfer_cfg


def test_freezing_really_freezes(source, tiny_data, cfg):
    src = load_checkpoint(source)
    before = [copy.deepcopy(m.state_dict()) for m, _ in src.backbones()]
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    res = transfer(
        TransferInputs(src, data, GraphStore.load(tiny_data["graphs"]), cfg), "frozen", 0
    )
    for member, state in zip(res.members, before, strict=True):
        after = member.model.state_dict()
        for k, v in state.items():
            if not k.startswith(("conv_to_fc", "fcs", "fc_out")):
                assert torch.equal(after[k], v), f"backbone tensor {k} changed"
        # The heads did change.
        assert not torch.equal(member.heads[0].fc_out.weight, state["fc_out.weight"])
    # The source checkpoint's objects were not modified either.
    for (m, _), state in zip(src.backbones(), before, strict=True):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())


def test_gp_head_transfer_freezes_backbone_and_learns(source, tiny_data, cfg):
    src = load_checkpoint(source)
    before = [copy.deepcopy(m.state_dict()) for m, _ in src.backbones()]
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    inputs = TransferInputs(src, data, GraphStore.load(tiny_data["graphs"]), cfg)
    res = transfer(inputs, "frozen", seed=0, head_kind="gp")
    assert res.head_kind == "gp"
    for member, state in zip(res.members, before, strict=True):
        assert [type(h).__name__ for h in member.heads] == ["GPHead"]
        assert all(torch.equal(member.model.state_dict()[k], v) for k, v in state.items())
    mean, _ = res.mean_std("train")
    y = data.targets("train")
    assert np.mean(np.abs(mean - y)) < np.mean(np.abs(y - y.mean()))
    assert (res.mean_std("test")[1] > 0).all()
    assert uncertainty_report(data, res)["std_scale"] == 1.0


def test_gp_head_with_composition_serves_what_it_was_scored_with(source, tiny_data, cfg, tmp_path):
    """Descriptor heads are fitted on store graphs and served from request structures: the
    saved model, fed pymatgen structures, predicts what the transfer run scored."""
    from voltage_model.artifact import save_checkpoint
    from voltage_model.models.gp_head import GPConfig
    from voltage_model.predict import VoltageModel

    src = load_checkpoint(source)
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    gp_cfg = cfg.model_copy(update={"gp": GPConfig(descriptor_weights=(1.0,))})
    inputs = TransferInputs(src, data, GraphStore.load(tiny_data["graphs"]), gp_cfg)
    res = transfer(inputs, "adapt", seed=0, head_kind="gp")
    assert res.descriptor_weights() == [1.0] * len(res.members)
    first, *rest = res.members
    path = save_checkpoint(tmp_path / "mg.pt", first.model, src.model_config, src.converter_dict,
                           res.normalizer, {"ion": "Mg"}, heads=first.heads,
                           members=[(m.model, m.heads) for m in rest])  # fmt: skip
    served = VoltageModel.from_checkpoint(path)
    assert served.loaded.needs_descriptors
    preds = served.predict([r.structure() for r in data.parts["test"]])
    mean, std = res.mean_std("test")
    np.testing.assert_allclose([p.voltage for p in preds], mean, atol=1e-4)
    np.testing.assert_allclose([p.uncertainty for p in preds], std, atol=1e-4)


def test_adapt_mode_changes_only_batchnorm_statistics(source, tiny_data, cfg):
    src = load_checkpoint(source)
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    res = transfer(TransferInputs(src, data, GraphStore.load(tiny_data["graphs"]), cfg), "adapt", 0)
    before, after = src.model.state_dict(), res.members[0].model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "adapt mode should re-estimate BatchNorm statistics"
    assert all("running_" in k or "num_batches" in k or k.startswith(("conv_to_fc", "fc_out"))
               for k in changed), changed  # fmt: skip


def test_comparison_offset_and_uncertainty(source, tiny_data, cfg):
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    na = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Na")
    store = GraphStore.load(tiny_data["graphs"])
    report, final, _ = evaluate_target(IonInputs(data, store, "Li", partners=[na]), source, cfg)
    src = load_checkpoint(source)
    unchanged, _ = source_predictions(src, data, store)
    offset = np.mean(data.targets("train") - unchanged["train"])
    assert report["offset_V"] == pytest.approx(offset)
    # The offset is the best constant shift on the training split: training MAE/MSE never worse.
    y = data.targets("train")
    assert np.mean((y - unchanged["train"] - offset) ** 2) <= np.mean((y - unchanged["train"]) ** 2)
    for name in ("mean", "source_unchanged", "source_offset", "cgcnn_scratch", "transfer"):
        assert name in report["methods"]
    for mode in cfg.bn_modes:
        assert report["methods"][f"transfer_fc_bn_{mode}"]["n_seeds"] == 2
        assert report["methods"][f"transfer_gp_bn_{mode}"]["n_seeds"] == 1  # deterministic
        assert report["methods"][f"transfer_gp_alone_bn_{mode}"]["n_seeds"] == 1  # measured
    selection = report["pool_selection"]
    assert selection["partners"] == ["Na"] and selection["pool"] == (
        selection["pooled_mae"] < selection["alone_mae"]
    )
    kinds = selectable_kinds(cfg.select_heads, selection)
    assert report["bn_mode"] in ("adapt", "frozen") and report["head"] in kinds
    assert report["pool_ions"] == (["Na"] if report["head"] == "gp" else [])
    # one Li training seed at a time (2 members here): the ensemble of equal members is never
    # worse than their mean (|mean error| <= mean |error| per crystal; float32 tolerance)
    for name in ("source_unchanged", "source_offset", "transfer"):
        per_seed = report["methods"][f"{name}_per_seed"]
        assert per_seed["n_seeds"] == 2, name
        if report["methods"][name].get("n_seeds", 1) > 1:
            # an MLP-head winner is averaged over transfer seeds while its per-seed row holds the
            # first seed's members: the ensemble bound does not hold across the two
            continue
        assert report["methods"][name]["test_mae_mean"] <= per_seed["test_mae_mean"] + 1e-6
    chosen = report["methods"][f"transfer_{report['head']}_bn_{report['bn_mode']}"]
    assert report["methods"]["transfer"] == chosen
    eligible = [f"transfer_{k}_bn_{m}" for k in kinds for m in cfg.bn_modes]
    assert chosen["val_mae_mean"] == min(report["methods"][k]["val_mae_mean"] for k in eligible)
    _, std = final.mean_std("test")
    assert (std > 0).all()
    unc = report["uncertainty"]
    assert 0.0 <= unc["coverage_90"] <= 1.0 and unc["std_scale"] > 0
    assert 0.0 <= unc["val_coverage_90"] <= 1.0
    if report["head"] == "gp":  # a GP's fitted predictive std is served unscaled
        assert unc["std_scale"] == 1.0


def test_calibration_math():
    rng = np.random.default_rng(0)
    std = rng.uniform(0.1, 1.0, 4000)
    y = rng.normal(0, std)
    scale = fit_std_scale(y, np.zeros_like(y), std * 0.5)
    assert scale == pytest.approx(2.0, rel=0.1)
    cal = calibration(y, np.zeros_like(y), std)
    assert cal["coverage_90"] == pytest.approx(0.9, abs=0.03)
    assert cal["spearman_err_std"] > 0.3


@pytest.fixture
def registry(tmp_path, monkeypatch, source):
    uri = f"sqlite:///{tmp_path / 'reg.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("reg", artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=exp)
    from training.train.pyfunc import log_pyfunc

    def log(mae: float, split: str = "s1"):
        # every validation crystal off by ``mae``: the gate's paired differences are constant
        val = tmp_path / "val" / "ion_Mg_val.csv"
        val.parent.mkdir(exist_ok=True)
        val.write_text("battery_id,target,prediction\n" + "".join(
            f"b{i},{i / 10:.4f},{i / 10 + mae:.4f}\n" for i in range(10)))  # fmt: skip
        with mlflow.start_run():
            info = log_pyfunc(source, _example_cif())
            mlflow.log_artifact(str(val), artifact_path=VAL_PREDICTIONS_DIR)
        return register(info.model_uri, "electrode-voltage-Mg",
                        {"test_mae": mae, "split_hash": split}, CANDIDATE)  # fmt: skip

    yield log
    mlflow.set_tracking_uri(None)


def _example_cif() -> str:
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.cif import CifWriter

    return str(CifWriter(Structure(Lattice.cubic(4.2), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])))


def test_registry_round_trip_and_gate(registry, tmp_path):
    v1 = registry(0.50)
    assert by_alias(v1.name, CANDIDATE).version == v1.version
    assert by_alias(v1.name, CHAMPION) is None
    promote(v1.name)  # no champion yet: allowed
    model = mlflow.pyfunc.load_model(f"models:/{v1.name}@champion")
    import pandas as pd

    out = model.predict(pd.DataFrame({"structure": [_example_cif()], "format": ["cif"]}))
    assert np.isfinite(out["voltage"]).all()

    worse = registry(0.60)
    with pytest.raises(PromotionRefused, match="worse"):
        promote(worse.name)
    assert by_alias(worse.name, CHAMPION).version == v1.version
    other_split = registry(0.10, split="s2")
    with pytest.raises(PromotionRefused, match="different splits"):
        check_gate(other_split, by_alias(v1.name, CHAMPION))
    better = registry(0.40)
    promote(better.name)
    assert by_alias(better.name, CHAMPION).version == better.version
    # Forced promotion overrides the gate; the CLI says no with a non-zero exit.
    worst = registry(0.90)
    from training.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("ions: {Li: {}, Mg: {}}\nmlflow: {experiment: reg}\n")
    res = CliRunner().invoke(app, ["promote", "--ion", "Mg", "--params", str(params)])
    assert res.exit_code == 1 and "worse" in res.output
    res = CliRunner().invoke(app, ["promote", "--ion", "Mg", "--force", "--params", str(params)])
    assert res.exit_code == 0, res.output
    assert by_alias(worst.name, CHAMPION).version == worst.version


def test_cross_validation_scores_every_crystal_once_and_pairs_the_differences(
    source, tiny_data, tmp_path
):
    from training.baselines.models import BaselineConfig
    from training.config import CvSettings
    from training.stages.cv import CvPaths, CvPlan, run_cv_stage, summarise
    from voltage_model.models.gp_head import GPConfig

    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    store = GraphStore.load(tiny_data["graphs"])
    gp = GPConfig(descriptor_weights=(0.0, 1.0))  # the descriptor path, chosen per fold
    small = BaselineConfig(svr_grid={"C": [10.0]}, krr_grid={"alpha": [0.03]},
                           rf_grid={"min_samples_leaf": [1]}, cv_rf_trees=20)  # fmt: skip
    plan = CvPlan(small, gp, CvSettings(folds=4))
    src = load_checkpoint(source)
    report = run_cv_stage(IonInputs(data, store, "Li"), src, plan,
                          CvPaths(tmp_path / "f.npz", tmp_path / "cv.json"))  # fmt: skip
    host = report["groupings"]["host"]
    n = sum(len(data.parts[s]) for s in data.parts)
    assert host["n"] == host["n_scored"] == n and host["folds"] == 4  # no source hosts given
    methods = host["methods"]
    assert set(methods) == {"transfer_gp", "transfer_gp_backbone_only", "mean", "svr", "krr",
                            "rf", "gp_comp"}  # fmt: skip
    assert methods["transfer_gp"]["transfer_gp_minus_this"] == 0.0
    # the tiny fixture's voltages are random, so no method can beat the mean out of fold here
    # (learning is asserted on training data above); what must hold is the pairing: every
    # crystal scored once by every method, so the paired difference is the difference of MAEs
    for name, m in methods.items():
        assert np.isfinite(m["mae"]) and m["se"] >= 0
        gap = methods["transfer_gp"]["mae"] - m["mae"]
        assert m["transfer_gp_minus_this"] == pytest.approx(gap, abs=1e-12), name
    # the stage's file is what it returned; the source ion is refused, not cross-validated
    assert json.loads((tmp_path / "cv.json").read_text()) == report
    li = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    assert "not_applicable" in run_cv_stage(
        IonInputs(li, store, "Li"), src, plan, CvPaths(tmp_path / "f.npz", tmp_path / "li.json")
    )
    # paired differences: a constant 0.1 V gap has zero spread; unscored rows do not count
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    gp_pred = y + np.array([0.1, 0.3, 0.2, 0.5, 9.0])
    out = {"pred": {"transfer_gp": gp_pred, "krr": gp_pred - 0.1 * np.sign(gp_pred - y)},
           "std": {}, "fold": np.array([0, 0, 1, 1, 1]), "folds": 2}  # fmt: skip
    scored = np.array([True, True, True, True, False])
    s = summarise(y, scored, out, ["transfer_gp"])
    assert s["n_scored"] == 4 and s["methods"]["transfer_gp"]["mae"] == pytest.approx(0.275)
    krr = s["methods"]["krr"]
    assert krr["transfer_gp_minus_this"] == pytest.approx(0.1)
    assert krr["transfer_gp_minus_this_se"] == pytest.approx(0, abs=1e-12)


def test_cross_validation_side_by_side_equals_one_core_and_restores_threads(
    source, tiny_data, tmp_path, monkeypatch
):
    """The CV check runs its (fold, method) fits side by side; on one usable core the same fits
    run one after another. Both give the same report, and torch's thread count comes back."""
    import torch

    import voltage_model.models.gp_fit as gp_fit
    from training.baselines.models import BaselineConfig
    from training.config import CvSettings
    from training.stages.cv import CvPaths, CvPlan, run_cv_stage
    from voltage_model.models.gp_head import GPConfig

    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    store = GraphStore.load(tiny_data["graphs"])
    # forests on one joblib thread: threaded forests sum their trees in no fixed order
    small = BaselineConfig(svr_grid={"C": [1.0, 10.0]}, krr_grid={"alpha": [0.03, 0.3]},
                           rf_grid={"min_samples_leaf": [1]}, cv_rf_trees=10,
                           rf=dataclasses.replace(BaselineConfig().rf, n_jobs=1))  # fmt: skip
    plan = CvPlan(small, GPConfig(descriptor_weights=(0.0, 1.0)), CvSettings(folds=3))
    src = load_checkpoint(source)

    def run(name: str) -> dict:
        paths = CvPaths(tmp_path / f"{name}.npz", tmp_path / f"{name}.json")
        return run_cv_stage(IonInputs(data, store, "Li"), src, plan, paths)

    threads = torch.get_num_threads()
    side_by_side = run("parallel")
    assert torch.get_num_threads() == threads
    monkeypatch.setattr(gp_fit, "usable_cores", lambda: 1)
    assert run("sequential") == side_by_side


def test_pooled_gp_transfer_adds_partner_training_crystals_and_serves_them(
    source, tiny_data, cfg, tmp_path
):
    """A pooled GP head holds the ion's training crystals plus the partner's training split
    (never its validation or test crystals, whose hosts may be this ion's), and the saved
    model, fed structures, predicts what the run scored."""
    from voltage_model.artifact import save_checkpoint
    from voltage_model.models.gp_head import GPConfig
    from voltage_model.predict import VoltageModel

    src = load_checkpoint(source)
    store = GraphStore.load(tiny_data["graphs"])
    mg, na = (load_ion_data(tiny_data["clean"], tiny_data["splits"], i) for i in ("Mg", "Na"))
    gp_cfg = cfg.model_copy(update={"gp": GPConfig(descriptor_weights=(0.0, 1.0))})
    inputs = TransferInputs(src, mg, store, gp_cfg, partners=[na])
    res = transfer(inputs, "adapt", seed=0, head_kind="gp")
    alone = transfer(inputs, "adapt", seed=0, head_kind="gp_alone")
    assert res.pool_ions == ("Na",) and alone.pool_ions == ()
    n_rows = len(mg.parts["train"]) + len(na.parts["train"])
    for member, solo in zip(res.members, alone.members, strict=True):
        (head,), (solo_head,) = member.heads, solo.heads
        assert head.x_train.shape[0] == n_rows and head.n_tasks == 2
        assert solo_head.x_train.shape[0] == len(mg.parts["train"]) and solo_head.n_tasks == 0
    y = mg.targets("train")
    assert np.mean(np.abs(res.mean_std("train")[0] - y)) < np.mean(np.abs(y - y.mean()))
    first, *rest = res.members
    path = save_checkpoint(tmp_path / "mg.pt", first.model, src.model_config, src.converter_dict,
                           res.normalizer, {"ion": "Mg"}, heads=first.heads,
                           members=[(m.model, m.heads) for m in rest])  # fmt: skip
    preds = VoltageModel.from_checkpoint(path).predict([r.structure() for r in mg.parts["test"]])
    mean, std = res.mean_std("test")
    np.testing.assert_allclose([p.voltage for p in preds], mean, atol=1e-4)
    np.testing.assert_allclose([p.uncertainty for p in preds], std, atol=1e-4)


def test_pool_partners_share_a_label_and_never_include_the_source(tmp_path):
    from training.config import Params

    p = Params.model_validate({"ions": {
        "Li": {"pool": "multi"}, "Na": {}, "Mg": {"pool": "multi"}, "Zn": {"pool": "multi"},
        "Al": {"pool": "multi"}, "K": {"pool": "mono"},
    }})  # fmt: skip
    assert p.pool_partners("Mg") == ["Zn", "Al"]
    assert p.pool_partners("Al") == ["Mg", "Zn"]
    assert p.pool_partners("Na") == [] and p.pool_partners("K") == []
    assert p.pool_partners("Li") == []  # the source backbone was trained on its own crystals


def test_cross_validation_pools_partners_outside_the_held_out_hosts(source, tiny_data, tmp_path):
    import csv

    from training.baselines.models import BaselineConfig
    from training.config import CvSettings
    from training.gp_cv import backbone_features, load_partners
    from training.stages.cv import CvPaths, CvPlan, run_cv_stage
    from voltage_model.models.gp_head import GPConfig

    mg, na, li = (load_ion_data(tiny_data["clean"], tiny_data["splits"], i)
                  for i in ("Mg", "Na", "Li"))  # fmt: skip
    store = GraphStore.load(tiny_data["graphs"])
    gp = GPConfig(descriptor_weights=(1.0,))
    partners = load_partners([na], store, gp, backbone_features(load_checkpoint(source), store))
    held_out = set(mg.host_ids("test")) | set(na.host_ids("val")[:2])
    rows = partners.fold_rows(0, held_out)
    kept = [h for h in partners.hosts if h not in held_out]
    assert rows.feats.shape[0] == len(kept) == len(rows.y_norm) < len(partners.hosts)
    assert rows.y_norm.mean() == pytest.approx(0.0, abs=1e-9)  # normalised over its kept rows
    assert set(rows.ion_index) == {1} and rows.n_ions == 2
    small = BaselineConfig(svr_grid={"C": [10.0]}, krr_grid={"alpha": [0.03, 0.1]},
                           rf_grid={"min_samples_leaf": [1]}, cv_rf_trees=20)  # fmt: skip
    seen = frozenset(li.host_ids("train"))
    out = {k: tmp_path / f"cv.{k}" for k in ("json", "csv", "png")}
    inputs = IonInputs(mg, store, "Li", [na], seen)
    paths = CvPaths(tmp_path / "f.npz", out["json"], out["csv"], out["png"])
    report = run_cv_stage(
        inputs, load_checkpoint(source), CvPlan(small, gp, CvSettings(folds=3)), paths
    )
    assert report["pool_ions"] == ["Na"] and out["png"].stat().st_size > 0
    unseen = [h not in seen for s in ("train", "val", "test") for h in mg.host_ids(s)]
    for grouping, rep in report["groupings"].items():
        assert rep["n_scored"] == sum(unseen) < rep["n"], grouping  # leak-free scoring
        unc = rep["uncertainty"]["transfer_gp"]["as_served"]
        assert 0 <= unc["coverage_50"] <= unc["coverage_90"] <= unc["coverage_95"] <= 1
        assert unc["crps"] > 0
    host = report["groupings"]["host"]
    methods = host["methods"]
    for name in (
        "transfer_gp",
        "transfer_gp_alone",
        "transfer_gp_backbone_only",
        "krr",
        "krr_pooled",
        "rf_pooled",
        "gp_comp",
        "gp_comp_pooled",
        "svr",
        "mean",
    ):
        assert np.isfinite(methods[name]["mae"]), name
    alone = methods["transfer_gp_alone"]  # the unpooled head, paired with every row
    assert alone["transfer_gp_alone_minus_this"] == 0.0
    gap = methods["transfer_gp"]["mae"] - alone["mae"]
    assert alone["transfer_gp_minus_this"] == pytest.approx(gap, abs=1e-12)
    assert "gp_comp" in host["uncertainty"]
    # the chemical-system grouping runs the served GP and the best baseline only
    assert set(report["groupings"]["chemsys"]["methods"]) == {"transfer_gp", "krr"}
    with out["csv"].open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 * host["n"]
    chem = [r for r in table if r["grouping"] == "chemsys"]
    keys = dict(zip((r["battery_id"] for r in chem), chemsys_keys(mg, ("train", "val", "test")),
                    strict=True))  # fmt: skip
    fold_of_key: dict[str, set[str]] = {}
    for r in chem:
        fold_of_key.setdefault(keys[r["battery_id"]], set()).add(r["fold"])
    assert all(len(folds) == 1 for folds in fold_of_key.values())  # a system in one fold only


def test_pooling_is_chosen_by_cv_on_train_and_val_only(source, tiny_data):
    """The pooling choice reads the ion's train+val crystals and the partners' training split:
    scrambling the ion's test targets and the partner's val/test targets changes nothing."""
    from training.gp_cv import choose_pooling
    from voltage_model.models.gp_head import GPConfig

    mg, na = (load_ion_data(tiny_data["clean"], tiny_data["splits"], i) for i in ("Mg", "Na"))
    store = GraphStore.load(tiny_data["graphs"])
    gp = GPConfig(descriptor_weights=(0.0, 1.0))
    src = load_checkpoint(source)
    report = choose_pooling(IonInputs(mg, store, "Li", [na]), src, gp, folds=3)
    assert report["n"] == len(mg.parts["train"]) + len(mg.parts["val"]) and report["folds"] == 3
    assert report["pool"] == (report["pooled_mae"] < report["alone_mae"])
    assert report["pooled_minus_alone"] == pytest.approx(
        report["pooled_mae"] - report["alone_mae"], abs=1e-12
    )

    def _shifted(record):
        return dataclasses.replace(record, battery_avg_voltage=record.battery_avg_voltage + 5.0)

    def scrambled(data, splits):
        out = copy.deepcopy(data)
        for s in splits:
            out.parts[s] = [_shifted(r) for r in out.parts[s]]
        return out

    scrambled_inputs = IonInputs(
        scrambled(mg, ["test"]), store, "Li", [scrambled(na, ["val", "test"])]
    )
    again = choose_pooling(scrambled_inputs, src, gp, folds=3)
    assert again == report
    # leak-free: crystals on the source's training hosts are fitted on but never scored
    li = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    seen = frozenset(li.host_ids("train"))
    leak_free = choose_pooling(IonInputs(mg, store, "Li", [na], seen), src, gp, folds=3)
    rows = [h for s in ("train", "val") for h in mg.host_ids(s)]
    assert leak_free["n_scored"] == sum(h not in seen for h in rows) < report["n_scored"]


def test_selectable_kinds_swap_the_pooled_head_when_pooling_lost():
    assert selectable_kinds(["gp", "fc"], None) == {"gp", "fc"}
    assert selectable_kinds(["gp"], {"pool": True}) == {"gp"}
    assert selectable_kinds(["gp", "fc"], {"pool": False}) == {"gp_alone", "fc"}


def test_baseline_rows_summarise_a_seeded_baseline_over_its_seed_columns(tiny_data, tmp_path):
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Mg")
    y = data.targets("test")
    offsets = {"krr": 0.2, "rf": 0.1, "rf@1": 0.3, "rf@2": 0.5}
    lines = ["battery_id,target," + ",".join(offsets)]
    for bid, t in zip(data.ids("test"), y, strict=True):
        lines.append(f"{bid},{t},{','.join(str(t + o) for o in offsets.values())}")
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    rows = baseline_rows(data, tmp_path / "b.csv")
    assert set(rows) == {"krr", "rf"}
    assert rows["krr"]["n_seeds"] == 1 and rows["krr"]["test_mae_mean"] == pytest.approx(0.2)
    assert rows["rf"]["n_seeds"] == 3 and rows["rf"]["test_mae_mean"] == pytest.approx(0.3)
    assert rows["rf"]["test_mae_std"] == pytest.approx(np.std([0.1, 0.3, 0.5]))


def test_source_ion_is_scored_as_an_ensemble_and_one_member_at_a_time(source, tiny_data):
    from training.stages.ion_model import evaluate_source

    li = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    report = evaluate_source(li, GraphStore.load(tiny_data["graphs"]), source)
    ensemble, per_seed = report["methods"]["cgcnn"], report["methods"]["cgcnn_per_seed"]
    assert ensemble["n_seeds"] == 1 and per_seed["n_seeds"] == 2  # the fixture's 2 members
    assert per_seed["test_mae_std"] > 0  # two trained seeds do differ
    assert ensemble["test_mae_mean"] <= per_seed["test_mae_mean"] + 1e-6
    assert ensemble["test_mae_mean"] == pytest.approx(report["test_mae"])
