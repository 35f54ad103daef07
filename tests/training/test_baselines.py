"""Conventional-ML baselines: composition features, their cache, and the models on one ion's
splits (tuned by grouped inner CV on train+val; ``test_baselines_tuning.py`` covers the tuning
API, the pooled variants and the stage).

Uses real (made-up but valid) Li transition-metal oxide/phosphate formulas with a synthetic
voltage that depends on composition, so the models have real signal to find.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Composition

from training.baselines.models import BaselineConfig, RFParams, rf_importance_groups
from training.baselines.suite import BaselineInputs, SplitRows, run_baselines
from voltage_model import composition as features
from voltage_model.composition import composition_features, feature_group, featurize_cached

METALS = ("Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu")
FRAMEWORKS = ("{M}O2", "{M}PO4", "{M}SiO4", "{M}BO3", "{M}2O5", "{M}P2O7")
LITHIUM = ("", "Li", "Li2")


def _formulas() -> list[str]:
    """60 formulas with distinct reduced compositions (Magpie only sees atomic fractions)."""
    out: dict[str, str] = {}
    for frame, metal, li in itertools.product(FRAMEWORKS, METALS, LITHIUM):
        formula = li + frame.format(M=metal)
        out.setdefault(Composition(formula).reduced_formula, formula)
    formulas = list(out.values())
    return [formulas[i] for i in np.random.default_rng(0).permutation(len(formulas))[:60]]


def _target(formulas: list[str], seed: int = 0) -> np.ndarray:
    """Synthetic voltage: 2 x mean Pauling electronegativity + small noise."""
    rng = np.random.default_rng(seed)
    y = np.array([2.0 * Composition(f).average_electroneg for f in formulas])
    return y + rng.normal(0.0, 0.02, size=len(y))


@pytest.fixture(scope="module")
def dataset() -> dict:
    formulas = _formulas()
    X, names = composition_features(formulas)
    y = _target(formulas)
    idx = np.random.default_rng(1).permutation(len(formulas))
    tr, va, te = idx[:36], idx[36:48], idx[48:]
    return {"formulas": formulas, "X": X, "names": names, "y": y, "tr": tr, "va": va, "te": te}


def _small_cfg(**overrides) -> BaselineConfig:
    """Small grids, 3 folds and small single-threaded forests, so the test file stays fast."""
    cfg = BaselineConfig(
        rf=RFParams(n_estimators=60, seed=3, n_jobs=1), cv_folds=3, cv_rf_trees=30,
        svr_grid={"C": [3.0, 30.0], "gamma": [0.01, 0.03]},
        krr_grid={"alpha": [0.01, 0.1], "gamma": [0.005, 0.02]},
        rf_grid={"min_samples_leaf": [1, 3]},
    )  # fmt: skip
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _hosts(ds: dict, rows: np.ndarray) -> list[str]:
    """Host structure of each row: formulas i and i+1 (in dataset order) share one host."""
    return [f"host-{i // 2}" for i in rows]


def _run(ds: dict, cfg: BaselineConfig, y: np.ndarray | None = None) -> dict:
    X = ds["X"]
    y = ds["y"] if y is None else y
    tr, va, te = ds["tr"], ds["va"], ds["te"]
    ids = {"val": [ds["formulas"][i] for i in va], "test": [ds["formulas"][i] for i in te]}
    rows = {s: SplitRows(X[r], y[r], ids.get(s), _hosts(ds, r))
            for s, r in (("train", tr), ("val", va), ("test", te))}  # fmt: skip
    inputs = BaselineInputs(rows["train"], rows["val"], rows["test"], ds["names"])
    return run_baselines(inputs, cfg)


@pytest.fixture(scope="module")
def results(dataset: dict) -> dict:
    return _run(dataset, _small_cfg())


# --------------------------------------------------------------------------- features
def test_feature_shape_and_names(dataset: dict) -> None:
    X, names = dataset["X"], dataset["names"]
    assert X.shape == (60, len(names))
    assert X.dtype == np.float64
    assert len(set(names)) == len(names)
    assert sum(n.startswith("MagpieData ") for n in names) == 132
    assert "MagpieData mean CovalentRadius" in names
    assert np.isfinite(X).all()
    # Different compositions give different rows.
    assert len({row.tobytes() for row in X}) == len(X)


def test_duplicate_formulas_share_rows() -> None:
    X, _ = composition_features(["LiFePO4", "FePO4", "LiFePO4"])
    np.testing.assert_array_equal(X[0], X[2])
    assert not np.array_equal(X[0], X[1])


def test_bad_formula_raises() -> None:
    with pytest.raises(ValueError):
        composition_features(["Xq2O3"])


def test_feature_groups() -> None:
    assert feature_group("MagpieData avg_dev CovalentRadius") == "CovalentRadius"
    assert feature_group("MagpieData mean GSvolume_pa") == "GSvolume_pa"
    assert feature_group("frac d valence electrons") == "ValenceOrbital"
    assert feature_group("2-norm") == "Stoichiometry"


def test_cache_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "sub" / "features.npz"
    formulas = ["LiCoO2", "CoO2", "LiFePO4", "LiCoO2"]
    X1, names1 = featurize_cached(formulas, cache)
    assert cache.exists()
    X_ref, _ = composition_features(formulas)
    np.testing.assert_array_equal(X1, X_ref)
    with np.load(cache, allow_pickle=False) as npz:  # plain arrays, no pickled objects
        assert sorted(npz["formulas"].tolist()) == ["CoO2", "LiCoO2", "LiFePO4"]

    def boom(_formulas):
        raise AssertionError("featuriser called although everything is cached")

    monkeypatch.setattr(features, "composition_features", boom)
    X2, names2 = featurize_cached(list(reversed(formulas)), cache)
    assert names2 == names1
    np.testing.assert_array_equal(X2, X1[::-1])


def test_cache_featurises_only_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "features.npz"
    featurize_cached(["LiMnO2", "MnO2"], cache)
    seen: list[list[str]] = []
    real = features.composition_features

    def spy(formulas):
        seen.append(list(formulas))
        return real(formulas)

    monkeypatch.setattr(features, "composition_features", spy)
    X, _ = featurize_cached(["MnO2", "LiNiO2", "LiNiO2"], cache)
    assert seen == [["LiNiO2"]]
    np.testing.assert_array_equal(X, real(["MnO2", "LiNiO2", "LiNiO2"])[0])


# --------------------------------------------------------------------------- models
def test_models_beat_mean(results: dict) -> None:
    assert set(results) == {"mean", "svr", "krr", "rf", "gp_comp"}
    mean_mae = results["mean"].metrics["test"]["mae"]
    for name in ("svr", "krr", "rf", "gp_comp"):
        m = results[name].metrics
        assert set(m) == {"train", "val", "test"}
        assert set(m["test"]) == {"mae", "rmse", "r2"}
        assert m["test"]["mae"] < mean_mae, name
        assert m["test"]["r2"] > 0.0, name


def test_predictions_keyed_by_id(results: dict, dataset: dict) -> None:
    for split, rows in (("test", dataset["te"]), ("val", dataset["va"])):
        ids = [dataset["formulas"][i] for i in rows]
        for res in results.values():
            assert list(res.predictions[split]) == ids
            assert all(isinstance(v, float) for v in res.predictions[split].values())
    assert results["rf"].test_predictions is results["rf"].predictions["test"]
    train_mean = float(dataset["y"][dataset["tr"]].mean())
    for v in results["mean"].test_predictions.values():
        assert v == pytest.approx(train_mean)


def test_only_gp_gives_a_std(results: dict) -> None:
    for name, res in results.items():
        if name == "gp_comp":
            assert res.std is not None and set(res.std) == {"val", "test"}
            assert all((s > 0).all() and np.isfinite(s).all() for s in res.std.values())
        else:
            assert res.std is None, name


def test_rf_importances(results: dict, dataset: dict) -> None:
    imp = results["rf"].importances
    assert imp is not None and len(imp) == len(dataset["names"])
    values = [v for _, v in imp]
    assert sum(values) == pytest.approx(1.0)
    assert values == sorted(values, reverse=True)
    groups = rf_importance_groups(imp)
    assert sum(v for _, v in groups) == pytest.approx(1.0)
    assert "CovalentRadius" in dict(groups)
    # The target is built from electronegativity, so that property should rank near the top.
    assert "Electronegativity" in [g for g, _ in groups[:5]]
    for name in ("mean", "svr", "krr", "gp_comp"):
        assert results[name].importances is None


def test_deterministic(results: dict, dataset: dict) -> None:
    again = _run(dataset, _small_cfg())
    for name, res in results.items():
        assert again[name].metrics == res.metrics
        assert again[name].predictions == res.predictions
        assert again[name].search == res.search
    assert again["rf"].importances == results["rf"].importances


def test_group_cv_picks_the_lowest_cv_mae(results: dict) -> None:
    """Every grid point is scored by inner CV; the first lowest wins; its CV MAE is reported."""
    grid_sizes = (("svr", "C", 4), ("krr", "alpha", 4), ("rf", "min_samples_leaf", 2))
    for name, key, n_points in grid_sizes:
        res = results[name]
        assert len(res.search) == n_points
        best = min(res.search, key=lambda e: e["cv_mae"])  # min keeps the first on ties
        assert res.params[key] == best["params"][key]
        assert res.fitted is not None and res.fitted.choice == best["params"]
        if name != "rf":  # forests: searched with small forests, rescored at full size
            assert res.cv_mae == best["cv_mae"]
    assert results["rf"].params["n_estimators"] == 60 and results["rf"].cv_mae is not None
    for name in ("mean", "gp_comp"):  # nothing to tune, CV still scores them
        assert [e["params"] for e in results[name].search] == [{}]
        assert results[name].cv_mae is not None and np.isfinite(results[name].cv_mae)


def test_choice_never_reads_the_test_targets(results: dict, dataset: dict) -> None:
    """Scrambled test targets: same choices, same searches, same val and test predictions."""
    y = dataset["y"].copy()
    te = dataset["te"]
    y[te] = np.random.default_rng(7).permutation(y[te]) + 3.0
    scrambled = _run(dataset, _small_cfg(), y)
    for name, res in results.items():
        assert scrambled[name].search == res.search, name
        assert scrambled[name].params == res.params, name
        assert scrambled[name].predictions == res.predictions, name
        assert scrambled[name].metrics["val"] == res.metrics["val"], name
        assert scrambled[name].metrics["test"] != res.metrics["test"], name


def test_fixed_select_keeps_the_configured_params(dataset: dict) -> None:
    res = _run(dataset, _small_cfg(select="fixed"))
    assert res["svr"].params["C"] == BaselineConfig().svr.C
    assert res["krr"].params["alpha"] == BaselineConfig().krr.alpha
    for r in res.values():
        if "@" not in r.name:  # one point, still scored by CV (cv_mae picks the best baseline)
            assert [e["params"] for e in r.search] == [{}] and r.cv_mae is not None


@pytest.mark.filterwarnings("ignore:Degrees of freedom:RuntimeWarning")  # the all-NaN column
def test_nan_features_are_imputed(dataset: dict) -> None:
    X = dataset["X"].copy()
    X[::5, 0] = np.nan  # sparse gaps
    X[:, 1] = np.nan  # a column empty in every split must not shift feature names
    tr, va, te = dataset["tr"], dataset["va"], dataset["te"]
    y = dataset["y"]
    inputs = BaselineInputs(
        SplitRows(X[tr], y[tr]), SplitRows(X[va], y[va]), SplitRows(X[te], y[te]),
        feature_names=dataset["names"],
    )  # fmt: skip
    res = run_baselines(inputs, _small_cfg())
    assert all(np.isfinite(r.metrics["test"]["mae"]) for r in res.values())
    assert len(res["rf"].importances) == X.shape[1]


def test_config_from_dict() -> None:
    cfg = BaselineConfig.from_dict(
        {"svr": {"C": 3.0}, "rf": {"n_estimators": 10, "seed": 7, "max_features": 0.5},
         "select": "fixed", "cv_folds": 4},
        {"nu": 1.5, "descriptor_weights": [0.0, 0.5], "task_weights": [2.0]},
    )  # fmt: skip
    assert cfg.svr.C == 3.0 and cfg.svr.epsilon == BaselineConfig().svr.epsilon
    assert cfg.rf.n_estimators == 10 and cfg.rf.seed == 7 and cfg.rf.max_features == 0.5
    assert cfg.select == "fixed" and cfg.cv_folds == 4
    # The transfer head's kernel, with the descriptors as the GP's only input.
    assert cfg.gp.nu == 1.5 and cfg.gp.descriptor_weights == (1.0,)
    assert cfg.gp.task_weights == (2.0,)
    assert BaselineConfig.from_dict(cfg.to_dict()) == cfg
    assert BaselineConfig().select == "group_cv"
    with pytest.raises(ValueError, match="unknown"):
        BaselineConfig.from_dict({"svm": {}})
    with pytest.raises(ValueError, match="unknown"):  # replaced by select
        BaselineConfig.from_dict({"select_on_val": True})
    with pytest.raises(ValueError, match="select"):
        BaselineConfig.from_dict({"select": "validation"})
    with pytest.raises(TypeError):
        BaselineConfig.from_dict({"krr": {"lambda": 1.0}})


def test_forest_is_refitted_per_seed_and_the_first_seed_is_the_main_fit(dataset: dict) -> None:
    """``seeds``: one forest per seed (``rf@<seed>``), the first is ``rf`` (importances, and the
    same fit ``rf.seed`` = that seed gives), with the hyperparameters chosen for it; other
    models are fitted once."""
    res = _run(dataset, _small_cfg(seeds=[5, 6, 7]))
    assert list(res) == ["mean", "svr", "krr", "rf", "rf@6", "rf@7", "gp_comp"]
    assert res["rf@6"].params["seed"] == 6 and res["rf@6"].importances is None
    assert res["rf@6"].params["min_samples_leaf"] == res["rf"].params["min_samples_leaf"]
    assert res["rf@6"].cv_mae is None and res["rf@6"].search == []
    single = _run(dataset, _small_cfg(rf=RFParams(n_estimators=60, seed=5, n_jobs=1)))
    assert res["rf"].test_predictions == single["rf"].test_predictions
    assert res["rf@6"].test_predictions != res["rf"].test_predictions  # a different forest
    mean_mae = res["mean"].metrics["test"]["mae"]
    assert all(res[n].metrics["test"]["mae"] < mean_mae for n in ("rf", "rf@6", "rf@7"))
    assert BaselineConfig.from_dict({"seeds": [1, 2]}).first_rf.seed == 1
    with pytest.raises(ValueError, match="seeds"):
        BaselineConfig.from_dict({"seeds": []})
