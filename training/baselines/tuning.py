"""Per-ion tuning of the composition baselines by grouped inner CV, and their pooled fits.

``fit_tuned`` is the one routine that turns (features, targets, host groups) into a fitted, tuned
baseline. The baselines stage calls it per ion and method; the cross-validation check
(``training/stages/cv.py``) calls it inside each outer fold for nested CV, so both tune alike.

Why grouped CV and not the validation split: an ion's validation split holds 11-43 crystals,
too few to rank a grid of 20-30 points; 5-fold CV over train+val scores ~10x as many. Folds hold out
whole host structures (``training.gp_cv.group_folds``), as the pipeline's split does, so a fold
never scores a crystal whose host it was fitted on. The test split is never an input here.

Pooled variants (``*_pooled``) see what the pooled GP transfer head sees: the ion's rows plus its
pool partners' training crystals (``PartnerRows``), each ion's targets normalised by its own
rows' mean and std (so the ions' different voltage levels do not blur together), with one-hot
ion columns (own ion = column 0) beside the descriptors. In an inner fold, partner rows whose
host is held out are dropped, as ``training.gp_cv`` does for the GP heads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.compose import TransformedTargetRegressor
from sklearn.kernel_ridge import KernelRidge
from sklearn.metrics.pairwise import euclidean_distances, manhattan_distances
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVR
from threadpoolctl import threadpool_limits

from training.baselines.models import (
    BaselineConfig,
    KRRParams,
    RFParams,
    SVRParams,
    check_method,
    grid_points,
    is_pooled,
    make_imputer,
    make_krr,
    make_mean,
    make_rf,
    make_svr,
    model_family,
)
from voltage_model.models.gp_fit import parallel_fits
from voltage_model.models.gp_head import GPConfig, GPHead, fit_gp_head, head_mean_var
from voltage_model.normalizer import Normalizer

Params = SVRParams | KRRParams | RFParams | None


@contextmanager
def one_thread() -> Iterator[None]:
    """BLAS and torch on one thread while fitting. The matrices here are small (n < ~2000), and
    on the 2-core machine shared with a training run, OpenBLAS threads spin-wait for a busy core:
    measured on Mg, the KRR grid took 15 s with 2 threads and 1.7 s with 1. Forests keep their
    own ``n_jobs`` (joblib threads, not BLAS)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(prev)


# --------------------------------------------------------------------------- partner rows
@dataclass(frozen=True)
class PartnerRows:
    """Pool partner ions' training crystals for the pooled variants.

    ``X``: their composition descriptors (same columns as the ion's own); ``y``: voltages in
    volts; ``ion_index``: 1..n_ions-1 per row (0 is the ion being fitted); ``hosts``: each row's
    host structure id, so a CV fold can drop the hosts it holds out.
    """

    X: np.ndarray
    y: np.ndarray
    ion_index: np.ndarray
    n_ions: int
    hosts: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "X", np.asarray(self.X, dtype=np.float64))
        object.__setattr__(self, "y", np.asarray(self.y, dtype=np.float64))
        object.__setattr__(self, "ion_index", np.asarray(self.ion_index, dtype=np.int64))
        object.__setattr__(self, "hosts", np.asarray(self.hosts, dtype=str))
        n = len(self.y)
        if self.X.ndim != 2 or len(self.X) != n or len(self.ion_index) != n or len(self.hosts) != n:
            raise ValueError("partner rows: X, y, ion_index and hosts differ in length")
        if n and (self.ion_index.min() < 1 or self.ion_index.max() >= self.n_ions):
            raise ValueError(f"partner rows: ion indices must lie in 1..{self.n_ions - 1}")

    def __len__(self) -> int:
        return len(self.y)

    @classmethod
    def from_ions(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, Sequence[str]]]
                  ) -> PartnerRows:  # fmt: skip
        """One (X, y, hosts) block per partner ion, in order: the first gets ion index 1."""
        if not parts:
            raise ValueError("partner rows: no partner ion given")
        index = [np.full(len(y), i + 1) for i, (_, y, _) in enumerate(parts)]
        return cls(X=np.concatenate([np.asarray(x) for x, _, _ in parts]),
                   y=np.concatenate([y for _, y, _ in parts]), ion_index=np.concatenate(index),
                   n_ions=len(parts) + 1, hosts=np.concatenate([np.asarray(h, dtype=str)
                                                              for *_, h in parts]))  # fmt: skip

    def without_hosts(self, hosts: Iterable[str]) -> PartnerRows:
        """These rows less those whose host is in ``hosts`` (a fold's held-out structures)."""
        keep = ~np.isin(self.hosts, np.asarray(sorted(set(hosts)), dtype=str))
        return PartnerRows(X=self.X[keep], y=self.y[keep], ion_index=self.ion_index[keep],
                           n_ions=self.n_ions, hosts=self.hosts[keep])  # fmt: skip

    def normalised_targets(self) -> np.ndarray:
        """Each ion's targets normalised by its own rows here (as ``PooledRows.normalised``)."""
        out = np.empty(len(self.y))
        for i in np.unique(self.ion_index):
            rows = self.ion_index == i
            out[rows] = Normalizer.fit(self.y[rows]).norm(self.y[rows])
        return out


@dataclass(frozen=True)
class _Design:
    """What one fit sees: its rows and targets, plus, when pooled, the one-hot ion columns and
    the own ion's target scaling (predictions are mapped back to its volts)."""

    X: np.ndarray
    y: np.ndarray
    tasks: np.ndarray | None = None
    norm: Normalizer | None = None

    def features(self) -> np.ndarray:
        """Training inputs of an sklearn model: descriptors, then the ion columns."""
        return self.X if self.tasks is None else np.hstack([self.X, self.tasks])

    def query(self, X: np.ndarray) -> np.ndarray:
        """Inputs for predicting the own ion's crystals ``X`` (ion column 0 set)."""
        if self.tasks is None:
            return X
        own = np.zeros((len(X), self.tasks.shape[1]))
        own[:, 0] = 1.0
        return np.hstack([X, own])

    def volts(self, pred: np.ndarray) -> np.ndarray:
        return pred if self.norm is None else self.norm.denorm(pred)


def _design(X: np.ndarray, y: np.ndarray, partners: PartnerRows | None) -> _Design:
    """The own rows alone (volts), or with the partners' rows (targets normalised per ion)."""
    if partners is None:
        return _Design(X, y)
    norm = Normalizer.fit(y)
    index = np.concatenate([np.zeros(len(y), dtype=np.int64), partners.ion_index])
    return _Design(X=np.vstack([X, partners.X]),
                   y=np.concatenate([norm.norm(y), partners.normalised_targets()]),
                   tasks=np.eye(partners.n_ions)[index], norm=norm)  # fmt: skip


# --------------------------------------------------------------------------- fitted models
class _Model(Protocol):
    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def predict_std(self, X: np.ndarray) -> np.ndarray | None: ...


@dataclass(frozen=True)
class _SklearnModel:
    pipeline: Pipeline
    design: _Design = field(repr=False)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.design.volts(self.pipeline.predict(self.design.query(X)))

    def predict_std(self, X: np.ndarray) -> None:
        return None


@dataclass(frozen=True)
class _GPModel:
    """A ``GPHead`` on descriptors alone (an empty pooled vector) and the own ion's scaling."""

    head: GPHead
    norm: Normalizer

    def _mean_var(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        empty = torch.zeros((len(X), 0), dtype=torch.float64)
        with torch.no_grad():
            mean, var = head_mean_var(self.head, empty, torch.as_tensor(X, dtype=torch.float64))
        return mean.numpy(), var.numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.norm.denorm(self._mean_var(X)[0])

    def predict_std(self, X: np.ndarray) -> np.ndarray:
        return np.sqrt(self._mean_var(X)[1]) * self.norm.std

    def params(self) -> dict[str, Any]:
        k = self.head.kernel.tolist()
        task = float(self.head.task.max()) if self.head.n_tasks else None
        return {"nu": k[3], "amplitude": k[0], "length_scale": k[1], "noise": k[2],
                "task_weight": task}  # fmt: skip


def _fit_gp(design: _Design, cfg: GPConfig) -> _GPModel:
    """``fit_gp_head`` with the descriptors as its only input: hyperparameters by marginal
    likelihood on the fit rows, exactly as the transfer head's (its one-hot ion columns too)."""
    norm = design.norm or Normalizer.fit(design.y)
    y = design.y if design.norm is not None else norm.norm(design.y)
    empty = torch.zeros((len(y), 0), dtype=torch.float64)
    return _GPModel(fit_gp_head(empty, y, cfg, design.X, design.tasks), norm)


def _params(family: str, cfg: BaselineConfig, seed: int, choice: Mapping[str, Any],
            cv: bool = False) -> Params:  # fmt: skip
    """A family's parameters: the config's, overridden by a grid point (forests: the seed, and
    ``cv_rf_trees`` trees inside the inner CV)."""
    if family == "rf":
        trees = cfg.cv_rf_trees if cv and cfg.cv_rf_trees else cfg.rf.n_estimators
        return replace(cfg.rf, seed=seed, n_estimators=trees, **choice)
    base = {"svr": cfg.svr, "krr": cfg.krr}.get(family)
    return None if base is None else replace(base, **choice)


def _pipeline(family: str, params: Params) -> Pipeline:
    if family == "mean":
        return make_mean()
    makers = {"svr": make_svr, "krr": make_krr, "rf": make_rf}
    return makers[family](params)  # type: ignore[operator]


def _fit_model(family: str, params: Params, design: _Design, cfg: BaselineConfig) -> _Model:
    if family == "gp_comp":
        return _fit_gp(design, cfg.gp)
    return _SklearnModel(_pipeline(family, params).fit(design.features(), design.y), design)


# --------------------------------------------------------------------------- kernel fast path
_DISTANCES = {
    "laplacian": manhattan_distances,
    "rbf": lambda a, b: euclidean_distances(a, b, squared=True),
}


def _kernel_of(family: str, params: Params) -> str | None:
    """The distance-based kernel of an SVR/KRR candidate (None: no fast path)."""
    if family == "svr" and isinstance(params, SVRParams):
        kernel, gamma = "rbf", params.gamma
    elif family == "krr" and isinstance(params, KRRParams):
        kernel, gamma = params.kernel, params.gamma
    else:
        return None
    numeric = isinstance(gamma, int | float) and not isinstance(gamma, bool)
    return kernel if kernel in _DISTANCES and numeric else None


def _precomputed(family: str, params: Params) -> Any:
    """The model step of ``make_svr`` / ``make_krr`` on a precomputed kernel matrix."""
    if isinstance(params, SVRParams):
        return SVR(kernel="precomputed", C=params.C, epsilon=params.epsilon)
    assert isinstance(params, KRRParams)
    krr = KernelRidge(alpha=params.alpha, kernel="precomputed")
    return TransformedTargetRegressor(regressor=krr, transformer=StandardScaler(with_std=False))


def _kernel_grid(family: str, candidates: list[Params], design: _Design,
                 X_query: np.ndarray) -> list[np.ndarray]:  # fmt: skip
    """Every SVR/KRR candidate's predictions from one imputer/scaler fit and one distance matrix
    per kernel: what ``make_svr``/``make_krr`` compute, without recomputing the O(n^2 d)
    distances for each of the grid's 20-25 points (the cost of a naive grid on Li)."""
    prep = Pipeline([("impute", make_imputer()), ("scale", StandardScaler())])
    z = prep.fit_transform(design.features())
    zq = prep.transform(design.query(X_query))
    dists: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for params in candidates:
        kernel = _kernel_of(family, params)
        assert kernel is not None
        if kernel not in dists:
            dists[kernel] = (_DISTANCES[kernel](z, z), _DISTANCES[kernel](zq, z))
        d_fit, d_query = dists[kernel]
        gamma = float(params.gamma)  # type: ignore[union-attr, arg-type]
        model = _precomputed(family, params).fit(np.exp(-gamma * d_fit), design.y)
        out.append(design.volts(model.predict(np.exp(-gamma * d_query))))
    return out


def _candidate_predictions(
    family: str, candidates: list[Params], design: _Design, X_query: np.ndarray,
    cfg: BaselineConfig,
) -> list[np.ndarray]:  # fmt: skip
    """Predictions of ``X_query`` by each candidate fitted on ``design``."""
    if candidates and all(_kernel_of(family, p) for p in candidates):
        return _kernel_grid(family, candidates, design, X_query)
    return [_fit_model(family, p, design, cfg).predict(X_query) for p in candidates]


# --------------------------------------------------------------------------- search
def _choices(family: str, cfg: BaselineConfig) -> list[dict[str, Any]]:
    """The grid points to score: the family's grid under ``group_cv``, else the config alone."""
    grid = cfg.grid(family) if cfg.select == "group_cv" else {}
    return grid_points(grid) if grid else [{}]


def _folds(groups: np.ndarray, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped folds by host; none when fewer than two hosts (nothing to hold out)."""
    # Imported here: training.gp_cv imports the graph and model packages, which import
    # voltage_model.composition, so a module-level import would be circular.
    from training.gp_cv import group_folds

    return group_folds(list(groups), folds) if len(set(groups.tolist())) >= 2 else []


@dataclass(frozen=True)
class _CV:
    """The rows one inner CV runs over and their grouped folds."""

    X: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    partners: PartnerRows | None
    splits: list[tuple[np.ndarray, np.ndarray]]

    def score(self, family: str, candidates: list[Params], cfg: BaselineConfig) -> list[float]:
        """CV MAE of each candidate: every crystal's absolute error when its fold was held out,
        averaged over all rows (per crystal, as the CV check reports). A fold pools only the
        partner rows whose host it does not hold out. NaN without folds."""
        if not self.splits:
            return [math.nan] * len(candidates)
        err = np.zeros((len(candidates), len(self.y)))
        for (_, te), preds in zip(self.splits, parallel_fits(
                lambda split: self._fold(family, candidates, cfg, split), self.splits),
                strict=True):  # fmt: skip
            for i, pred in enumerate(preds):
                err[i, te] = np.abs(pred - self.y[te])
        return [float(e.mean()) for e in err]

    def _fold(self, family: str, candidates: list[Params], cfg: BaselineConfig,
              split: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:  # fmt: skip
        """Each candidate's predictions of one fold's held-out rows. The folds are independent
        and run side by side (``parallel_fits``: one BLAS thread each; numpy, LAPACK and libsvm
        release the GIL), so a fold's numbers are those of a sequential run."""
        tr, te = split
        held_out = self.groups[te].tolist()
        pool = None if self.partners is None else self.partners.without_hosts(held_out)
        design = _design(self.X[tr], self.y[tr], pool)
        return _candidate_predictions(family, candidates, design, self.X[te], cfg)


def _search(
    family: str, cv: _CV, cfg: BaselineConfig, seed: int
) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    """Every grid point with its CV MAE, the chosen (first lowest) point and its CV MAE.

    Forests are searched with ``cfg.cv_rf_trees`` trees (cheap), then the chosen point is
    rescored with the full ``rf.n_estimators``: its ``cv_mae`` describes the forest that is
    fitted, as every other method's does (on Mg, 100-tree forests scored ~0.002 V worse than
    300-tree ones, enough to reorder baselines whose CV MAEs tie).
    """
    choices = _choices(family, cfg)
    maes = cv.score(family, [_params(family, cfg, seed, c, cv=True) for c in choices], cfg)
    search = [{"params": c, "cv_mae": m} for c, m in zip(choices, maes, strict=True)]
    best = min(range(len(search)), key=lambda i: (_nan_last(maes[i]), i))
    chosen = _params(family, cfg, seed, choices[best])
    if chosen == _params(family, cfg, seed, choices[best], cv=True):
        return search, choices[best], maes[best]
    return search, choices[best], cv.score(family, [chosen], cfg)[0]


# --------------------------------------------------------------------------- public API
@dataclass(frozen=True)
class FittedBaseline:
    """A fitted baseline and how its hyperparameters were chosen.

    ``params``: the fitted model's settings (for ``gp_comp*``: its marginal-likelihood kernel);
    ``choice``: the grid point chosen ({} with nothing to tune); ``search``: every grid point
    with its CV MAE (``{"params", "cv_mae"}``, grid order); ``cv_mae``: the chosen point's.
    """

    name: str
    params: dict[str, Any]
    choice: dict[str, Any]
    search: list[dict[str, Any]]
    cv_mae: float | None
    model: _Model = field(repr=False, compare=False)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted voltages (V) of the fitted ion's crystals ``X``."""
        with one_thread():
            pred = self.model.predict(np.asarray(X, dtype=np.float64))
        return np.asarray(pred, dtype=np.float64)

    def predict_std(self, X: np.ndarray) -> np.ndarray | None:
        """Predictive std (V, observation noise included) for the GP methods; None otherwise."""
        with one_thread():
            std = self.model.predict_std(np.asarray(X, dtype=np.float64))
        return None if std is None else np.asarray(std, dtype=np.float64)

    @property
    def estimator(self) -> Pipeline | None:
        """The sklearn pipeline (e.g. for forest importances); None for the GP methods."""
        return self.model.pipeline if isinstance(self.model, _SklearnModel) else None


def _check_inputs(name: str, partners: PartnerRows | None) -> str:
    check_method(name)
    if is_pooled(name) and partners is None:
        raise ValueError(f"{name} pools partner ions' rows: pass partners")
    return model_family(name)


@dataclass(frozen=True)
class TrainingRows:
    """The rows a baseline is fitted on: features, targets (V), and the pool partners' rows for
    the ``*_pooled`` methods (ignored by the others)."""

    X: np.ndarray
    y: np.ndarray
    partners: PartnerRows | None = None


@dataclass(frozen=True)
class TuningRows:
    """The rows a baseline is tuned on: features, targets (V), each row's host structure id
    (``groups``, the CV folds' unit), the pool partners' rows for the ``*_pooled`` methods
    (ignored by the others) and ``fit_rows`` (indices or a boolean mask, default all): the rows
    the final model is fitted on."""

    X: np.ndarray
    y: np.ndarray
    groups: Sequence[str]
    partners: PartnerRows | None = None
    fit_rows: np.ndarray | None = None


def fit_fixed(
    name: str, choice: Mapping[str, Any], rows: TrainingRows, cfg: BaselineConfig, *,
    seed: int = 0,
) -> FittedBaseline:  # fmt: skip
    """Fit ``name`` on ``rows`` with the config overridden by the grid point ``choice``, no search
    (e.g. the forest refitted with a further seed once its hyperparameters are chosen)."""
    partners = rows.partners
    family = _check_inputs(name, partners)
    X, y = np.asarray(rows.X, dtype=np.float64), np.asarray(rows.y, dtype=np.float64)
    params = _params(family, cfg, seed, choice)
    pool = partners if is_pooled(name) else None
    with one_thread():
        model = _fit_model(family, params, _design(X, y, pool), cfg)
    shown = model.params() if isinstance(model, _GPModel) else asdict(params) if params else {}
    return FittedBaseline(name, shown, dict(choice), [], None, model)


def fit_tuned(
    name: str, rows: TuningRows, cfg: BaselineConfig, *, seed: int = 0, folds: int | None = None
) -> FittedBaseline:
    """Choose ``name``'s hyperparameters by grouped ``folds``-fold CV over all of ``rows``
    (lowest CV MAE, first on ties; ``folds`` defaults to ``cfg.cv_folds``), then fit it on
    ``rows.fit_rows``. ``cv_mae`` of the result is the chosen point's CV MAE (forests: rescored
    at full size).

    The baselines stage tunes on train+val and fits on train, as the transfer heads are fitted.
    The final fit drops partner rows whose host is among the rows it is not fitted on (a no-op
    for the pipeline's split, which keeps each host in one split for every ion).
    """
    partners, fit_rows = rows.partners, rows.fit_rows
    family = _check_inputs(name, partners)
    X, y = np.asarray(rows.X, dtype=np.float64), np.asarray(rows.y, dtype=np.float64)
    groups_arr = np.asarray(rows.groups, dtype=str)
    if not len(X) == len(y) == len(groups_arr):
        raise ValueError(f"{len(X)} rows, {len(y)} targets and {len(groups_arr)} groups")
    pool = partners if is_pooled(name) else None
    cv = _CV(X, y, groups_arr, pool, _folds(groups_arr, folds or cfg.cv_folds))
    with one_thread():
        search, choice, cv_mae = _search(family, cv, cfg, seed)
    fit = np.zeros(len(y), dtype=bool)
    fit[np.arange(len(y)) if fit_rows is None else np.asarray(fit_rows)] = True
    if pool is not None:
        pool = pool.without_hosts(groups_arr[~fit].tolist())
    fitted = fit_fixed(name, choice, TrainingRows(X[fit], y[fit], pool), cfg, seed=seed)
    return replace(fitted, search=search, cv_mae=None if math.isnan(cv_mae) else cv_mae)


def _nan_last(value: float) -> float:
    return math.inf if math.isnan(value) else value
