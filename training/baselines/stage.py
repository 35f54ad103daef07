"""The baselines stage for one ion: same records, same split ids, same metrics as the CGCNN."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from training.baselines.features import featurize_cached
from training.baselines.models import (
    SEED_SEP,
    BaselineConfig,
    rf_importance_groups,
    run_baselines,
)
from training.datasets import IonData
from training.tracking import MlflowSettings, setup_mlflow, standard_tags

DATA_OUTPUTS = ("data/clean/records.jsonl.gz", "data/splits.json")


def _flat(prefix: str, obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: obj}


def run_baseline_stage(
    data: IonData,
    cfg: BaselineConfig,
    mlflow_settings: MlflowSettings,
    features_cache: Path,
    metrics_out: Path,
    predictions_out: Path,
) -> dict[str, dict[str, dict[str, float]]]:
    """Fit mean/SVR/KRR/RF on the ion's train split, select on val, score test once; log all."""
    import mlflow

    xs = {}
    for split in ("train", "val", "test"):
        xs[split], names = featurize_cached(data.formulas(split), features_cache)
    results = run_baselines(
        xs["train"], data.targets("train"),
        xs["val"], data.targets("val"),
        xs["test"], data.targets("test"),
        cfg, feature_names=names, test_ids=data.ids("test"),
    )  # fmt: skip
    metrics = {name: res.metrics for name, res in results.items()}
    groups = rf_importance_groups(results["rf"].importances)
    report = {
        "ion": data.ion,
        "n": {s: len(data.parts[s]) for s in data.parts},
        "models": metrics,
        "rf_importance_top15": [[n, round(v, 4)] for n, v in results["rf"].importances[:15]],
        "rf_importance_by_property": [[n, round(v, 4)] for n, v in groups[:15]],
    }
    metrics_out.parent.mkdir(parents=True, exist_ok=True)
    metrics_out.write_text(json.dumps(report, indent=2) + "\n")
    _write_predictions(predictions_out, data, results)

    setup_mlflow(mlflow_settings)
    with mlflow.start_run(run_name=f"baselines-{data.ion}"):
        mlflow.set_tags(
            {"stage": "baselines", "ion": data.ion, **standard_tags(Path("."), DATA_OUTPUTS)}
        )
        mlflow.log_params({k: str(v) for k, v in _flat("", cfg.to_dict()).items()})
        for name, per_split in metrics.items():
            for split, vals in per_split.items():
                for key, val in vals.items():
                    mlflow.log_metric(f"{_metric_name(name)}_{split}_{key}", val)
        mlflow.log_artifact(str(metrics_out))
        mlflow.log_artifact(str(predictions_out))
    return metrics


def _metric_name(name: str) -> str:
    """``rf@1`` -> ``rf_seed1``: MLflow metric names allow no ``@``."""
    return name.replace(SEED_SEP, "_seed")


def _write_predictions(path: Path, data: IonData, results: dict) -> None:
    """Test-set predictions of every baseline, one row per battery id (for the comparison table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(results)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "target", *names])
        for bid, y in zip(data.ids("test"), data.targets("test"), strict=True):
            w.writerow(
                [bid, f"{y:.4f}", *(f"{results[n].test_predictions[bid]:.4f}" for n in names)]
            )
