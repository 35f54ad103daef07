"""The per-ion model stage (DVC ``foreach`` over the ions): the comparison row and the model to
register. For the source ion it evaluates the trained source ensemble; for every other ion it runs
transfer learning and every comparison method over the configured seeds.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pymatgen.io.cif import CifWriter

from training.baselines.models import base_name
from training.chgnet_heads import (
    ChgnetFit,
    cv_backbones,
    fit_chgnet_head,
    served_part,
    variant_predictions,
    variant_report,
)
from training.chgnet_store import ChgnetFeatures
from training.config import TransferSettings, UsageError, load_params
from training.data.ion_inputs import IonFiles, IonInputs
from training.datasets import IonData, train_elements
from training.gp_cv import choose_pooling, choose_variant
from training.graphs.store import GraphStore
from training.tracking import GRAPH_DATA_FILES, MlflowSettings, setup_mlflow, standard_tags
from training.train.metrics import regression_metrics
from training.train.served import served_mean_std
from training.train.settings import gp_config
from training.train.uncertainty import calibration, fit_std_scale
from training.transfer import (
    GP_KINDS,
    HEAD_KINDS,
    TransferInputs,
    TransferResult,
    member_predictions,
    metrics_by_split,
    scratch_cgcnn,
    source_predictions,
    transfer,
    uncertainty_report,
)
from voltage_model.artifact import (
    SCHEMA_VERSION,
    ChgnetPart,
    LoadedModel,
    load_checkpoint,
    save_checkpoint,
)
from voltage_model.graphs.encoding import encoding_fingerprint


def _summary(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """mean +- std over seeds of test and val MAE (selection uses val only)."""
    test = np.array([m["test"]["mae"] for m in per_seed])
    val = np.array([m["val"]["mae"] for m in per_seed])
    return {
        "test_mae_mean": float(test.mean()),
        "test_mae_std": float(test.std()),
        "val_mae_mean": float(val.mean()),
        "test_rmse_mean": float(np.mean([m["test"]["rmse"] for m in per_seed])),
        "test_r2_mean": float(np.mean([m["test"]["r2"] for m in per_seed])),
        "n_seeds": len(per_seed),
    }


def baseline_rows(data: IonData, baseline_csv: Path) -> dict[str, dict[str, Any]]:
    """SVR/KRR/RF/mean test predictions from the baselines stage, on the very same test ids.
    A seeded baseline has a column per seed (``rf``, ``rf@1``, ...): one row, mean +- std."""
    by_name = _csv_metrics(baseline_csv, data.ids("test"), data.targets("test"))
    return {name: _test_summary(per_seed) for name, per_seed in by_name.items()}


def _csv_metrics(
    path: Path, ids: Sequence[str], y: np.ndarray
) -> dict[str, list[dict[str, float]]]:
    """Metrics of every prediction column of a baselines CSV on the rows ``ids`` (targets
    ``y``), grouped by baseline: one entry per seed column (``rf``, ``rf@1``, ...)."""
    rows = {r["battery_id"]: r for r in csv.DictReader(path.read_text().splitlines())}
    missing = [b for b in ids if b not in rows]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} test ids: {missing[:3]}")
    by_name: dict[str, list[dict[str, float]]] = {}
    for col in next(iter(rows.values())):
        if col in ("battery_id", "target"):
            continue
        pred = np.array([float(rows[b][col]) for b in ids])
        by_name.setdefault(base_name(col), []).append(regression_metrics(y, pred))
    return by_name


def _test_summary(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """mean +- std over seeds of test metrics (a baseline's validation is its own stage's)."""
    mae = np.array([m["mae"] for m in per_seed])
    return {"test_mae_mean": float(mae.mean()), "test_mae_std": float(mae.std()),
            "test_rmse_mean": float(np.mean([m["rmse"] for m in per_seed])),
            "test_r2_mean": float(np.mean([m["r2"] for m in per_seed])),
            "n_seeds": len(per_seed)}  # fmt: skip


def _per_seed(data: IonData, members: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """mean +- std over the source ensemble's seeds of one member at a time."""
    return _summary([metrics_by_split(data, m) for m in members])


def evaluate_source(data: IonData, store: GraphStore, checkpoint: Path) -> dict[str, Any]:
    src = load_checkpoint(checkpoint)
    preds, members = source_predictions(src, data, store)
    m = metrics_by_split(data, preds)
    cgcnn = _summary([m])
    return {
        "methods": {"cgcnn": cgcnn, "source_unchanged": cgcnn,
                    "cgcnn_per_seed": _per_seed(data, members)},
        "test_predictions": {"cgcnn": preds["test"]},
        "val_predictions": preds["val"],
        "test_mae": m["test"]["mae"],
        "uncertainty": src.extra.get("uncertainty") or {},
    }  # fmt: skip


class TargetModel(NamedTuple):
    """A transferred ion's comparison report, the transfer run its served model is made of, and
    the artifact's CHGNet section (None: the CGCNN is served alone)."""

    report: dict[str, Any]
    final: TransferResult
    chgnet: ChgnetPart | None = None


def evaluate_target(inputs: IonInputs, checkpoint: Path, cfg: TransferSettings) -> TargetModel:
    """Every comparison row of a transferred ion and the model it serves: the CGCNN transfer
    variant chosen on validation among ``select_heads`` (pooling by CV, with the ion's
    ``partners``), the CHGNet head (when ``inputs.chg`` is given), and which of CGCNN / CHGNet /
    their average is served, by grouped CV on train+val (``gp_cv.choose_variant``)."""
    data, store, partners = inputs.data, inputs.store, inputs.partners
    src = load_checkpoint(checkpoint)
    methods: dict[str, Any] = {}
    y_train = data.targets("train")
    mean_pred = {s: np.full(len(data.parts[s]), y_train.mean()) for s in data.parts}
    methods["mean"] = _summary([metrics_by_split(data, mean_pred)])
    unchanged, members = source_predictions(src, data, store)
    methods["source_unchanged"] = _summary([metrics_by_split(data, unchanged)])
    offset, shifted = _offset(unchanged, y_train)
    methods["source_offset"] = _summary([metrics_by_split(data, shifted)])
    methods["source_unchanged_per_seed"] = _per_seed(data, members)
    methods["source_offset_per_seed"] = _per_seed(data, [_offset(m, y_train)[1] for m in members])

    scratch = scratch_cgcnn(data, store, src.model_config, cfg, cfg.seeds)
    methods["cgcnn_scratch"] = _summary([metrics_by_split(data, p) for p in scratch])

    variant = _variant_selection(inputs, src, cfg)
    if variant is not None and partners:
        pool_selection = variant["pooling"]["cgcnn"]
    else:
        pool_selection = _pool_selection(inputs, src, cfg)
    runs = transfer_variants(TransferInputs(src, data, store, cfg, partners))
    per_variant = {name: _transfer_summary(data, results) for name, results in runs.items()}
    kinds = selectable_kinds(cfg.select_heads, pool_selection)
    eligible = [n for n in per_variant if runs[n][0].head_kind in kinds]
    best = min(eligible, key=lambda name: per_variant[name]["val_mae_mean"])
    methods["transfer"] = per_variant[best]
    final = runs[best][0]
    methods["transfer_per_seed"] = _per_seed(data, member_predictions(final))
    for name, summ in per_variant.items():
        methods[name] = summ
    cgcnn_preds = {s: final.mean_std(s) for s in data.parts}
    chgnet, served = _chgnet_rows(inputs, cfg, variant, methods)
    choice = "cgcnn" if variant is None else variant["choice"]
    served_preds = variant_predictions(choice, cgcnn_preds, chgnet)
    methods["served"] = _summary([metrics_by_split(data, {s: m for s, (m, _) in
                                                          served_preds.items()})])  # fmt: skip
    report = {
        "methods": methods,
        "head": final.head_kind,
        "descriptor_weights": final.descriptor_weights(),
        "pool_ions": list(final.pool_ions),
        "pool_selection": pool_selection,
        "bn_mode": final.bn_mode,
        "bn_selected_on": "validation MAE (mean over seeds)",
        "offset_V": offset,
        "served_variant": choice,
        "variant_selection": None if variant is None else variant_report(variant),
        "test_predictions": {
            "served": served_preds["test"][0],
            "transfer": final.mean_std("test")[0],
            **({} if chgnet is None else {"chgnet_gp": chgnet.preds["test"][0]}),
            "source_unchanged": unchanged["test"],
            "cgcnn_scratch": scratch[0]["test"],
        },
        "val_predictions": served_preds["val"][0],
        "test_mae": regression_metrics(data.targets("test"), served_preds["test"][0])["mae"],
        "uncertainty": _served_uncertainty(data, final, served_preds, variant),
    }
    return TargetModel(report, final, served)


def _transfer_summary(data: IonData, results: list[TransferResult]) -> dict[str, Any]:
    """mean +- std over the seeds of a transfer variant's ensemble."""
    return _summary(
        [metrics_by_split(data, {s: r.mean_std(s)[0] for s in data.parts}) for r in results]
    )


def _variant_selection(
    inputs: IonInputs, src: LoadedModel, cfg: TransferSettings
) -> dict[str, Any] | None:
    """The train+val grouped CV choosing CGCNN / CHGNet / average (None: no CHGNet features or
    CHGNet disabled, or no GP head may be served)."""
    if inputs.chg is None or not cfg.chgnet.enabled or "gp" not in cfg.select_heads:
        return None
    backbones = cv_backbones(inputs, src, gp_config(cfg.gp), gp_config(cfg.chgnet.gp))
    return choose_variant(inputs, backbones, cfg.chgnet.cv_folds, cfg.chgnet.variants)


def _chgnet_rows(
    inputs: IonInputs,
    cfg: TransferSettings,
    variant: dict[str, Any] | None,
    methods: dict[str, Any],
) -> tuple[ChgnetFit | None, ChgnetPart | None]:
    """The CHGNet heads' comparison rows (``chgnet_gp``: as the variant CV pools it;
    ``chgnet_gp_alone``/``chgnet_gp_pooled`` both for ions with partners), the fit the served
    model would use and the artifact's CHGNet section for the chosen variant."""
    data, store, partners, chg = inputs.data, inputs.store, inputs.partners, inputs.chg
    if variant is None or chg is None:
        return None, None
    gp = gp_config(cfg.chgnet.gp)
    fits = {"alone": fit_chgnet_head(data, store, chg, gp)}
    if partners:
        fits["pooled"] = fit_chgnet_head(data, store, chg, gp, partners)
    pool = bool((variant["pooling"].get("chgnet") or {}).get("pool", False))
    chosen = fits["pooled" if pool and "pooled" in fits else "alone"]
    for name, fit in fits.items():
        if partners:
            methods[f"chgnet_gp_{name}"] = _summary([metrics_by_split(data, fit.means())])
    methods["chgnet_gp"] = _summary([metrics_by_split(data, chosen.means())])
    return chosen, served_part(variant["choice"], chosen)


def _served_uncertainty(
    data: IonData, final: TransferResult, served: dict[str, tuple[np.ndarray, np.ndarray]],
    variant: dict[str, Any] | None,
) -> dict[str, float]:  # fmt: skip
    """Test calibration of the served variant with the std scale it serves: fitted on the
    variant CV's out-of-fold predictions (train+val, hundreds of crystals) when there was one,
    else the CGCNN rule (``uncertainty_report``)."""
    if variant is None:
        return uncertainty_report(data, final)
    scale = float(variant["std_scale"])
    (vm, vs), (tm, ts) = served["val"], served["test"]
    return {"std_scale": scale, "std_scale_from": variant["std_scale_from"],
            "val_coverage_90": calibration(data.targets("val"), vm, vs * scale)["coverage_90"],
            **calibration(data.targets("test"), tm, ts * scale)}  # fmt: skip


def _offset(
    preds: dict[str, np.ndarray], y_train: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """The constant that zeroes the predictions' mean error on the training split, and the
    predictions shifted by it."""
    shift = float(np.mean(y_train - preds["train"]))
    return shift, {s: p + shift for s, p in preds.items()}


def _pool_selection(
    inputs: IonInputs, src: LoadedModel, cfg: TransferSettings
) -> dict[str, Any] | None:
    """The train+val CV deciding whether the GP head pools its partners (None: no partners, or
    no GP head may be served; ``pool_cv_folds: 0``: always pool, no CV)."""
    if not inputs.partners or "gp" not in cfg.select_heads:
        return None
    if cfg.pool_cv_folds == 0:
        return {"pool": True, "rule": "always (pool_cv_folds: 0)"}
    report = choose_pooling(inputs, src, gp_config(cfg.gp), cfg.pool_cv_folds)
    return {**report, "rule": "lower grouped-CV MAE on train+val"}


def selectable_kinds(
    select_heads: Sequence[str], pool_selection: dict[str, Any] | None
) -> set[str]:
    """The head kinds the served model may be chosen from: ``select_heads``, where ``gp`` means
    the pooled head or, when the pooling CV said no, the head on the ion's own crystals."""
    kinds = set(select_heads)
    if pool_selection is not None and not pool_selection["pool"] and "gp" in kinds:
        kinds = (kinds - {"gp"}) | {"gp_alone"}
    return kinds


def transfer_variants(inputs: TransferInputs) -> dict[str, list[TransferResult]]:
    """Every head kind x BatchNorm mode, named ``transfer_<head>_bn_<mode>``, over the seeds
    (GP heads are deterministic: one run). ``gp_alone`` (the GP without the partners' rows) only
    runs when there are partners; otherwise it is ``gp``. Every run reads the frozen backbones'
    vectors from ``inputs``: computed once per BatchNorm mode, whatever the head or seed."""
    cfg = inputs.cfg
    runs = {}
    for kind in HEAD_KINDS:
        if kind == "gp_alone" and not inputs.partners:
            continue
        seeds = cfg.seeds[:1] if kind in GP_KINDS else cfg.seeds
        for mode in cfg.bn_modes:
            runs[f"transfer_{kind}_bn_{mode}"] = [
                transfer(inputs, mode, seed, head_kind=kind) for seed in seeds
            ]
    return runs


def save_transfer_checkpoint(
    path: Path, target: TargetModel, src_path: Path, data: IonData, run_id: str
) -> None:
    """The served artifact: the CGCNN transfer model, plus the CHGNet head when the served
    variant uses one (``target.chgnet``, with its share of the prediction)."""
    result, report = target.final, target.report
    src = load_checkpoint(src_path)
    first, *rest = result.members
    extra = {
        "ion": data.ion,
        "source_ion": src.extra.get("ion"),
        "bn_mode": result.bn_mode,
        "head": result.head_kind,
        "pool_ions": list(result.pool_ions),
        "std_scale": report["uncertainty"]["std_scale"],
        "train_elements": train_elements(data),
        "encoding_fingerprint": encoding_fingerprint(),
        "mlflow_run_id": run_id,  # no test figure: artifacts must not depend on test labels
        "served_variant": report.get("served_variant", "cgcnn"),
        "chgnet_pool_ions": _chgnet_pool_ions(report),
    }
    save_checkpoint(
        path,
        first.model,
        src.model_config,
        src.converter_dict,
        result.normalizer,
        extra,
        heads=first.heads,
        members=[(m.model, m.heads) for m in rest],
        chgnet=target.chgnet,
    )


def _chgnet_pool_ions(report: dict[str, Any]) -> list[str]:
    """The partner ions the served CHGNet head pooled (empty: its own crystals, or no head)."""
    pooling = ((report.get("variant_selection") or {}).get("pooling") or {}).get("chgnet") or {}
    return list(pooling.get("partners", [])) if pooling.get("pool") else []


def source_uncertainty(data: IonData, store: GraphStore, checkpoint: Path) -> dict[str, float]:
    src = load_checkpoint(checkpoint)
    vm, vs = served_mean_std(src, store, data, "val")
    tm, ts = served_mean_std(src, store, data, "test")
    scale = float(src.extra.get("std_scale", fit_std_scale(data.targets("val"), vm, vs)))
    return {"std_scale": scale, **calibration(data.targets("test"), tm, ts * scale)}


def source_variant(
    report: dict[str, Any], inputs: IonInputs, checkpoint: Path, cfg: TransferSettings
) -> ChgnetPart | None:
    """The source ion's served variant: its CGCNN ensemble, a CHGNet GP head fitted on its
    training split, or their average, chosen on the validation split (grouped CV is no option
    here: the Li backbones trained on every train crystal, so their out-of-fold figures would be
    training fits). Adds the CHGNet rows, the decision and the served predictions to
    ``report``; returns the artifact's CHGNet section (None: the CGCNN alone)."""
    data, store, chg = inputs.data, inputs.store, inputs.chg
    if chg is None or not cfg.chgnet.enabled:
        return None
    src = load_checkpoint(checkpoint)
    cgcnn = {s: served_mean_std(src, store, data, s) for s in ("train", "val", "test")}
    fit = fit_chgnet_head(data, store, chg, gp_config(cfg.chgnet.gp))
    report["methods"]["chgnet_gp"] = _summary([metrics_by_split(data, fit.means())])
    preds = {v: variant_predictions(v, cgcnn, fit) for v in cfg.chgnet.variants}
    y_val = data.targets("val")
    val_mae = {v: float(np.mean(np.abs(p["val"][0] - y_val))) for v, p in preds.items()}
    choice = min((v for v in ("cgcnn", "chgnet", "average") if v in preds),
                 key=lambda v: val_mae[v])  # fmt: skip
    served = preds[choice]
    scale = fit_std_scale(y_val, *served["val"])
    report["methods"]["served"] = _summary([metrics_by_split(
        data, {s: m for s, (m, _) in served.items()})])  # fmt: skip
    report["served_variant"] = choice
    report["variant_selection"] = {
        "val_mae": val_mae, "candidates": list(cfg.chgnet.variants), "choice": choice,
        "rule": "lowest validation MAE (the Li backbones trained on every train crystal)",
        "std_scale": scale, "std_scale_from": "validation predictions of the chosen variant",
    }  # fmt: skip
    report["test_predictions"] = {"served": served["test"][0], **report["test_predictions"],
                                  "chgnet_gp": fit.preds["test"][0]}  # fmt: skip
    report["val_predictions"] = served["val"][0]
    report["test_mae"] = regression_metrics(data.targets("test"), served["test"][0])["mae"]
    test_mean, test_std = served["test"]
    report["uncertainty"] = {
        "std_scale": scale,
        **calibration(data.targets("test"), test_mean, test_std * scale),
    }
    return served_part(choice, fit)


def copy_source_artifact(
    source: Path, out: Path, chgnet: ChgnetPart | None, report: dict[str, Any]
) -> None:
    """The source ion's served artifact: its checkpoint as trained, plus the CHGNet section and
    the served std scale when the validation choice took a CHGNet variant."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if chgnet is None and "served_variant" not in report:
        shutil.copyfile(source, out)
        return
    payload = torch.load(source, map_location="cpu", weights_only=True)
    payload["schema_version"] = SCHEMA_VERSION
    payload["chgnet"] = None if chgnet is None else chgnet.to_payload()
    payload["extra"] = {**payload.get("extra", {}), "served_variant": report["served_variant"],
                        "std_scale": float(report["uncertainty"]["std_scale"])}  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)


def uncleaned_test(
    checkpoint: Path, store: GraphStore, cleaned: IonData, uncleaned: IonData,
    baseline_csv: Path | None = None, chg: ChgnetFeatures | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The served model on every test row of the ion before cleaning, beside the cleaned ones:
    the cleaning rule's thresholds come from training rows, and this says what dropping the
    test rows outside them does to the reported figure. ``baseline_csv``: the baselines stage's
    predictions of the same rows (its models fitted on the cleaned training rows), scored as
    ``baselines.<name>`` so every method faces the dropped rows alike."""
    pred = served_mean_std(load_checkpoint(checkpoint), store, uncleaned, "test", chg)[0]
    y = uncleaned.targets("test")
    mean = np.full(len(y), cleaned.targets("train").mean())
    out = {"n": len(y), "n_cleaned": len(cleaned.parts["test"]),
           "served": regression_metrics(y, pred), "mean": regression_metrics(y, mean)}  # fmt: skip
    if baseline_csv is not None:
        by_name = _csv_metrics(baseline_csv, uncleaned.ids("test"), y)
        out["baselines"] = {name: _seed_mean(per_seed) for name, per_seed in by_name.items()}
    return out


def _seed_mean(per_seed: list[dict[str, float]]) -> dict[str, Any]:
    """mae/rmse/r2 averaged over a baseline's seed columns, with the MAE's std over seeds."""
    mae = np.array([m["mae"] for m in per_seed])
    return {"mae": float(mae.mean()), "rmse": float(np.mean([m["rmse"] for m in per_seed])),
            "r2": float(np.mean([m["r2"] for m in per_seed])), "mae_std": float(mae.std()),
            "n_seeds": len(per_seed)}  # fmt: skip


@dataclass(frozen=True)
class IonModelPaths:
    """The baselines stage's predictions the comparison reads, and where the stage writes."""

    baselines: Path  # test predictions of the ion's baselines
    checkpoint: Path
    metrics: Path
    predictions: Path
    baselines_uncleaned: Path | None = None  # their predictions of the uncleaned test rows


def run_ion_stage(
    inputs: IonInputs,
    source_checkpoint: Path,
    cfg: TransferSettings,
    mlflow_settings: MlflowSettings,
    paths: IonModelPaths,
) -> dict[str, Any]:
    """One ion's model and comparison. ``inputs.source_train_hosts``: the hosts the source
    backbones trained on (the pooling CV scores no crystal on one); ``inputs.uncleaned``: the
    ion's rows before cleaning, to report the served model on every test row too, and the
    baselines as well when ``paths.baselines_uncleaned`` holds their predictions of those rows."""
    import mlflow

    from training.train.pyfunc import log_pyfunc

    data, store, chg, source_ion = inputs.data, inputs.store, inputs.chg, inputs.source_ion
    setup_mlflow(mlflow_settings)
    is_source = inputs.is_source
    with mlflow.start_run(run_name=f"{'evaluate' if is_source else 'transfer'}-{data.ion}") as run:
        mlflow.set_tags({"stage": "ion_model", "ion": data.ion, "source_ion": source_ion,
                         **standard_tags(Path("."), GRAPH_DATA_FILES)})  # fmt: skip
        mlflow.log_params({f"transfer.{k}": str(v) for k, v in cfg.model_dump().items()})
        if is_source:
            report = evaluate_source(data, store, source_checkpoint)
            report["uncertainty"] = source_uncertainty(data, store, source_checkpoint)
            part = source_variant(report, inputs, source_checkpoint, cfg)
            copy_source_artifact(source_checkpoint, paths.checkpoint, part, report)
        else:
            target = evaluate_target(inputs, source_checkpoint, cfg)
            save_transfer_checkpoint(
                paths.checkpoint, target, source_checkpoint, data, run.info.run_id
            )
            report = target.report
        report["methods"].update(baseline_rows(data, paths.baselines))
        if inputs.uncleaned is not None:
            report["test_uncleaned"] = uncleaned_test(
                paths.checkpoint, store, data, inputs.uncleaned, paths.baselines_uncleaned, chg
            )
        preds = report.pop("test_predictions")
        _write_predictions(paths.predictions, data, preds)
        _log_val_predictions(paths.predictions, data, report.pop("val_predictions"))
        report.update({"ion": data.ion, "source_ion": source_ion,
                       "n": {s: len(v) for s, v in data.parts.items()}})  # fmt: skip
        for name, summ in report["methods"].items():
            mlflow.log_metric(f"{name}_test_mae", summ["test_mae_mean"])
        mlflow.log_metrics({f"unc_{k}": v for k, v in report["uncertainty"].items()
                            if isinstance(v, int | float)})  # fmt: skip
        example = str(CifWriter(data.parts["test"][0].structure()))
        info = log_pyfunc(paths.checkpoint, example)
        report["model_uri"] = info.model_uri
        report["run_id"] = run.info.run_id
        paths.metrics.parent.mkdir(parents=True, exist_ok=True)
        paths.metrics.write_text(json.dumps(report, indent=2) + "\n")
        mlflow.log_artifact(str(paths.metrics))
        mlflow.log_artifact(str(paths.predictions))
    return report


def _write_predictions(path: Path, data: IonData, preds: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(preds)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "target", *names])
        for i, (bid, y) in enumerate(zip(data.ids("test"), data.targets("test"), strict=True)):
            w.writerow([bid, f"{y:.4f}", *(f"{preds[n][i]:.4f}" for n in names)])


def _log_val_predictions(predictions_out: Path, data: IonData, val: np.ndarray) -> Path:
    """Write the served model's per-crystal validation predictions beside ``predictions_out``
    (``<stem>_val.csv``) and log them in the active run: the promotion gate pairs two versions
    on these, so that it never has to read the test split (training/registry.py)."""
    import mlflow

    from training.registry import VAL_COLUMNS, VAL_PREDICTIONS_DIR

    path = predictions_out.with_name(f"{predictions_out.stem}_val.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(VAL_COLUMNS)
        for bid, y, p in zip(data.ids("val"), data.targets("val"), val, strict=True):
            w.writerow([bid, f"{y:.4f}", f"{p:.4f}"])
    mlflow.log_artifact(str(path), artifact_path=VAL_PREDICTIONS_DIR)
    return path


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    splits: Path
    graphs: Path
    source_checkpoint: Path
    baselines: Path
    checkpoint: Path
    metrics: Path
    predictions: Path
    records_all: Path | None = None
    splits_all: Path | None = None
    baselines_uncleaned: Path | None = None
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params).require_ion(opts.ion)
    if opts.baselines_uncleaned is not None and opts.splits_all is None:
        raise UsageError("--baselines-uncleaned needs --records-all and --splits-all")
    files = IonFiles(
        opts.records,
        opts.splits,
        opts.graphs,
        opts.chgnet_features,
        opts.records_all,
        opts.splits_all,
    )
    paths = IonModelPaths(
        opts.baselines, opts.checkpoint, opts.metrics, opts.predictions, opts.baselines_uncleaned
    )
    return run_ion_stage(
        IonInputs.load(p, opts.ion, files), opts.source_checkpoint, p.transfer, p.mlflow, paths
    )
