"""Conventional-ML baselines on composition descriptors: mean, SVR, KRR and random forest.

They give the CGCNN a yardstick: Zhang et al. (2022) compare against exactly these model
families, and the random forest's Gini importances show which elemental properties carry the
voltage signal (the paper finds covalent radius first, ~20%).

Every model is an sklearn Pipeline whose imputer (column medians) and scaler are fitted on the
training split only. With ``select_on_val`` a small grid is searched on the validation split;
the test split is scored once, after the choice is made.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.kernel_ridge import KernelRidge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR

from training.baselines.features import feature_group

BASELINE_NAMES = ("mean", "svr", "krr", "rf")
SPLITS = ("train", "val", "test")
SEED_SEP = "@"  # "rf@1": the forest refitted with seed 1 (a predictions-CSV column)


def seeded_name(name: str, seed: int) -> str:
    """The result / column name of a baseline refitted with a further seed."""
    return f"{name}{SEED_SEP}{seed}"


def base_name(column: str) -> str:
    """The baseline a result / column belongs to: ``rf@1`` -> ``rf``."""
    return column.split(SEED_SEP)[0]


# --------------------------------------------------------------------------- configuration
@dataclass
class SVRParams:
    """RBF support-vector regression; ``epsilon`` is in volts (targets are not rescaled).

    Defaults (here and below) come from 5-fold CV on the Li train+val rows, test untouched.
    """

    C: float = 10.0
    epsilon: float = 0.1
    gamma: float | str = 0.02


@dataclass
class KRRParams:
    """Kernel ridge regression; ``gamma=None`` means 1 / n_features (sklearn's default).

    Laplacian beat RBF on Li by ~0.02 V MAE in 5-fold CV (composition space is "spiky").
    """

    alpha: float = 0.03
    kernel: str = "laplacian"
    gamma: float | None = 0.01


@dataclass
class RFParams:
    """Random forest; ``seed`` fixes bootstrap and feature sampling, so results are repeatable."""

    n_estimators: int = 300
    max_depth: int | None = None
    min_samples_leaf: int = 1
    seed: int = 0
    n_jobs: int = -1


def _default_svr_grid() -> dict[str, list[Any]]:
    return {"C": [3.0, 10.0, 30.0], "gamma": [0.01, 0.02, 0.03]}


def _default_krr_grid() -> dict[str, list[Any]]:
    return {"alpha": [0.01, 0.03, 0.1], "gamma": [0.005, 0.01, 0.02]}


def _default_rf_grid() -> dict[str, list[Any]]:
    return {"min_samples_leaf": [1, 2, 4]}


@dataclass
class BaselineConfig:
    """Hyperparameters of all baselines, plus the optional validation grid search.

    The grids map a field name of the corresponding params dataclass to candidate values; each
    candidate combination overrides the defaults above.
    """

    svr: SVRParams = field(default_factory=SVRParams)
    krr: KRRParams = field(default_factory=KRRParams)
    rf: RFParams = field(default_factory=RFParams)
    select_on_val: bool = False
    # The random forest is fitted once per seed (replacing ``rf.seed``): the comparison reports
    # its mean +- std. None: ``rf.seed`` alone. SVR, KRR and the mean are deterministic.
    seeds: list[int] | None = None
    svr_grid: dict[str, list[Any]] = field(default_factory=_default_svr_grid)
    krr_grid: dict[str, list[Any]] = field(default_factory=_default_krr_grid)
    rf_grid: dict[str, list[Any]] = field(default_factory=_default_rf_grid)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> BaselineConfig:
        """Build from a params.yaml mapping; absent keys keep their defaults, unknown keys fail."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown baseline config keys: {sorted(unknown)}")
        nested = {"svr": SVRParams, "krr": KRRParams, "rf": RFParams}
        for key, klass in nested.items():
            if key in d:
                d[key] = klass(**d[key])
        if d.get("seeds") is not None:
            d["seeds"] = [int(x) for x in d["seeds"]]
            if not d["seeds"]:
                raise ValueError("baselines.seeds: give at least one seed (or null)")
        for key in ("svr_grid", "krr_grid", "rf_grid"):
            if key in d:
                d[key] = {k: list(v) for k, v in d[key].items()}
        return cls(**d)

    @property
    def first_rf(self) -> RFParams:
        """The forest's parameters with the first of ``seeds`` (its main, importance-giving fit)."""
        return replace(self.rf, seed=self.seeds[0]) if self.seeds else self.rf

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for MLflow params / JSON)."""
        return asdict(self)


# --------------------------------------------------------------------------- results
@dataclass
class BaselineResult:
    """What one baseline produced.

    metrics: split -> {"mae", "rmse", "r2"}. test_predictions: id -> predicted voltage.
    importances: RF only, (feature, Gini importance) sorted descending, summing to 1.
    val_search: (candidate params, validation MAE) for every grid point tried, in order.
    """

    name: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    test_predictions: dict[str, float]
    importances: list[tuple[str, float]] | None = None
    val_search: list[tuple[dict[str, Any], float]] = field(default_factory=list)
    model: Pipeline | None = field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- metrics
def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R2 (R2 is NaN when the targets are constant)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    err = y_pred - y_true
    ss_tot = float(np.sum((y_true - y_true.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": r2,
    }


# --------------------------------------------------------------------------- pipelines
def _imputer() -> SimpleImputer:
    # keep_empty_features: an all-NaN training column stays (as 0) so feature names stay aligned.
    return SimpleImputer(strategy="median", keep_empty_features=True)


def make_mean() -> Pipeline:
    """Predicts the training-target mean: the floor every real model must beat."""
    return Pipeline([("model", DummyRegressor(strategy="mean"))])


def make_svr(p: SVRParams) -> Pipeline:
    """Impute -> standardise -> RBF SVR (kernels need comparable feature scales)."""
    svr = SVR(kernel="rbf", C=p.C, epsilon=p.epsilon, gamma=p.gamma)
    return Pipeline([("impute", _imputer()), ("scale", StandardScaler()), ("model", svr)])


def make_krr(p: KRRParams) -> Pipeline:
    """Impute -> standardise -> kernel ridge on centred targets.

    KernelRidge has no intercept, so an RBF model would shrink towards 0 V away from the
    training data; centring the target makes it shrink towards the training mean instead.
    """
    krr = KernelRidge(alpha=p.alpha, kernel=p.kernel, gamma=p.gamma)
    centred = TransformedTargetRegressor(regressor=krr, transformer=StandardScaler(with_std=False))
    return Pipeline([("impute", _imputer()), ("scale", StandardScaler()), ("model", centred)])


def make_rf(p: RFParams) -> Pipeline:
    """Impute -> random forest (trees are scale invariant, so no scaler)."""
    rf = RandomForestRegressor(
        n_estimators=p.n_estimators,
        max_depth=p.max_depth,
        min_samples_leaf=p.min_samples_leaf,
        random_state=p.seed,
        n_jobs=p.n_jobs,
    )
    return Pipeline([("impute", _imputer()), ("model", rf)])


# --------------------------------------------------------------------------- selection
def _grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of a grid, in a fixed order (so ties resolve deterministically)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def _select_on_val(
    base: Any,
    grid: Mapping[str, Sequence[Any]],
    make: Callable[[Any], Pipeline],
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[Any, Pipeline, list[tuple[dict[str, Any], float]]]:
    """Fit each grid point on train, keep the lowest validation MAE (first one wins ties)."""
    X_tr, y_tr = data["train"]
    X_va, y_va = data["val"]
    best: tuple[float, Any, Pipeline] | None = None
    search: list[tuple[dict[str, Any], float]] = []
    for candidate in _grid(grid):
        params = replace(base, **candidate)
        model = make(params).fit(X_tr, y_tr)
        mae = regression_metrics(y_va, model.predict(X_va))["mae"]
        search.append((candidate, mae))
        if best is None or mae < best[0]:
            best = (mae, params, model)
    if best is None:  # empty grid: fall back to the base params
        return base, make(base).fit(X_tr, y_tr), search
    return best[1], best[2], search


def _rf_importances(model: Pipeline, names: Sequence[str]) -> list[tuple[str, float]]:
    """Gini importances of the fitted forest, (name, importance) sorted descending."""
    imp = model.named_steps["model"].feature_importances_
    pairs = [(str(n), float(v)) for n, v in zip(names, imp, strict=True)]
    return sorted(pairs, key=lambda nv: (-nv[1], nv[0]))


def rf_importance_groups(importances: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Total importance per underlying property, sorted descending.

    Magpie spreads one elemental property over six statistics (min/max/range/mean/avg_dev/mode),
    which dilutes it in a per-column ranking; summing them gives the per-property figure the
    paper reports (e.g. "CovalentRadius").
    """
    totals: dict[str, float] = defaultdict(float)
    for name, value in importances:
        totals[feature_group(name)] += float(value)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))


# --------------------------------------------------------------------------- driver
def _evaluate(
    name: str,
    model: Pipeline,
    params: dict[str, Any],
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    test_ids: Sequence[str],
) -> BaselineResult:
    """Score a fitted model on every split; the test split is touched only here."""
    preds = {split: model.predict(X) for split, (X, _) in data.items()}
    metrics = {split: regression_metrics(data[split][1], preds[split]) for split in SPLITS}
    test_pred = {str(i): float(p) for i, p in zip(test_ids, preds["test"], strict=True)}
    return BaselineResult(name, params, metrics, test_pred, model=model)


def _other_seeds(
    params: RFParams,
    seeds: Sequence[int] | None,
    data: Mapping[str, tuple[np.ndarray, np.ndarray]],
    test_ids: Sequence[str],
) -> dict[str, BaselineResult]:
    """The forest refitted with each further seed (the first is the main result), named
    ``rf@<seed>``; hyperparameters as chosen for the first seed."""
    out = {}
    for seed in list(seeds or [])[1:]:
        p = replace(params, seed=seed)
        model = make_rf(p).fit(*data["train"])
        name = seeded_name("rf", seed)
        out[name] = _evaluate(name, model, asdict(p), data, test_ids)
    return out


def run_baselines(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    cfg: BaselineConfig | None = None,
    *,
    feature_names: Sequence[str] | None = None,
    test_ids: Sequence[str] | None = None,
    names: Sequence[str] = BASELINE_NAMES,
) -> dict[str, BaselineResult]:
    """Fit and score the requested baselines ("mean", "svr", "krr", "rf").

    feature_names label the RF importances (default ``f0, f1, ...``); test_ids key the test
    predictions (default the row index as a string, e.g. pass battery ids).
    """
    cfg = cfg or BaselineConfig()
    data = {
        "train": (np.asarray(X_train, dtype=np.float64), np.asarray(y_train, dtype=np.float64)),
        "val": (np.asarray(X_val, dtype=np.float64), np.asarray(y_val, dtype=np.float64)),
        "test": (np.asarray(X_test, dtype=np.float64), np.asarray(y_test, dtype=np.float64)),
    }
    n_features = data["train"][0].shape[1]
    feature_names = list(feature_names) if feature_names is not None else None
    if feature_names is None:
        feature_names = [f"f{i}" for i in range(n_features)]
    if len(feature_names) != n_features:
        raise ValueError(f"{len(feature_names)} feature names for {n_features} columns")
    test_ids = [str(i) for i in (test_ids if test_ids is not None else range(len(y_test)))]

    specs: dict[str, tuple[Any, Mapping[str, Sequence[Any]], Callable[[Any], Pipeline]]] = {
        "svr": (cfg.svr, cfg.svr_grid, make_svr),
        "krr": (cfg.krr, cfg.krr_grid, make_krr),
        "rf": (cfg.first_rf, cfg.rf_grid, make_rf),
    }
    results: dict[str, BaselineResult] = {}
    for name in names:
        if name == "mean":
            model = make_mean().fit(*data["train"])
            results[name] = _evaluate(name, model, {}, data, test_ids)
            continue
        if name not in specs:
            raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINE_NAMES}")
        base, grid, make = specs[name]
        search: list[tuple[dict[str, Any], float]] = []
        if cfg.select_on_val:
            params, model, search = _select_on_val(base, grid, make, data)
        else:
            params, model = base, make(base).fit(*data["train"])
        result = _evaluate(name, model, asdict(params), data, test_ids)
        result.val_search = search
        results[name] = result
        if name == "rf":
            result.importances = _rf_importances(model, feature_names)
            results.update(_other_seeds(params, cfg.seeds, data, test_ids))
    return results
