"""Conventional-ML baselines on composition descriptors: their names, settings and pipelines.

They give the CGCNN and its transfer heads a yardstick: Zhang et al. (2022) compare against
mean/SVR/KRR/random forest on composition, and the random forest's Gini importances show which
elemental properties carry the voltage signal (the paper finds covalent radius first, ~20%).
Beside those: ``gp_comp``, a Gaussian process on the descriptors alone (the GP transfer head
with the backbone's pooled vector removed), and, for ions with pool partners, ``*_pooled``
variants that see the partners' training crystals exactly as the pooled GP transfer head does.

Every model is an sklearn Pipeline (or a GP head) whose imputer and scaler are fitted on its own
training rows only. Tuning (grouped inner CV on train+val) lives in ``tuning.py``; running every
method on an ion's splits in ``suite.py``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.compose import TransformedTargetRegressor
from sklearn.dummy import DummyRegressor
from sklearn.ensemble import RandomForestRegressor
from sklearn.impute import SimpleImputer
from sklearn.kernel_ridge import KernelRidge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR

from voltage_model.composition import feature_group
from voltage_model.models.gp_head import GPConfig

if TYPE_CHECKING:
    from training.config import BaselinesSettings, GPSettings

POOLED_SUFFIX = "_pooled"
# Methods on the ion's own crystals, then the ones that also pool its partners' training crystals
# (only for ions with ``ions.<ion>.pool`` partners).
OWN_METHODS = ("mean", "svr", "krr", "rf", "gp_comp")
POOLED_METHODS = ("krr_pooled", "rf_pooled", "gp_comp_pooled")
BASELINE_METHODS = (*OWN_METHODS, *POOLED_METHODS)
BASELINE_NAMES = OWN_METHODS  # the methods every ion gets
SELECTIONS = ("fixed", "group_cv")
SEED_SEP = "@"  # "rf@1": the forest refitted with seed 1 (a predictions-CSV column)


def seeded_name(name: str, seed: int) -> str:
    """The result / column name of a baseline refitted with a further seed."""
    return f"{name}{SEED_SEP}{seed}"


def base_name(column: str) -> str:
    """The baseline a result / column belongs to: ``rf@1`` -> ``rf``."""
    return column.split(SEED_SEP)[0]


def model_family(name: str) -> str:
    """The model a method fits: ``krr_pooled`` -> ``krr`` (same pipeline, more rows)."""
    return name.removesuffix(POOLED_SUFFIX)


def is_pooled(name: str) -> bool:
    return name.endswith(POOLED_SUFFIX)


def check_method(name: str) -> None:
    if name not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline {name!r}; expected one of {BASELINE_METHODS}")


# --------------------------------------------------------------------------- configuration
@dataclass
class SVRParams:
    """RBF support-vector regression; ``epsilon`` is in volts (targets are not rescaled).

    Defaults (here and below) come from 5-fold CV on the Li train+val rows, test untouched; they
    are what ``select: fixed`` uses and what a grid does not override.
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
    """Random forest; ``seed`` fixes bootstrap and feature sampling, so results are repeatable.
    ``max_features``: a float is the fraction of columns tried per split (1.0: all of them)."""

    n_estimators: int = 300
    max_depth: int | None = None
    min_samples_leaf: int = 1
    max_features: float | int | str | None = 1.0
    seed: int = 0
    n_jobs: int = -1


def _default_svr_grid() -> dict[str, list[Any]]:
    return {"C": [1.0, 3.0, 10.0, 30.0, 100.0, 300.0], "gamma": [0.001, 0.003, 0.01, 0.02, 0.05]}


def _default_krr_grid() -> dict[str, list[Any]]:
    return {"alpha": [0.003, 0.01, 0.03, 0.1, 0.3],
            "gamma": [0.001, 0.002, 0.005, 0.01, 0.02, 0.05]}  # fmt: skip


def _default_rf_grid() -> dict[str, list[Any]]:
    return {"min_samples_leaf": [1, 3], "max_features": [1.0, 0.33]}


def baseline_gp_config(transfer_gp: Mapping[str, Any] | None = None) -> GPConfig:
    """The ``gp_comp`` GP: the transfer head's kernel (Matern ``nu``) and ion-column scales
    (``task_weights``), with the composition descriptors as its only input (weight 1: with no
    pooled vector beside them, a weight would only rescale the fitted length scale)."""
    d = dict(transfer_gp or {})
    return GPConfig(nu=float(d.get("nu", 0.5)), n_restarts=int(d.get("n_restarts", 0)),
                    descriptor_weights=(1.0,),
                    task_weights=tuple(d.get("task_weights", (1.0,))))  # fmt: skip


@dataclass
class BaselineConfig:
    """Hyperparameters of all baselines and how they are chosen.

    ``select``: ``"group_cv"`` tunes every method per ion by grouped k-fold CV (``cv_folds``,
    groups = host structures) over the ion's train+val rows, lowest CV MAE wins; ``"fixed"``
    keeps the values above (CV still scores them, for ``cv_mae``). The grids map a field of the
    params dataclass to candidate values; each combination overrides the defaults. Pooled
    variants use their family's grid. ``cv_rf_trees``: forests in the grid search have this
    many trees (None: ``rf.n_estimators``); the chosen forest is rescored by CV and fitted with
    the full count, so its ``cv_mae`` is the fitted forest's.
    ``gp``: the ``gp_comp`` kernel, from ``transfer.gp`` (see ``baseline_gp_config``).
    """

    svr: SVRParams = field(default_factory=SVRParams)
    krr: KRRParams = field(default_factory=KRRParams)
    rf: RFParams = field(default_factory=RFParams)
    select: str = "group_cv"
    cv_folds: int = 5
    cv_rf_trees: int | None = 50
    # The random forests are fitted once per seed (replacing ``rf.seed``): the comparison reports
    # their mean +- std. None: ``rf.seed`` alone. The other methods are deterministic.
    seeds: list[int] | None = None
    svr_grid: dict[str, list[Any]] = field(default_factory=_default_svr_grid)
    krr_grid: dict[str, list[Any]] = field(default_factory=_default_krr_grid)
    rf_grid: dict[str, list[Any]] = field(default_factory=_default_rf_grid)
    gp: GPConfig = field(default_factory=baseline_gp_config)

    def __post_init__(self) -> None:
        if self.select not in SELECTIONS:
            raise ValueError(f"baselines.select must be one of {SELECTIONS}, got {self.select!r}")
        if self.cv_folds < 2:
            raise ValueError(f"baselines.cv_folds must be >= 2, got {self.cv_folds}")
        if self.cv_rf_trees is not None and self.cv_rf_trees < 1:
            raise ValueError(f"baselines.cv_rf_trees must be >= 1 or null, got {self.cv_rf_trees}")

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any] | None, transfer_gp: Mapping[str, Any] | None = None
    ) -> BaselineConfig:
        """Build from params.yaml's ``baselines`` mapping (absent keys keep their defaults,
        unknown keys fail) and ``transfer.gp`` (the ``gp_comp`` kernel)."""
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
        if transfer_gp is not None or "gp" in d:
            d["gp"] = baseline_gp_config(transfer_gp if transfer_gp is not None else d["gp"])
        return cls(**d)

    @classmethod
    def from_settings(cls, s: BaselinesSettings, transfer_gp: GPSettings) -> BaselineConfig:
        """From the typed ``baselines`` section and ``transfer.gp`` (the ``gp_comp`` kernel)."""
        return cls.from_dict(s.model_dump(), transfer_gp.model_dump())

    @property
    def first_seed(self) -> int:
        """The forests' main seed: the first of ``seeds`` (else ``rf.seed``)."""
        return self.seeds[0] if self.seeds else self.rf.seed

    @property
    def first_rf(self) -> RFParams:
        """The forest's parameters with the first of ``seeds`` (its main, importance-giving fit)."""
        return replace(self.rf, seed=self.first_seed)

    def grid(self, family: str) -> dict[str, list[Any]]:
        """The search grid of a model family (empty: nothing to tune, e.g. mean, gp_comp)."""
        return {"svr": self.svr_grid, "krr": self.krr_grid, "rf": self.rf_grid}.get(family, {})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for MLflow params / JSON)."""
        return asdict(self)


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
def make_imputer() -> SimpleImputer:
    # keep_empty_features: an all-NaN training column stays (as 0) so feature names stay aligned.
    return SimpleImputer(strategy="median", keep_empty_features=True)


def make_mean() -> Pipeline:
    """Predicts the training-target mean: the floor every real model must beat."""
    return Pipeline([("model", DummyRegressor(strategy="mean"))])


def make_svr(p: SVRParams) -> Pipeline:
    """Impute -> standardise -> RBF SVR (kernels need comparable feature scales)."""
    svr = SVR(kernel="rbf", C=p.C, epsilon=p.epsilon, gamma=p.gamma)
    return Pipeline([("impute", make_imputer()), ("scale", StandardScaler()), ("model", svr)])


def make_krr(p: KRRParams) -> Pipeline:
    """Impute -> standardise -> kernel ridge on centred targets.

    KernelRidge has no intercept, so an RBF model would shrink towards 0 V away from the
    training data; centring the target makes it shrink towards the training mean instead.
    """
    krr = KernelRidge(alpha=p.alpha, kernel=p.kernel, gamma=p.gamma)
    centred = TransformedTargetRegressor(regressor=krr, transformer=StandardScaler(with_std=False))
    return Pipeline([("impute", make_imputer()), ("scale", StandardScaler()), ("model", centred)])


def make_rf(p: RFParams) -> Pipeline:
    """Impute -> random forest (trees are scale invariant, so no scaler)."""
    rf = RandomForestRegressor(
        n_estimators=p.n_estimators,
        max_depth=p.max_depth,
        min_samples_leaf=p.min_samples_leaf,
        max_features=p.max_features,
        random_state=p.seed,
        n_jobs=p.n_jobs,
    )
    return Pipeline([("impute", make_imputer()), ("model", rf)])


# --------------------------------------------------------------------------- grids
def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of a grid, in a fixed order (so ties resolve deterministically)."""
    keys = list(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]


def rf_importances(model: Pipeline, names: Sequence[str]) -> list[tuple[str, float]]:
    """Gini importances of the fitted forest, (name, importance) sorted descending."""
    imp = model.named_steps["model"].feature_importances_
    pairs = [(str(n), float(v)) for n, v in zip(names, imp, strict=True)]
    return sorted(pairs, key=lambda nv: (-nv[1], nv[0]))


# Permutations per column of the forest's permutation importances (mean and std over them).
PERMUTATION_REPEATS = 5


@dataclass(frozen=True)
class PermutationSettings:
    """How ``rf_permutation_importances`` shuffles: the shuffles' own ``seed``, ``repeats``
    permutations per column, and ``rows_per_call``: how many permuted copies of the rows the
    forest predicts in one call (bounds the stacked copy's memory, not the result)."""

    seed: int = 0
    repeats: int = PERMUTATION_REPEATS
    rows_per_call: int = 200_000


def _permuted_copies(X: np.ndarray, col: int, seed: int, repeats: int) -> list[np.ndarray]:
    """The ``repeats`` shuffles of column ``col`` that scikit-learn's ``permutation_importance``
    scores for that column (``_calculate_permutation_scores``: one ``RandomState(seed)`` per
    column, the index array reshuffled in place and applied to the already shuffled copy)."""
    rs = np.random.RandomState(seed)
    X_perm = X.copy()
    idx = np.arange(len(X))
    out = []
    for _ in range(repeats):
        rs.shuffle(idx)
        X_perm[:, col] = X_perm[idx, col]
        out.append(X_perm.copy())
    return out


def _permutation_maes(model: Pipeline, X: np.ndarray, y: np.ndarray,
                      settings: PermutationSettings) -> tuple[float, np.ndarray]:  # fmt: skip
    """Validation MAE of the intact rows and (n_columns, repeats) MAEs with one column shuffled.

    The shuffles are scikit-learn's (same seed drawn from ``settings.seed``, same order), but
    the permuted copies of many columns are stacked and predicted in one call: a forest predicts
    each row independently, so one call over the stack gives the per-copy predictions of
    ``permutation_importance``'s 5 x n_columns calls, without its per-call, per-tree dispatch,
    which was ~65 s of Li's baselines stage (300 trees x 146 columns x 5)."""
    seed = np.random.RandomState(settings.seed).randint(np.iinfo(np.int32).max + 1)
    base = float(np.abs(model.predict(X) - y).mean())
    per_call = max(1, settings.rows_per_call // max(1, len(X) * settings.repeats))
    maes = np.empty((X.shape[1], settings.repeats))
    for first in range(0, X.shape[1], per_call):
        cols = range(first, min(first + per_call, X.shape[1]))
        copies = [c for col in cols for c in _permuted_copies(X, col, seed, settings.repeats)]
        pred = model.predict(np.vstack(copies)).reshape(len(copies), len(X))
        errors = np.abs(pred - y).mean(axis=1)  # MAE per copy
        maes[first : first + len(cols)] = errors.reshape(len(cols), settings.repeats)
    return base, maes


def rf_permutation_importances(
    model: Pipeline, X: np.ndarray, y: np.ndarray, names: Sequence[str],
    settings: PermutationSettings = PermutationSettings(),
) -> list[tuple[str, float, float]]:  # fmt: skip
    """Permutation importances of the fitted forest on held-out rows (the validation split):
    (name, mean, std over ``settings.repeats``) of the increase in MAE, in volts, when that
    column alone is shuffled, sorted descending. Unlike Gini importances (impurity decrease on
    the training rows) they measure what the fitted model loses on rows it never saw; correlated
    columns share the credit (shuffling one leaves its twins), so a property spread over six
    Magpie statistics can rank lower here than its Gini sum.

    The figures are scikit-learn's ``permutation_importance`` (scoring
    ``neg_mean_absolute_error``, ``random_state=settings.seed``), computed in stacked calls
    (``_permutation_maes``; tests/training/test_plots.py checks the equality). Prediction only:
    the forest is not refitted and the shuffles draw from their own seed, so no other number of
    the stage moves. The forest predicts single-threaded meanwhile, so its trees are summed in a
    fixed order (restored after).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    forest = model.named_steps["model"]
    kept = forest.n_jobs
    forest.set_params(n_jobs=1)
    try:
        base, maes = _permutation_maes(model, X, y, settings)
    finally:
        forest.set_params(n_jobs=kept)
    importances = maes - base
    rows = [(str(n), float(m), float(s)) for n, m, s in
            zip(names, importances.mean(axis=1), importances.std(axis=1), strict=True)]  # fmt: skip
    return sorted(rows, key=lambda r: (-r[1], r[0]))


def rf_permutation_report(
    importances: Sequence[tuple[str, float, float]] | None, n_rows: int, top: int = 15,
    repeats: int = PERMUTATION_REPEATS,
) -> dict[str, Any]:  # fmt: skip
    """The metrics-JSON entry of ``rf_permutation_importances`` (empty without them):
    ``rf_permutation_val`` with the first ``top`` as [name, mean, std] (V of validation MAE)."""
    if not importances:
        return {}
    return {"rf_permutation_val": {
        "score": "increase in validation MAE (V) when the column is shuffled",
        "split": "val", "n_rows": int(n_rows), "repeats": int(repeats),
        "top": [[n, round(m, 4), round(s, 4)] for n, m, s in importances[:top]],
    }}  # fmt: skip


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
