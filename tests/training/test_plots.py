"""The ``plots`` stage: the numbers behind each figure are right, not just the files there.

Fixture predictions are built by hand so that every coverage and MAE can be counted in the test;
the served-std path runs a tiny random checkpoint over the mini snapshot's graphs and is checked
against what the service computes (``VoltageModel.predict_graphs``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from training.plots import panel_note
from training.stages import plots as stage

torch.set_num_threads(1)

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 2000 and path.read_bytes()[:8] == PNG


def gaussian(z: list[float], std: list[float], y0: float = 2.0) -> stage.Gaussian:
    """Predictions whose standardised errors are exactly ``z``: mean = y - z * std."""
    z_, s = np.asarray(z, float), np.asarray(std, float)
    y = y0 + np.arange(len(z_)) * 0.1
    return stage.Gaussian([f"b{i}" for i in range(len(z_))], y, y - z_ * s, s)


# Standardised errors with known positions against the central-interval half-widths
# 0.674 (50%), 1.645 (90%) and 1.960 (95%).
Z = [0.05, -0.2, 0.5, -1.0, 1.2, 1.7, -2.0, 3.0]
STD = [0.1, 0.4, 0.2, 0.3, 0.5, 0.25, 0.2, 0.1]


# ------------------------------------------------------------------------------ numbers
def test_reliability_coverage_is_the_hand_counted_fraction():
    rel = stage.reliability(gaussian(Z, STD), levels=(0.5, 0.9, 0.95))
    # |z| <= 0.674: 0.05, 0.2, 0.5 -> 3 of 8; <= 1.645: five; <= 1.960: six (1.7 joins).
    assert rel["nominal"] == [0.5, 0.9, 0.95]
    assert rel["observed"] == [3 / 8, 5 / 8, 6 / 8]
    # The calibrated band: nominal +- 2 binomial standard errors on 8 crystals.
    se = np.sqrt(0.9 * 0.1 / 8)
    assert rel["band_low"][1] == pytest.approx(0.9 - 2 * se)
    assert rel["band_high"][1] == pytest.approx(1.0)  # capped


def test_panel_stats_and_the_annotation_use_numpys_mae():
    p = gaussian(Z, STD)
    stats = stage.panel_stats(p)
    mae = float(np.mean(np.abs(p.mean - p.y)))
    assert stats["n"] == 8
    assert stats["mae"] == pytest.approx(mae)
    assert stats["mae"] == pytest.approx(np.mean(np.abs(np.asarray(Z) * np.asarray(STD))))
    assert stats["rmse"] == pytest.approx(np.sqrt(np.mean((p.mean - p.y) ** 2)))
    assert stats["coverage_90"] == 5 / 8
    note = panel_note(stats)
    assert f"MAE = {mae:.3f} V" in note and "n = 8" in note and "holds 62%" in note


def test_predictions_with_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        stage.Gaussian(["a"], np.zeros(2), np.zeros(2), np.zeros(2))


# ------------------------------------------------------------------------------ inputs
def write_cv(tmp: Path, served: str | None) -> tuple[Path, Path]:
    rows = tmp / "Mg.csv"
    report = tmp / "Mg.json"
    report.write_text(json.dumps({"ion": "Mg", **({"served": served} if served else {})}))
    with rows.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "grouping", "fold", "scored", "target", "krr", "average",
                    "average_std"])  # fmt: skip
        w.writerow(["a", "host", 0, 1, "1.0", "1.1", "1.5", "0.2"])
        w.writerow(["b", "host", 1, 0, "2.0", "2.1", "2.5", "0.3"])  # not scored
        w.writerow(["c", "host", 1, 1, "3.0", "3.1", "2.0", "0.4"])
        w.writerow(["a", "chemsys", 0, 1, "1.0", "1.2", "0.8", "0.1"])
        w.writerow(["c", "chemsys", 1, 1, "3.0", "", "", ""])  # method not run: skipped
    return rows, report


def test_cv_sets_take_the_served_column_on_scored_rows_with_the_served_scale(tmp_path: Path):
    rows, report = write_cv(tmp_path, "average")
    sets = stage.cv_sets(rows, report, std_scale=0.5)
    host, chemsys = sets["cv_host"], sets["cv_chemsys"]
    assert host.ids == ["a", "c"]
    np.testing.assert_allclose(host.y, [1.0, 3.0])
    np.testing.assert_allclose(host.mean, [1.5, 2.0])
    np.testing.assert_allclose(host.std, [0.1, 0.2])  # the cv stage's raw std x 0.5
    assert chemsys.ids == ["a"]
    assert stage.panel_stats(host)["mae"] == pytest.approx((0.5 + 1.0) / 2)


def test_cv_sets_are_empty_for_the_source_ion(tmp_path: Path):
    rows, report = write_cv(tmp_path, None)  # the source ion: {"not_applicable": ...}
    assert stage.cv_sets(rows, report, 1.0) == {}
    assert stage.cv_sets(tmp_path / "none.csv", tmp_path / "none.json", 1.0) == {}


def test_importances_read_gini_and_permutation(tmp_path: Path):
    from training.baselines.models import rf_permutation_report

    path = tmp_path / "baselines_Mg.json"
    report = {"rf_importance_top15": [["MagpieData mean CovalentRadius", 0.3], ["x", 0.1]]}
    path.write_text(json.dumps(report))
    assert stage.importances(path) == (report["rf_importance_top15"], None, "")
    perm = [("MagpieData mean CovalentRadius", 0.21, 0.02), ("x", 0.01, 0.005)]
    path.write_text(json.dumps({**report, **rf_permutation_report(perm, n_rows=35)}))
    gini, top, note = stage.importances(path)
    assert gini == report["rf_importance_top15"]
    assert top == [["MagpieData mean CovalentRadius", 0.21, 0.02], ["x", 0.01, 0.005]]
    assert "35 validation crystals" in note


# ------------------------------------------------------------------------------ figures
def test_draw_writes_pngs_and_the_numbers_they_show(tmp_path: Path):
    rng = np.random.default_rng(0)
    test = gaussian(Z, STD)
    cv_std = rng.uniform(0.1, 0.5, 40)
    cv = gaussian(list(rng.normal(size=40)), list(cv_std))
    sets = {"Li": {"test": test}, "Mg": {"test": gaussian(Z[:5], STD[:5]), "cv_host": cv},
            "K": {"test": gaussian([], [])}}  # fmt: skip
    gini = [["MagpieData mean CovalentRadius", 0.3], ["MagpieData mean Row", 0.1]]
    perm = [["MagpieData mean Row", 0.05, 0.01], ["frac p valence electrons", 0.02, 0.01]]
    importance = {"Li": (gini, None, ""), "Mg": (gini, perm, "35 validation crystals"),
                  "K": ([], None, "")}  # fmt: skip
    numbers, files = stage.draw(sets, importance, tmp_path / "served", tmp_path / "rf")
    names = sorted(p.relative_to(tmp_path).as_posix() for p in files)
    assert names == ["rf/Li.png", "rf/Mg.png", "served/parity_cv_host.png",
                     "served/parity_test.png", "served/reliability.png"]  # fmt: skip
    assert all(is_png(p) for p in files)
    assert set(numbers) == {"Li", "Mg", "K"} and numbers["K"] == {}  # no crystal, no panel
    li = numbers["Li"]["test"]
    assert li["mae"] == pytest.approx(float(np.mean(np.abs(test.mean - test.y))))
    i50 = stage.LEVELS.index(0.5)
    assert li["reliability"]["observed"][i50] == 3 / 8
    z = np.abs((cv.y - cv.mean) / cv.std)
    observed = numbers["Mg"]["cv_host"]["reliability"]["observed"]
    assert observed[stage.LEVELS.index(0.9)] == pytest.approx(np.mean(z <= 1.6448536))
    assert observed[stage.LEVELS.index(0.1)] == pytest.approx(np.mean(z <= 0.1256613))


# ------------------------------------------------------------------------------ served std
def tiny_checkpoint(path: Path, std_scale: float) -> Path:
    """A random 2-member ensemble (2 MLP heads each: a nonzero std) with a served std scale."""
    from voltage_model.artifact import save_checkpoint
    from voltage_model.graphs.converter import GraphConverter
    from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, Head
    from voltage_model.normalizer import Normalizer

    cfg = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1)
    torch.manual_seed(0)
    models = [CGCNN(cfg) for _ in range(2)]
    heads = [[Head(cfg), Head(cfg)] for _ in models]
    return save_checkpoint(
        path, models[0], cfg, GraphConverter(), Normalizer(3.0, 1.0),
        {"ion": "Li", "std_scale": std_scale}, heads=heads[0],
        members=[(models[1], heads[1])],
    )  # fmt: skip


def write_predictions(path: Path, ids: list[str], y: np.ndarray, served: np.ndarray) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "target", "served", "cgcnn"])
        for i, t, p in zip(ids, y, served, strict=True):
            w.writerow([i, f"{t:.4f}", f"{p:.4f}", f"{p:.4f}"])


def test_the_test_std_is_the_served_std_and_a_stale_csv_is_refused(tiny_data, tmp_path: Path):
    from training.data.ion_inputs import IonInputs
    from training.graphs.store import GraphStore
    from voltage_model.artifact import load_checkpoint
    from voltage_model.predict import VoltageModel

    data = stage.ion_data(tiny_data["clean"], tiny_data["splits"], ["Li"])["Li"]
    store = GraphStore.load(tiny_data["graphs"])
    ckpt = tiny_checkpoint(tmp_path / "Li.pt", std_scale=0.5)
    model = load_checkpoint(ckpt)
    inputs = IonInputs(data, store, "Li")
    mean, std = stage.served_mean_std(model, inputs, "test")
    hosts = data.host_ids("test")
    assert len(mean) == len(hosts) > 0
    # What the service answers for the same crystals (std x the artifact's std_scale).
    vm = VoltageModel.from_checkpoint(ckpt)
    want_mean, want_std = vm.predict_graphs([store.get(h) for h in hosts])
    np.testing.assert_allclose(mean, want_mean, atol=1e-5)
    np.testing.assert_allclose(std, want_std, atol=1e-5)
    assert np.all(std > 0)

    csv_path = tmp_path / "ion_Li.csv"
    write_predictions(csv_path, data.ids("test"), data.targets("test"), mean)
    got = stage.served_test(inputs, model, csv_path)
    np.testing.assert_allclose(got.std, std)
    np.testing.assert_allclose(got.mean, np.round(mean, 4))
    write_predictions(csv_path, data.ids("test"), data.targets("test"), mean + 0.01)
    with pytest.raises(ValueError, match="stale"):
        stage.served_test(inputs, model, csv_path)


def test_the_stage_end_to_end(tiny_data, tmp_path: Path):
    """``run``: every enabled ion, the CSV of test std, the JSON of the figures' numbers."""
    from training.data.ion_inputs import IonInputs
    from training.graphs.store import GraphStore
    from voltage_model.artifact import load_checkpoint

    ions = ["Li", "Mg"]
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"ions": {i: {"clean_k": None} for i in ions}}))
    data = stage.ion_data(tiny_data["clean"], tiny_data["splits"], ions)
    store = GraphStore.load(tiny_data["graphs"])
    models, preds, metrics, cv = (tmp_path / d for d in ("models", "preds", "metrics", "cv"))
    for d in (models, preds, metrics, cv):
        d.mkdir()
    for ion in ions:
        model = load_checkpoint(tiny_checkpoint(models / f"{ion}.pt", std_scale=0.8))
        mean, _ = stage.served_mean_std(model, IonInputs(data[ion], store, "Li"), "test")
        write_predictions(preds / f"ion_{ion}.csv", data[ion].ids("test"),
                          data[ion].targets("test"), mean)  # fmt: skip
    (metrics / "baselines_Mg.json").write_text(json.dumps({"rf_importance_top15": [["a", 1.0]]}))
    write_cv(cv, "average")
    opts = stage.Options(
        preds, cv, metrics, models, tiny_data["clean"], tiny_data["splits"], tiny_data["graphs"],
        tmp_path / "out", tmp_path / "rf", tmp_path / "test.csv", tmp_path / "plots.json",
        None, params,
    )  # fmt: skip
    files = stage.run(opts)
    assert all(p.is_file() for p in files)
    assert all(is_png(p) for p in files if p.suffix == ".png")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "parity_test.png", "parity_cv_host.png", "reliability.png"}  # fmt: skip
    assert [p.name for p in (tmp_path / "rf").iterdir()] == ["Mg.png"]
    summary = json.loads((tmp_path / "plots.json").read_text())
    assert summary["std_scale"] == {"Li": 0.8, "Mg": 0.8}
    assert set(summary["ions"]["Mg"]) == {"test", "cv_host", "cv_chemsys"}
    with (tmp_path / "test.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["ion"] == "Li"]
    y = np.array([float(r["target"]) for r in rows])
    pred = np.array([float(r["served"]) for r in rows])
    assert summary["ions"]["Li"]["test"]["n"] == len(rows) == len(data["Li"].ids("test"))
    assert summary["ions"]["Li"]["test"]["mae"] == pytest.approx(np.mean(np.abs(pred - y)))
    assert all(float(r["served_std"]) > 0 for r in rows)


# ------------------------------------------------------------------------------ RF importance
def test_permutation_importances_rank_the_signal_and_leave_the_forest_as_it_was():
    from sklearn.datasets import make_regression

    from training.baselines.models import (
        PermutationSettings,
        RFParams,
        make_rf,
        rf_permutation_importances,
        rf_permutation_report,
    )

    X, y = make_regression(n_samples=160, n_features=5, n_informative=1, noise=0.1,
                           random_state=0, coef=False)  # fmt: skip
    signal = int(np.argmax([abs(np.corrcoef(X[:, j], y)[0, 1]) for j in range(5)]))
    model = make_rf(RFParams(n_estimators=30, seed=0, n_jobs=2)).fit(X[:120], y[:120])
    before = model.predict(X[120:])
    names = [f"f{j}" for j in range(5)]
    shuffles = PermutationSettings(seed=0, repeats=3)
    perm = rf_permutation_importances(model, X[120:], y[120:], names, shuffles)
    assert perm[0][0] == f"f{signal}" and perm[0][1] > 10 * max(abs(r[1]) for r in perm[1:])
    assert [r[1] for r in perm] == sorted((r[1] for r in perm), reverse=True)
    again = rf_permutation_importances(model, X[120:], y[120:], names, shuffles)
    assert again == perm  # seeded: repeatable
    assert model.named_steps["model"].n_jobs == 2  # restored
    # (a threaded forest sums its trees in no fixed order: equal up to rounding)
    np.testing.assert_allclose(model.predict(X[120:]), before, rtol=1e-12)
    entry = rf_permutation_report(perm, n_rows=40, top=2, repeats=3)["rf_permutation_val"]
    assert entry["split"] == "val" and entry["n_rows"] == 40 and entry["repeats"] == 3
    assert [r[0] for r in entry["top"]] == [perm[0][0], perm[1][0]]
    assert rf_permutation_report(None, n_rows=40) == {}


def test_permutation_importances_equal_scikit_learns_in_stacked_calls():
    """The stacked prediction reproduces ``sklearn.inspection.permutation_importance`` exactly,
    whatever the stack size (one column per call, several, all at once)."""
    from sklearn.datasets import make_regression
    from sklearn.inspection import permutation_importance

    from training.baselines.models import (
        PermutationSettings,
        RFParams,
        make_rf,
        rf_permutation_importances,
    )

    X, y = make_regression(n_samples=90, n_features=7, n_informative=3, noise=0.5,
                           random_state=1)  # fmt: skip
    X[::7, 2] = np.nan  # the pipeline's imputer sees gaps, as descriptors have
    model = make_rf(RFParams(n_estimators=20, seed=3, n_jobs=1)).fit(X[:60], y[:60])
    names = [f"f{j}" for j in range(7)]
    ref = permutation_importance(model, X[60:], y[60:], scoring="neg_mean_absolute_error",
                                 n_repeats=4, random_state=11)  # fmt: skip
    expected = sorted(zip(names, ref.importances_mean.tolist(), ref.importances_std.tolist(),
                          strict=True), key=lambda r: (-r[1], r[0]))  # fmt: skip
    for rows_per_call in (1, 30 * 4 * 3, 10**6):
        got = rf_permutation_importances(
            model, X[60:], y[60:], names,
            PermutationSettings(seed=11, repeats=4, rows_per_call=rows_per_call))  # fmt: skip
        assert got == expected
