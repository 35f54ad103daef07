"""Every baseline on one ion's train/val/test split: tune on train+val, fit on train, score all.

Tuning reads the train and validation rows only (``tuning.fit_tuned``); the test split is
predicted once, by the final models, and never feeds a choice. The validation predictions are
kept too, so a later "best baseline" can be chosen on CV/validation instead of test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.baselines.models import (
    OWN_METHODS,
    POOLED_METHODS,
    BaselineConfig,
    PermutationSettings,
    check_method,
    model_family,
    regression_metrics,
    rf_importances,
    rf_permutation_importances,
    seeded_name,
)
from training.baselines.tuning import (
    FittedBaseline,
    PartnerRows,
    TrainingRows,
    TuningRows,
    fit_fixed,
    fit_tuned,
)
from training.data.split import SPLITS

log = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    """What one baseline produced.

    metrics: split -> {"mae", "rmse", "r2"}. predictions: split -> id -> predicted voltage
    (val and test). std: the GP methods' predictive std per split (val, test), else None.
    importances: the own-crystal forest only, (feature, Gini importance) sorted descending.
    permutation: the same forest's permutation importances on the validation split, (feature,
    mean, std) of the increase in validation MAE (V), sorted descending (None: fewer than 2
    validation rows, or not the own-crystal forest).
    search: every grid point with its inner-CV MAE; cv_mae: the chosen point's (None for the
    further-seed forests, which reuse their first seed's choice).
    """

    name: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, float]]
    predictions: dict[str, dict[str, float]]
    std: dict[str, np.ndarray] | None = None
    importances: list[tuple[str, float]] | None = None
    permutation: list[tuple[str, float, float]] | None = None
    search: list[dict[str, Any]] = field(default_factory=list)
    cv_mae: float | None = None
    seconds: float = 0.0
    fitted: FittedBaseline | None = field(default=None, repr=False, compare=False)

    @property
    def test_predictions(self) -> dict[str, float]:
        return self.predictions["test"]


@dataclass(frozen=True)
class _Splits:
    """Features, targets, ids and host groups of the three splits."""

    X: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids: dict[str, list[str]]
    groups: dict[str, list[str]]

    @property
    def tuning_rows(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """(X, y, groups, train indices) of train+val: what the inner CV sees."""
        X = np.vstack([self.X["train"], self.X["val"]])
        y = np.concatenate([self.y["train"], self.y["val"]])
        return X, y, self.groups["train"] + self.groups["val"], np.arange(len(self.y["train"]))


def _evaluate(fitted: FittedBaseline, data: _Splits, seconds: float) -> BaselineResult:
    """Score a fitted model on every split; the test split is touched only here."""
    preds = {s: fitted.predict(data.X[s]) for s in SPLITS}
    metrics = {s: regression_metrics(data.y[s], preds[s]) for s in SPLITS}
    keyed = {s: {i: float(p) for i, p in zip(data.ids[s], preds[s], strict=True)}
             for s in ("val", "test")}  # fmt: skip
    std = {s: fitted.predict_std(data.X[s]) for s in ("val", "test")}
    return BaselineResult(
        fitted.name, fitted.params, metrics, keyed,
        std=None if std["test"] is None else std,  # type: ignore[arg-type]
        search=fitted.search, cv_mae=fitted.cv_mae, seconds=seconds, fitted=fitted,
    )  # fmt: skip


@dataclass(frozen=True)
class SplitRows:
    """One split's rows: features, targets (V), and optionally an id per row (keys the val/test
    predictions; default the row index) and a host group per row (default: each row its own)."""

    X: np.ndarray
    y: np.ndarray
    ids: Sequence[str] | None = None
    groups: Sequence[str] | None = None


@dataclass(frozen=True)
class BaselineInputs:
    """The three splits a baseline run reads, built once by the caller. ``feature_names`` label
    the forest importances (default ``f0, f1, ...``)."""

    train: SplitRows
    val: SplitRows
    test: SplitRows
    feature_names: Sequence[str] | None = None

    def split(self, name: str) -> SplitRows:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _as_splits(inputs: BaselineInputs) -> _Splits:
    rows = {s: inputs.split(s) for s in SPLITS}
    X = {s: np.asarray(rows[s].X, dtype=np.float64) for s in SPLITS}
    y = {s: np.asarray(rows[s].y, dtype=np.float64) for s in SPLITS}
    ids_ = {s: [str(i) for i in (rows[s].ids if rows[s].ids is not None else range(len(y[s])))]
            for s in SPLITS}  # fmt: skip
    # No host groups given: every row its own group (plain k-fold).
    groups_ = {s: [str(g) for g in (rows[s].groups if rows[s].groups is not None
                                    else [f"{s}:{i}" for i in ids_[s]])]
               for s in SPLITS}  # fmt: skip
    for s in SPLITS:
        if not len(X[s]) == len(y[s]) == len(ids_[s]) == len(groups_[s]):
            raise ValueError(f"{s}: features, targets, ids and groups differ in length")
    return _Splits(X, y, ids_, groups_)


def default_methods(partners: PartnerRows | None) -> tuple[str, ...]:
    """Every own-crystal method, plus the pooled ones when the ion has pool partners."""
    return OWN_METHODS + (POOLED_METHODS if partners is not None else ())


def run_baselines(
    inputs: BaselineInputs, cfg: BaselineConfig | None = None, *,
    partners: PartnerRows | None = None, names: Sequence[str] | None = None,
) -> dict[str, BaselineResult]:  # fmt: skip
    """Tune (inner CV on train+val), fit on train and score every requested baseline.

    ``inputs``: the three splits' rows (ids key the predictions, groups: host id per row) and the
    feature names. partners: pool partners' training rows (enables the pooled methods). Forests
    are refitted for every further seed of ``cfg.seeds`` (``rf@<seed>``, ``rf_pooled@<seed>``)
    with the hyperparameters chosen for the first.
    """
    cfg = cfg or BaselineConfig()
    data = _as_splits(inputs)
    n_features = data.X["train"].shape[1]
    names_ = list(inputs.feature_names) if inputs.feature_names is not None else None
    feature_names = names_ or [f"f{i}" for i in range(n_features)]
    if len(feature_names) != n_features:
        raise ValueError(f"{len(feature_names)} feature names for {n_features} columns")
    results: dict[str, BaselineResult] = {}
    for name in names if names is not None else default_methods(partners):
        check_method(name)
        results.update(_run_method(name, data, cfg, partners, feature_names))
    return results


def _run_method(
    name: str, data: _Splits, cfg: BaselineConfig, partners: PartnerRows | None,
    feature_names: Sequence[str],
) -> dict[str, BaselineResult]:  # fmt: skip
    """One method tuned and fitted (and, for forests, refitted per further seed)."""
    X, y, groups, train_rows = data.tuning_rows
    start = time.perf_counter()
    rows = TuningRows(X, y, groups, partners=partners, fit_rows=train_rows)
    fitted = fit_tuned(name, rows, cfg, seed=cfg.first_seed, folds=cfg.cv_folds)
    result = _evaluate(fitted, data, time.perf_counter() - start)
    log.info("%s: chose %s (inner CV MAE %s) in %.1f s", name, fitted.choice, fitted.cv_mae,
             result.seconds)  # fmt: skip
    out = {name: result}
    if model_family(name) != "rf":
        return out
    if name == "rf" and fitted.estimator is not None:
        result.importances = rf_importances(fitted.estimator, feature_names)
        if len(data.y["val"]) >= 2:  # scored on validation, never test; refits nothing
            settings = PermutationSettings(seed=cfg.first_seed)
            result.permutation = rf_permutation_importances(
                fitted.estimator, data.X["val"], data.y["val"], feature_names, settings
            )
    pool = None if partners is None else partners.without_hosts(data.groups["val"])
    for seed in list(cfg.seeds or [])[1:]:
        start = time.perf_counter()
        rows_ = TrainingRows(data.X["train"], data.y["train"], partners=pool)
        again = fit_fixed(name, fitted.choice, rows_, cfg, seed=seed)
        column = seeded_name(name, seed)
        out[column] = _evaluate(again, data, time.perf_counter() - start)
        out[column].name = column
    return out
