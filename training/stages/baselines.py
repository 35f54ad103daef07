"""The baselines stage for one ion: same records, same split ids, same metrics as the CGCNN.

Outputs: the metrics JSON (per method: train/val/test metrics, the inner-CV search and the chosen
point's ``cv_mae``, which is what may pick "the best baseline" of an ion; never test), the test
predictions CSV (one column per method, read by the comparison) and the same for validation.
Optionally, the same fitted models' predictions of every test row before cleaning (the
``ion_model`` stage reports them beside the served model's, so that dropping test rows outside
the training-row thresholds cannot flatter one method more than another).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.baselines.models import (
    SEED_SEP,
    BaselineConfig,
    rf_importance_groups,
    rf_permutation_report,
)
from training.baselines.suite import BaselineInputs, BaselineResult, SplitRows, run_baselines
from training.baselines.tuning import PartnerRows
from training.config import load_params
from training.data.split import SPLITS
from training.datasets import IonData, load_ion_data, pool_partners, uncleaned_data
from training.tracking import CLEAN_DATA_FILES, MlflowSettings, setup_mlflow, standard_tags
from voltage_model.composition import featurize_cached


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}


def partner_rows(partners: Sequence[IonData], features_cache: Path) -> PartnerRows | None:
    """The pool partners' TRAINING crystals as ``PartnerRows`` (None without partners).

    Their descriptors go through this ion's own feature cache (an output of this stage only):
    reading another ion's cache would make ``baselines@Mg`` depend on ``baselines@Ca``. Every
    split's formulas are cached (features carry no target), so a later reader of this cache finds
    all partner crystals; only the training rows are returned, as the served GP head pools.
    """
    if not partners:
        return None
    featurize_cached([f for p in partners for s in SPLITS for f in p.formulas(s)], features_cache)
    blocks = [(featurize_cached(p.formulas("train"), features_cache)[0], p.targets("train"),
               p.host_ids("train")) for p in partners]  # fmt: skip
    return PartnerRows.from_ions(blocks)


@dataclass(frozen=True)
class BaselinePaths:
    """The stage's feature cache and outputs. ``val_predictions`` defaults to
    ``<predictions stem>_val.csv`` beside the test CSV, ``uncleaned_predictions`` to
    ``<predictions stem>_uncleaned.csv``."""

    features_cache: Path
    metrics: Path
    predictions: Path
    val_predictions: Path | None = None
    uncleaned_predictions: Path | None = None

    def val_out(self) -> Path:
        return self.val_predictions or self._beside("val")

    def uncleaned_out(self) -> Path:
        return self.uncleaned_predictions or self._beside("uncleaned")

    def _beside(self, suffix: str) -> Path:
        return self.predictions.with_name(f"{self.predictions.stem}_{suffix}.csv")


def run_baseline_stage(
    data: IonData,
    cfg: BaselineConfig,
    mlflow_settings: MlflowSettings,
    paths: BaselinePaths,
    partners: Sequence[IonData] = (),
    uncleaned: IonData | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Tune every baseline by grouped CV on train+val, fit on train, score val and test; log all.

    ``partners``: the pool partner ions (``Params.pool_partners``), for the pooled variants.
    ``uncleaned``: the ion's rows before cleaning; the fitted models then also predict its test
    rows into ``paths.uncleaned_out()``.
    """
    features_cache, metrics_out = paths.features_cache, paths.metrics
    predictions_out = paths.predictions
    xs = {}
    for split in SPLITS:
        xs[split], names = featurize_cached(data.formulas(split), features_cache)
    pool = partner_rows(partners, features_cache)
    rows = {s: SplitRows(xs[s], data.targets(s), data.ids(s), data.host_ids(s)) for s in SPLITS}
    inputs = BaselineInputs(rows["train"], rows["val"], rows["test"], feature_names=names)
    results = run_baselines(inputs, cfg, partners=pool)
    report = _report(data, cfg, results, [p.ion for p in partners])
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(report, indent=2) + "\n")
    val_out = paths.val_out()
    _write_predictions(predictions_out, data, results, "test")
    _write_predictions(val_out, data, results, "val")
    artifacts = [metrics_out, predictions_out, val_out]
    if uncleaned is not None:
        unc_out = paths.uncleaned_out()
        write_uncleaned_predictions(unc_out, data, uncleaned, results, features_cache)
        artifacts.append(unc_out)
    _log_mlflow(data, cfg, mlflow_settings, results, artifacts)
    return report["models"]


def uncleaned_test_rows(
    cleaned: IonData, uncleaned: IonData
) -> tuple[list[str], np.ndarray, list[str]]:
    """(ids, targets, formulas) of the ion's test rows before cleaning. Cleaning only drops rows,
    so every cleaned test id must be among them: anything else means mismatched input files."""
    if cleaned.ion != uncleaned.ion:
        raise ValueError(f"uncleaned rows are {uncleaned.ion}'s, not {cleaned.ion}'s")
    ids = uncleaned.ids("test")
    stray = sorted(set(cleaned.ids("test")) - set(ids))
    if stray:
        raise ValueError(f"{len(stray)} cleaned test ids are not uncleaned test ids: {stray[:3]}")
    return ids, uncleaned.targets("test"), uncleaned.formulas("test")


def write_uncleaned_predictions(
    path: Path, cleaned: IonData, uncleaned: IonData, results: dict[str, BaselineResult],
    features_cache: Path,
) -> None:  # fmt: skip
    """Every fitted baseline's predictions of the uncleaned test rows, in the test CSV's format.

    Prediction only: the models are the ones fitted on the cleaned training rows (``results``),
    nothing is refitted or chosen here, and these targets are only written out for reporting.
    """
    ids, y, formulas = uncleaned_test_rows(cleaned, uncleaned)
    X, _ = featurize_cached(formulas, features_cache)
    columns = {}
    for name, res in results.items():
        if res.fitted is None:
            raise ValueError(f"baseline {name} kept no fitted model to predict uncleaned rows")
        columns[name] = res.fitted.predict(X)
    _write_rows(path, ids, y, columns)


def _report(data: IonData, cfg: BaselineConfig, results: dict[str, BaselineResult],
            pool_ions: list[str]) -> dict[str, Any]:  # fmt: skip
    """The metrics JSON: per-split metrics, the tuning record and the forests' importances."""
    rf = results.get("rf")
    importances = (rf.importances if rf else None) or []
    groups = rf_importance_groups(importances)
    cv = {n: r.cv_mae for n, r in results.items() if r.cv_mae is not None}
    return {
        "ion": data.ion,
        "n": {s: len(data.parts[s]) for s in data.parts},
        "pool_ions": pool_ions,
        "models": {name: res.metrics for name, res in results.items()},
        "cv_mae": {n: round(v, 5) for n, v in cv.items()},
        # The lowest inner-CV MAE on train+val: the baseline a comparison should name "best".
        "best_by_cv": min(cv, key=lambda n: (cv[n], n)) if cv else None,
        "selection": {
            "select": cfg.select, "cv_folds": cfg.cv_folds, "groups": "host (charged_id)",
            "tuned_on": "train+val", "fitted_on": "train",
            "methods": {n: _selection(r) for n, r in results.items() if SEED_SEP not in n},
        },
        "uncertainty": {n: _uncertainty(r, data) for n, r in results.items() if r.std},
        "rf_importance_top15": [[n, round(v, 4)] for n, v in importances[:15]],
        "rf_importance_by_property": [[n, round(v, 4)] for n, v in groups[:15]],
        **rf_permutation_report(rf.permutation if rf else None, len(data.parts["val"])),
    }  # fmt: skip


def _selection(res: BaselineResult) -> dict[str, Any]:
    search = [{"params": e["params"], "cv_mae": None if math.isnan(e["cv_mae"])
               else round(e["cv_mae"], 5)} for e in res.search]  # fmt: skip
    cv_mae = None if res.cv_mae is None else round(res.cv_mae, 5)
    return {"params": res.params, "cv_mae": cv_mae, "seconds": round(res.seconds, 2),
            "search": search}  # fmt: skip


def _uncertainty(res: BaselineResult, data: IonData) -> dict[str, dict[str, float]]:
    """A GP method's predictive std per split: its mean and the share of crystals within
    +-1.96 std (0.95 if calibrated). Reported, not used for any choice."""
    assert res.std is not None
    out = {}
    for split, std in res.std.items():
        pred = np.array(list(res.predictions[split].values()))
        inside = np.abs(pred - data.targets(split)) <= 1.96 * std
        out[split] = {"mean_std": round(float(std.mean()), 4),
                      "coverage_95": round(float(inside.mean()), 4)}  # fmt: skip
    return out


def _log_mlflow(data: IonData, cfg: BaselineConfig, settings: MlflowSettings,
                results: dict[str, BaselineResult], artifacts: Sequence[Path]) -> None:  # fmt: skip
    import mlflow

    setup_mlflow(settings)
    with mlflow.start_run(run_name=f"baselines-{data.ion}"):
        mlflow.set_tags(
            {"stage": "baselines", "ion": data.ion, **standard_tags(Path("."), CLEAN_DATA_FILES)}
        )
        mlflow.log_params({k: str(v) for k, v in _flat("", cfg.to_dict()).items()})
        for name, res in results.items():
            for split, vals in res.metrics.items():
                for key, val in vals.items():
                    mlflow.log_metric(f"{_metric_name(name)}_{split}_{key}", val)
            if res.cv_mae is not None:
                mlflow.log_metric(f"{_metric_name(name)}_cv_mae", res.cv_mae)
        for path in artifacts:
            mlflow.log_artifact(str(path))


def _metric_name(name: str) -> str:
    """``rf@1`` -> ``rf_seed1``: MLflow metric names allow no ``@``."""
    return name.replace(SEED_SEP, "_seed")


def _write_predictions(
    path: Path, data: IonData, results: dict[str, BaselineResult], split: str
) -> None:
    """One split's predictions of every baseline, one row per battery id:
    ``battery_id,target,<method columns>`` (the comparison turns each column into a row)."""
    ids = data.ids(split)
    columns = {n: np.array([r.predictions[split][b] for b in ids]) for n, r in results.items()}
    _write_rows(path, ids, data.targets(split), columns)


def _write_rows(
    path: Path, ids: Sequence[str], targets: np.ndarray, columns: dict[str, np.ndarray]
) -> None:
    """``battery_id,target,<one column per method>``, one row per id, volts to 4 decimals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "target", *names])
        for i, (bid, y) in enumerate(zip(ids, targets, strict=True)):
            w.writerow([bid, f"{y:.4f}", *(f"{columns[n][i]:.4f}" for n in names)])


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    splits: Path
    features_cache: Path
    metrics: Path
    predictions: Path
    val_predictions: Path | None = None
    records_all: Path | None = None
    splits_all: Path | None = None
    uncleaned_predictions: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, dict[str, Any]]:
    p = load_params(opts.params).require_ion(opts.ion)
    data = load_ion_data(opts.records, opts.splits, opts.ion)
    paths = BaselinePaths(
        opts.features_cache,
        opts.metrics,
        opts.predictions,
        opts.val_predictions,
        opts.uncleaned_predictions,
    )
    return run_baseline_stage(
        data,
        BaselineConfig.from_settings(p.baselines, p.transfer.gp),
        p.mlflow,
        paths,
        partners=pool_partners(p, opts.ion, opts.records, opts.splits),
        uncleaned=uncleaned_data(opts.records_all, opts.splits_all, opts.ion),
    )
