"""The ``plots`` stage: figures people read, from what the pipeline already wrote.

Per ion, for the served model: parity plots with uncertainty bars (predicted +- the calibrated
std as served, against the DFT voltage; n and MAE on every panel) on the test split and on the
cv stage's out-of-fold predictions (host-grouped, scored crystals), and a reliability diagram
(observed coverage of central Gaussian intervals against nominal, 10%..95%) of the same
predictions; and the RF baseline's Gini importances beside its permutation importances on the
validation split (when the baselines stage wrote them).

Nothing is fitted. The per-crystal test std is written by no stage (the predictions CSV holds the
served mean only), so it is recomputed here by one forward pass of the served artifact
(``models/ions/<ion>.pt``) over the cached graphs and CHGNet features, times the artifact's
``std_scale``, exactly as the service computes it; its mean must reproduce the CSV's ``served``
column, or the stage stops (a stale artifact or CSV). The CV stds are the cv stage's GP stds,
which it writes before any rescaling, times the same ``std_scale``.

Outputs: the PNGs, the per-crystal test predictions with their std (CSV) and a JSON of every
number a figure shows (n, MAE, coverage per nominal level), so a figure can be checked against
numbers.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import plots as figures
from training.chgnet_store import load_optional
from training.config import load_params
from training.data.ion_inputs import IonInputs
from training.data.records import read_records
from training.data.split import SPLITS, load_splits
from training.datasets import IonData
from training.graphs.store import GraphStore
from training.train import served
from training.train.uncertainty import coverage_band, reliability_curve
from voltage_model.artifact import LoadedModel, load_checkpoint

log = logging.getLogger(__name__)

# Nominal coverages of the reliability diagrams (central Gaussian intervals).
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# How far (V) the recomputed served mean may be from the predictions CSV (written to 4 decimals).
SAME_PREDICTION_V = 1e-3
CV_SETS = {"cv_host": "host", "cv_chemsys": "chemsys"}  # set name -> the cv CSV's grouping
LABELS = {"test": "test split", "cv_host": "CV, host-grouped", "cv_chemsys": "CV, chemsys-grouped"}


@dataclass(frozen=True)
class Gaussian:
    """One set of predictions N(mean, std^2) of crystals with DFT voltages ``y`` (all in V)."""

    ids: list[str]
    y: np.ndarray
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.ids) == len(self.y) == len(self.mean) == len(self.std):
            raise ValueError("ids, targets, means and stds differ in length")


# ============================================================================ numbers
def panel_stats(p: Gaussian) -> dict[str, Any]:
    """What a parity panel states: n, MAE and RMSE (V), the 90% interval's coverage, mean std."""
    err = p.mean - p.y
    if not len(err):
        return {"n": 0, "mae": None, "rmse": None, "coverage_90": None, "mean_std": None}
    cov = reliability_curve(p.y, p.mean, p.std, np.array([0.9]))[1][0]
    return {"n": len(err), "mae": float(np.mean(np.abs(err))),
            "rmse": float(np.sqrt(np.mean(err**2))), "coverage_90": float(cov),
            "mean_std": float(np.mean(p.std))}  # fmt: skip


def reliability(p: Gaussian, levels: Sequence[float] = LEVELS) -> dict[str, list[float]]:
    """Observed coverage of the central ``levels`` intervals (the reliability diagram), and the
    band a calibrated model's coverage falls in on this many crystals (+-2 binomial SE)."""
    nominal, observed = reliability_curve(p.y, p.mean, p.std, np.asarray(levels, float))
    band = [coverage_band(len(p.y), float(q)) for q in nominal]
    return {"nominal": [float(q) for q in nominal], "observed": [float(o) for o in observed],
            "band_low": [b[0] for b in band], "band_high": [b[1] for b in band]}  # fmt: skip


# ============================================================================ inputs
def ion_data(records: Path, splits: Path, ions: Sequence[str]) -> dict[str, IonData]:
    """Every ion's records in split order (``datasets.load_ion_data``, the records read once)."""
    split_ids = load_splits(splits)
    by_id = {r.battery_id: r for r in read_records(records)}
    out = {}
    for ion in ions:
        if ion not in split_ids:
            raise KeyError(f"ion {ion!r} not in split file {splits}")
        parts = {}
        for split in SPLITS:
            missing = [b for b in split_ids[ion][split] if b not in by_id]
            if missing:
                raise KeyError(f"{len(missing)} {ion} {split} ids missing from records")
            parts[split] = [by_id[b] for b in split_ids[ion][split]]
        out[ion] = IonData(ion=ion, parts=parts)
    return out


def served_mean_std(
    model: LoadedModel, inputs: IonInputs, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) in V of the artifact as served on one split of ``inputs``' ion: the
    pipeline's one evaluation pass (``training.train.served``), std times the artifact's
    ``std_scale`` as the service answers it."""
    assert inputs.store is not None, "the plots stage reads graphs from the graph cache"
    mean, std = served.served_mean_std(model, inputs.store, inputs.data, split, inputs.chg)
    return mean, std * float(model.extra.get("std_scale", 1.0))


def read_predictions(
    path: Path, column: str = "served"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, targets, ``column``) of an ``ion_model`` predictions CSV."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and column not in rows[0]:
        raise ValueError(f"{path}: no column {column!r}")
    return ([r["battery_id"] for r in rows], np.array([float(r["target"]) for r in rows]),
            np.array([float(r[column]) for r in rows]))  # fmt: skip


def served_test(inputs: IonInputs, model: LoadedModel, predictions_csv: Path) -> Gaussian:
    """The served model's test predictions with their calibrated std; the mean must be the
    predictions CSV's ``served`` column (same ids, same order)."""
    ion = inputs.ion
    ids, y, served = read_predictions(predictions_csv)
    if ids != inputs.data.ids("test"):
        raise ValueError(f"{ion}: {predictions_csv} holds other test ids than the split file")
    mean, std = served_mean_std(model, inputs, "test")
    gap = float(np.max(np.abs(mean - served))) if len(ids) else 0.0
    if gap > SAME_PREDICTION_V:
        raise ValueError(f"{ion}: the served artifact's test predictions differ from "
                         f"{predictions_csv} by up to {gap:.4f} V: one of them is stale "
                         "(rerun ion_model)")  # fmt: skip
    return Gaussian(ids, y, served, std)


def cv_sets(rows_csv: Path, report_json: Path, std_scale: float) -> dict[str, Gaussian]:
    """The cv stage's out-of-fold predictions of the served column on its scored crystals, per
    grouping (``CV_SETS``), std times the served ``std_scale``; {} where the stage did not apply
    (the source ion) or is absent."""
    if not report_json.is_file() or not rows_csv.is_file():
        return {}
    column = json.loads(report_json.read_text()).get("served")
    if not column:
        return {}
    with rows_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for name, grouping in CV_SETS.items():
        keep = [r for r in rows if r["grouping"] == grouping and r["scored"] == "1"
                and r.get(column) and r.get(f"{column}_std")]  # fmt: skip
        if keep:
            out[name] = Gaussian(
                [r["battery_id"] for r in keep],
                np.array([float(r["target"]) for r in keep]),
                np.array([float(r[column]) for r in keep]),
                np.array([float(r[f"{column}_std"]) for r in keep]) * std_scale,
            )
    return out  # fmt: skip


def importances(baselines_json: Path) -> tuple[list[list[Any]], list[list[Any]] | None, str]:
    """(Gini top list, permutation top list or None, a note on the permutation rows) of the
    baselines stage's RF."""
    if not baselines_json.is_file():
        return [], None, ""
    report = json.loads(baselines_json.read_text())
    perm = report.get("rf_permutation_val") or {}
    note = (f"{perm.get('n_rows', '?')} validation crystals, {perm.get('repeats', '?')} "
            "shuffles per column; bars: std over shuffles") if perm else ""  # fmt: skip
    return report.get("rf_importance_top15") or [], perm.get("top") or None, note


# ============================================================================ figures
def draw(
    sets: dict[str, dict[str, Gaussian]], importance: dict[str, tuple[list, list | None, str]],
    out_dir: Path, importance_dir: Path,
) -> tuple[dict[str, Any], list[Path]]:  # fmt: skip
    """Every figure, from ``sets`` (ion -> set name -> predictions) and ``importance`` (ion ->
    ``importances``' triple); returns the numbers they show and the files written."""
    sets = {ion: {name: p for name, p in by_set.items() if len(p.y)}
            for ion, by_set in sets.items()}  # fmt: skip
    numbers: dict[str, Any] = {}
    for ion, by_set in sets.items():
        numbers[ion] = {name: {**panel_stats(p), "reliability": reliability(p)}
                        for name, p in by_set.items()}  # fmt: skip
    files = []
    for name, title in (
        ("test", "served model, test split"),
        ("cv_host", "served model, host-grouped CV out-of-fold (scored crystals)"),
    ):
        panels = {ion: {"y": s[name].y, "mean": s[name].mean, "std": s[name].std,
                        "stats": numbers[ion][name]}
                  for ion, s in sets.items() if name in s}  # fmt: skip
        if panels:
            files.append(figures.parity_uncertainty_grid(panels, out_dir / f"parity_{name}.png",
                                                         title))  # fmt: skip
    curves = {}
    for ion, by_set in numbers.items():
        curves[ion] = [{"label": LABELS.get(name, name), "n": r["n"],
                        "nominal": r["reliability"]["nominal"],
                        "observed": r["reliability"]["observed"],
                        "band": ((r["reliability"]["band_low"], r["reliability"]["band_high"])
                                 if name == "test" else None)}
                       for name, r in by_set.items()]  # fmt: skip
    curves = {ion: c for ion, c in curves.items() if c}
    if curves:
        files.append(figures.reliability_grid(
            curves, out_dir / "reliability.png",
            "served model: reliability of its calibrated Gaussian intervals"))  # fmt: skip
    for ion, (gini, perm, note) in importance.items():
        if not gini:
            continue
        files.append(figures.importance_plot(
            gini, perm, importance_dir / f"{ion}.png",
            f"{ion}: random forest on composition features (baselines stage)"
            + (f"\npermutation: {note}" if note else ""),
            missing="permutation importances: not in this baselines report\n"
                    "(the baselines stage writes them, on the validation split)"))  # fmt: skip
    return numbers, files


def write_test_predictions(path: Path, sets: dict[str, dict[str, Gaussian]]) -> Path:
    """Per ion and test crystal: DFT voltage, served prediction and its calibrated std (V)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ion", "battery_id", "target", "served", "served_std"])
        for ion, by_set in sets.items():
            p = by_set.get("test")
            if p is None:
                continue
            for i, bid in enumerate(p.ids):
                w.writerow([ion, bid, f"{p.y[i]:.4f}", f"{p.mean[i]:.4f}", f"{p.std[i]:.4f}"])
    return path


@dataclass(frozen=True)
class Options:
    predictions_dir: Path
    cv_dir: Path
    metrics_dir: Path
    models_dir: Path
    records: Path
    splits: Path
    graphs: Path
    out_dir: Path
    importance_dir: Path
    test_predictions: Path
    summary: Path
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> list[Path]:
    """Every figure of every enabled ion; returns the files written."""
    t0 = time.perf_counter()
    p = load_params(opts.params)
    ions = p.ion_names
    data = ion_data(opts.records, opts.splits, ions)
    store = GraphStore.load(opts.graphs)
    chg = load_optional(opts.chgnet_features)
    sets: dict[str, dict[str, Gaussian]] = {}
    scales = {}
    for ion in ions:
        model = load_checkpoint(opts.models_dir / f"{ion}.pt")
        scales[ion] = float(model.extra.get("std_scale", 1.0))
        inputs = IonInputs(data[ion], store, p.source_ion, chg=chg)
        sets[ion] = {"test": served_test(inputs, model, opts.predictions_dir / f"ion_{ion}.csv")}
        sets[ion].update(cv_sets(opts.cv_dir / f"{ion}.csv", opts.cv_dir / f"{ion}.json",
                                 scales[ion]))  # fmt: skip
    importance = {ion: importances(opts.metrics_dir / f"baselines_{ion}.json") for ion in ions}
    numbers, files = draw(sets, importance, opts.out_dir, opts.importance_dir)
    files.append(write_test_predictions(opts.test_predictions, sets))
    summary = {
        "levels": list(LEVELS),
        "std": "calibrated as served: the model's std times its std_scale (fitted by ion_model "
               "on out-of-fold train+val predictions, the source ion's on validation; the CV "
               "rows overlap those, so the CV curves are not fully out of sample for it)",
        "std_scale": scales,
        "ions": numbers,
        "permutation_importances": {ion: v[1] is not None for ion, v in importance.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    opts.summary.parent.mkdir(parents=True, exist_ok=True)
    opts.summary.write_text(json.dumps(summary, indent=1) + "\n")
    log.info("plots: %d files in %.1f s", len(files) + 1, summary["seconds"])
    return [*files, opts.summary]
