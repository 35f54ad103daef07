"""The source-ion (Li) training stage: CGCNN from scratch, K-head ensemble for uncertainty,
scored once on test, checkpointed, and everything logged to MLflow.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.io.cif import CifWriter

from training.config import load_params
from training.datasets import IonData, load_ion_data, train_elements
from training.graphs.store import GraphStore
from training.plots import parity_plot
from training.tracking import GRAPH_DATA_FILES, MlflowSettings, setup_mlflow, standard_tags
from training.train.heads import (
    GPFit,
    HeadConfig,
    HeadRows,
    fit_gp_volts,
    fit_heads,
    heads_volts,
    pooled_features,
    split_descriptors,
)
from training.train.loaders import split_loader
from training.train.metrics import regression_metrics
from training.train.scoring import Scored, model_predictor, score
from training.train.scratch import Trained, train_side_by_side
from training.train.settings import TrainSettings
from training.train.uncertainty import calibration, fit_std_scale
from voltage_model.artifact import ensemble_volts, save_checkpoint
from voltage_model.graphs.encoding import encoding_fingerprint
from voltage_model.models.cgcnn import CGCNN, Head
from voltage_model.models.gp_fit import parallel_fits
from voltage_model.models.gp_head import GPConfig, GPHead
from voltage_model.normalizer import Normalizer

log = logging.getLogger(__name__)


@dataclass
class MemberHeads:
    """A member's heads and their outputs in volts per split: means (K, n), own variances
    (K, n; zero for MLP heads)."""

    heads: list[Head | GPHead]
    means: dict[str, np.ndarray]
    variances: dict[str, np.ndarray]


def member_heads(
    model: CGCNN, normalizer: Normalizer, data: IonData, store: GraphStore, cfg: HeadConfig
) -> tuple[MemberHeads, dict[str, torch.Tensor]]:
    """A member's MLP heads (its own, or K bootstrap heads) with their predictions per split,
    and its pooled vectors per split (what GP heads are fitted on)."""
    feats = {s: pooled_features(model, split_loader(store, data, s)) for s in data.parts}
    if cfg.n_heads <= 1:
        heads: list[Head | GPHead] = [Head.from_model(model)]
    else:
        heads = list(fit_heads(Head.from_model(model), HeadRows.of(feats, data), normalizer, cfg))
    means = {s: heads_volts(heads, feats[s], normalizer) for s in data.parts}
    variances = {s: np.zeros_like(m) for s, m in means.items()}
    return MemberHeads(heads, means, variances), feats


def with_gp(member: MemberHeads, fit: GPFit) -> MemberHeads:
    """The member with a GP head appended (its means and predictive variances per split)."""
    return MemberHeads(
        [*member.heads, fit.head],
        {s: np.vstack([m, fit.means[s]]) for s, m in member.means.items()},
        {s: np.vstack([v, fit.variances[s]]) for s, v in member.variances.items()},
    )


def add_gp_heads(
    members: list[MemberHeads], feats: list[dict[str, torch.Tensor]],
    desc: dict[str, torch.Tensor] | None, data: IonData, normalizer: Normalizer, gp: GPConfig,
) -> tuple[list[MemberHeads], dict[float, float]]:  # fmt: skip
    """A GP head beside each member's heads. ``gp.select == "validation"``: one set of heads per
    descriptor weight (shared by the members), keeping the set whose whole ensemble has the
    lowest validation MAE; returns that MAE per weight too (empty for ``"likelihood"``)."""
    y = data.targets("train")

    def heads_for(cfg: GPConfig) -> list[MemberHeads]:
        fits = parallel_fits(lambda f: fit_gp_volts(f, desc, y, normalizer, cfg), feats)
        return [with_gp(m, fit) for m, fit in zip(members, fits, strict=True)]

    if gp.select == "likelihood":
        return heads_for(gp), {}
    scores: dict[float, float] = {}
    best: list[MemberHeads] = []
    for cand in gp.candidates():
        trial = heads_for(cand)
        val_mean = combine(trial)["val"][0]
        mae = float(np.mean(np.abs(val_mean - data.targets("val"))))
        log.info("GP heads, descriptor weight %g: ensemble validation MAE %.4f V",
                 cand.descriptor_weights[0], mae)  # fmt: skip
        if not scores or mae < min(scores.values()):
            best = trial
        scores[cand.descriptor_weights[0]] = mae
    return best, scores


def combine(per_member: list[MemberHeads]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Mean and std over every head of every member, per split, by the served model's rule
    (``ensemble_volts``: spread across heads plus the heads' own mean variance)."""
    volts = Normalizer(mean=0.0, std=1.0)
    out = {}
    for split in per_member[0].means:
        means = [torch.from_numpy(r) for m in per_member for r in m.means[split]]
        own = [torch.from_numpy(r) for m in per_member for r in m.variances[split]]
        mean, std = ensemble_volts(volts, means, own)
        out[split] = (mean.numpy(), std.numpy())
    return out


@dataclass(frozen=True)
class TrainPaths:
    """Where the train stage writes: the checkpoint, the metrics JSON and the parity plot."""

    checkpoint: Path
    metrics: Path
    plot: Path


def run_train_stage(
    data: IonData,
    store: GraphStore,
    settings: TrainSettings,
    mlflow_settings: MlflowSettings,
    paths: TrainPaths,
    log_model: bool = True,
) -> dict[str, Any]:
    import mlflow

    checkpoint_out, metrics_out, plot_out = paths.checkpoint, paths.metrics, paths.plot

    setup_mlflow(mlflow_settings)
    with mlflow.start_run(run_name=f"train-{data.ion}") as run:
        tags = standard_tags(Path("."), GRAPH_DATA_FILES)
        mlflow.set_tags({"stage": "train", "ion": data.ion, **tags})
        mlflow.log_params(_params(settings, data))
        members = train_members(data, store, settings)
        trained = members[0]
        single = score(model_predictor(trained.model, trained.normalizer), data, store)
        own = [member_heads(m.model, m.normalizer, data, store, settings.heads) for m in members]
        per_member = [heads for heads, _ in own]
        plain = combine(per_member)  # the members' own MLP heads: no composition anywhere
        gp_scores: dict[float, float] = {}
        if settings.gp is not None:
            desc = split_descriptors(store, data, settings.gp)
            per_member, gp_scores = add_gp_heads(
                per_member, [f for _, f in own], desc, data, trained.normalizer, settings.gp
            )
        heads = [pm.heads for pm in per_member]
        ens = combine(per_member)
        val_mean, val_std = ens["val"]
        scale = fit_std_scale(data.targets("val"), val_mean, val_std)
        report = _report(data, trained, single, ens, scale, settings)
        report["members"] = [m.fit.best_val_mae for m in members]
        report["ensemble_plain"] = {s: regression_metrics(data.targets(s), mean)
                                    for s, (mean, _std) in plain.items()}  # fmt: skip
        report["gp_heads"] = _gp_report(heads, gp_scores)
        save_checkpoint(
            checkpoint_out, trained.model, settings.model, store.converter.to_dict(),
            trained.normalizer, _extra(data, report, scale, run.info.run_id), heads=heads[0],
            members=[(m.model, h) for m, h in zip(members[1:], heads[1:], strict=True)],
        )  # fmt: skip
        test_mean = ens["test"][0]
        parity_plot(data.targets("test"), test_mean, plot_out, f"CGCNN {data.ion} (test)")
        metrics_out.parent.mkdir(parents=True, exist_ok=True)
        metrics_out.write_text(json.dumps(report, indent=2) + "\n")
        mlflow.log_metrics(_flat_metrics(report))
        mlflow.log_artifact(str(plot_out))
        mlflow.log_artifact(str(metrics_out))
        if log_model:
            example = str(CifWriter(data.parts["test"][0].structure()))
            info = log_pyfunc_model(checkpoint_out, example)
            report["model_uri"] = info.model_uri
        report["run_id"] = run.info.run_id
    return report


def train_members(data: IonData, store: GraphStore, settings: TrainSettings) -> list[Trained]:
    """``n_models`` CGCNNs from different seeds, trained side by side (``train_side_by_side``);
    then each member's epoch curves are logged, member 0's without prefix."""
    import mlflow

    cfgs = [replace(settings.train, seed=settings.train.seed + i) for i in range(settings.n_models)]
    members = train_side_by_side(data, store, settings.model, cfgs)
    for i, member in enumerate(members):
        prefix = "" if i == 0 else f"m{i}_"
        for epoch, metrics in enumerate(member.fit.history, start=1):
            mlflow.log_metrics({prefix + k: v for k, v in metrics.items()}, step=epoch)
    return members


def log_pyfunc_model(checkpoint: Path, example_cif: str) -> Any:
    from training.train.pyfunc import log_pyfunc

    return log_pyfunc(checkpoint, example_cif)


def _params(settings: TrainSettings, data: IonData) -> dict[str, Any]:
    out: dict[str, Any] = {f"model.{k}": v for k, v in settings.model.to_dict().items()}
    out.update({f"train.{k}": v for k, v in settings.train.to_dict().items()})
    out.update({f"heads.{k}": v for k, v in vars(settings.heads).items()})
    out["n_models"] = settings.n_models
    out["gp"] = settings.gp
    out.update({f"n_{s}": len(v) for s, v in data.parts.items()})
    return {k: str(v) for k, v in out.items()}


def _report(data, trained, single: Scored, ens, scale: float, settings) -> dict[str, Any]:
    ensemble_metrics = {
        s: regression_metrics(data.targets(s), mean) for s, (mean, _std) in ens.items()
    }
    mean, std = ens["test"]
    return {
        "ion": data.ion,
        "n": {s: len(v) for s, v in data.parts.items()},
        "best_epoch": trained.fit.best_epoch,
        "train_seconds": round(trained.fit.train_seconds, 1),
        "single_model": single.metrics,
        "ensemble": ensemble_metrics,
        "uncertainty": {"std_scale": scale, **calibration(data.targets("test"), mean, std * scale)},
        "test_mae": ensemble_metrics["test"]["mae"],
    }


def _gp_report(heads: list[list[Head | GPHead]], val_mae: dict[float, float]) -> dict | None:
    """The GP heads' descriptor weights, and the validation MAE per weight when chosen so."""
    weights = [float(h.desc_weight) for hs in heads for h in hs if isinstance(h, GPHead)]
    if not weights:
        return None
    return {"descriptor_weights": weights,
            "val_mae_by_weight": {str(w): round(v, 5) for w, v in val_mae.items()}}  # fmt: skip


def _extra(data: IonData, report: dict, scale: float, run_id: str) -> dict[str, Any]:
    return {
        "ion": data.ion,
        "std_scale": scale,
        "train_elements": train_elements(data),
        "encoding_fingerprint": encoding_fingerprint(),
        # no test figure: a served artifact must not change when test labels do (the test
        # split is reported in the registry's tags and the stage's metrics, never stored here)
        "metrics": {
            kind: {s: m for s, m in report[kind].items() if s != "test"}
            for kind in ("ensemble", "single_model")
        },
        "mlflow_run_id": run_id,
    }


def _flat_metrics(report: dict) -> dict[str, float]:
    out = {}
    for kind in ("single_model", "ensemble"):
        for split, vals in report[kind].items():
            out.update({f"{kind}_{split}_{k}": v for k, v in vals.items()})
    out.update({f"unc_{k}": v for k, v in report["uncertainty"].items()})
    return out


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    splits: Path
    graphs: Path
    checkpoint: Path
    metrics: Path
    plot: Path
    best_params: Path | None = None
    epochs: int | None = None  # overrides train.epochs (smoke runs)
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params).require_ion(opts.ion)
    best = json.loads(opts.best_params.read_text()) if opts.best_params else None
    settings = TrainSettings.from_params(p.model, p.train, p.ensemble, best)
    if opts.epochs is not None:
        settings = replace(settings, train=replace(settings.train, epochs=opts.epochs))
    return run_train_stage(
        load_ion_data(opts.records, opts.splits, opts.ion),
        GraphStore.load(opts.graphs),
        settings,
        p.mlflow,
        TrainPaths(opts.checkpoint, opts.metrics, opts.plot),
    )
