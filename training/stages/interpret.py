"""The ``interpret`` stage: what one ion's model learned (paper Fig. 3), as PNGs + one JSON.

Inputs are the pipeline's own artefacts (checkpoint, cleaned records, splits, graph cache and the
baselines report); nothing is retrained except the linear local-voltage head, which is fitted on
the training split only and scored on val/test like every other model.  The head is also written
as a JSON sidecar for the service's ``"explain": true``.  Everything is logged to MLflow in a run
tagged with (and nested under) the run that produced the checkpoint, so the explanation travels
with the model it explains.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.chgnet_store import ChgnetFeatures, load_optional
from training.config import InterpretSettings, load_params
from training.data.ion_inputs import IonInputs
from training.datasets import IonData, load_ion_data
from training.graphs.store import GraphStore
from training.interpret import plots
from training.interpret.activations import Activations, compute_activations
from training.interpret.elements import PROPERTIES, embedding_analysis
from training.interpret.environments import (
    element_medians,
    oxygen_counts_for,
    project_environments,
)
from training.interpret.local_fit import fit_linear, fit_local_head
from training.tracking import MlflowSettings
from voltage_model.graphs.converter import CrystalGraph
from voltage_model.local_voltage import (
    CHGNET_MEAN_COLUMNS,
    ChgnetLocalHead,
    LocalVoltageHead,
    backbone_fingerprint,
    mlflow_artifact_paths,
)
from voltage_model.predict import VoltageModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InterpretPaths:
    """Where the stage writes (dvc.yaml passes them; settings never hold paths)."""

    plots_dir: Path
    metrics: Path
    head: Path

    def plot(self, name: str) -> Path:
        return self.plots_dir / f"{name}.png"


# =============================================================================== data
def _graphs_for(
    data: IonData, store: GraphStore | None, model: VoltageModel
) -> tuple[list[str], list[CrystalGraph], dict[str, str]]:
    """One graph per distinct charged structure of the ion (cache when it was built the same way).

    A cache built with other graph settings than the checkpoint's would silently feed the model
    different inputs, so it is only used when the converters are equal; otherwise graphs are
    rebuilt from the records' structures.
    """
    usable = store is not None and store.converter.to_dict() == model.converter.to_dict()
    ids: list[str] = []
    graphs: list[CrystalGraph] = []
    skipped: dict[str, str] = {}
    seen: set[str] = set()
    for split in ("train", "val", "test"):
        for rec in data.parts[split]:
            cid = rec.charged_id
            if cid in seen:
                continue
            seen.add(cid)
            try:
                if usable and cid in store:  # type: ignore[operator]
                    graph = store.get(cid)  # type: ignore[union-attr]
                else:
                    graph = model.converter.convert(rec.structure())
                graphs.append(graph)
                ids.append(cid)
            except ValueError as exc:
                skipped[cid] = str(exc)
    return ids, graphs, skipped


def _rows(data: IonData, split: str, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(crystal positions, DFT voltages) of a split's batteries that have a graph."""
    pos, y = [], []
    for rec in data.parts[split]:
        if rec.charged_id in index:
            pos.append(index[rec.charged_id])
            y.append(rec.battery_avg_voltage)
    return np.asarray(pos, dtype=np.int64), np.asarray(y, dtype=np.float64)


def _errors(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = pred - y
    ss = float(((y - y.mean()) ** 2).sum()) if y.size else 0.0
    return {
        "mae": float(np.abs(err).mean()) if y.size else float("nan"),
        "rmse": float(np.sqrt((err**2).mean())) if y.size else float("nan"),
        "r2": 1.0 - float((err**2).sum()) / ss if ss > 0 else float("nan"),
        "n": int(y.size),
    }


# =============================================================================== analyses
def fit_head(
    data: IonData, act: Activations, fingerprint: str, settings: InterpretSettings
) -> tuple[LocalVoltageHead, dict[str, Any]]:
    """Fit the local-voltage head on train; score it (and the full model) on every split."""
    index = {cid: i for i, cid in enumerate(act.ids)}
    rows = {s: _rows(data, s, index) for s in ("train", "val", "test")}
    pos, y_dft = rows["train"]
    y = y_dft if settings.head_target == "dft" else act.predictions[pos]
    head = fit_local_head([p[pos] for p in act.pooled], y, fingerprint, settings.ridge)
    metrics: dict[str, Any] = {"target": settings.head_target, "ridge": settings.ridge}
    for split, (p, yy) in rows.items():
        linear = head.crystal([x[p] for x in act.pooled])
        metrics[split] = {
            "linear_head_vs_dft": _errors(linear, yy),
            "model_vs_dft": _errors(act.predictions[p], yy),
            "linear_head_vs_model": _errors(linear, act.predictions[p]),
        }
    info = {"ion": data.ion, "fitted_on": "train", "n_train": int(pos.size), "metrics": metrics}
    head = LocalVoltageHead(head.weights, head.biases, fingerprint, info)
    return head, metrics


def fit_chgnet_local_head(
    data: IonData, chg: ChgnetFeatures, spec: dict[str, str], settings: InterpretSettings
) -> tuple[ChgnetLocalHead, dict[str, Any]]:
    """The CHGNet local-voltage head: least squares of the DFT voltage on the per-crystal mean
    of CHGNet's atom features, training split only; scored on every split."""
    def rows(split: str) -> tuple[np.ndarray, np.ndarray]:
        hosts = data.host_ids(split)
        ok = chg.valid(hosts)
        x = chg.rows([h for h, k in zip(hosts, ok, strict=True) if k])[:, CHGNET_MEAN_COLUMNS]
        return x, data.targets(split)[ok]

    x, y = rows("train")
    w, b = fit_linear(x, y, settings.ridge)
    metrics: dict[str, Any] = {"target": "dft", "ridge": settings.ridge}
    for split in ("train", "val", "test"):
        xs, ys = rows(split)
        metrics[split] = {"linear_head_vs_dft": _errors(xs @ w + b, ys)}
    info = {"ion": data.ion, "fitted_on": "train", "n_train": len(y), "metrics": metrics}
    return ChgnetLocalHead(tuple(float(v) for v in w), b, dict(spec), info), metrics


def local_environment_analysis(
    act: Activations, graphs: list[CrystalGraph], head: LocalVoltageHead, s: InterpretSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Local voltages of O-coordinated sites: per-element medians and 2-D maps (member 0)."""
    local = head.local(act.atom_vectors)
    o_counts = oxygen_counts_for(graphs, s.o_bond_tolerance)
    mask = o_counts >= s.min_o_neighbors
    medians = element_medians(
        act.atomic_numbers, local, act.crystal_of_atom(), mask, s.min_sites_per_element
    )
    o_sites = np.flatnonzero(mask)
    proj = project_environments(
        act.atom_vectors[0][o_sites], local[o_sites], s.tsne_max_points, s.tsne_perplexity, s.seed
    )
    summary = {
        "min_o_neighbors": s.min_o_neighbors,
        "o_bond_tolerance": s.o_bond_tolerance,
        "n_sites": int(local.size),
        "n_o_coordinated_sites": int(o_sites.size),
        "local_voltage_all_sites": {"mean": float(local.mean()), "std": float(local.std())},
        "by_element": medians,
    }
    return summary, proj


def rf_importances(baselines_metrics: Path | None) -> dict[str, Any] | None:
    """The RF Gini importances the baselines stage already wrote (None if unavailable)."""
    if baselines_metrics is None or not baselines_metrics.is_file():
        return None
    report = json.loads(baselines_metrics.read_text())
    top, groups = report.get("rf_importance_top15"), report.get("rf_importance_by_property")
    if not top:
        return None
    return {"top15": top, "by_property": groups or []}


def claims(report: dict[str, Any]) -> dict[str, Any]:
    """The paper's claims, each with the measured number it rests on and whether it held.

    Thresholds are stated here, not tuned: |rho| >= 0.5 with p < 0.01 counts as "tracks".
    """
    out: dict[str, Any] = {}
    corr = report["element_embedding"]["spearman"]
    rho2 = corr["PC2"]["covalent_radius"]
    best_pc2 = max(corr["PC2"].items(), key=lambda kv: abs(np.nan_to_num(kv[1]["rho"])))[0]
    out["covalent_radius_tracks_pc2"] = {
        "rho": rho2["rho"], "p": rho2["p"], "strongest_pc2_property": best_pc2,
        "held": bool(abs(rho2["rho"]) >= 0.5 and rho2["p"] < 0.01),
    }  # fmt: skip
    rf = report.get("rf_importance")
    if rf:
        name, share = rf["top15"][0][0], float(rf["top15"][0][1])
        out["rf_covalent_radius_first"] = {
            "top_feature": name, "share": share,
            "held": "CovalentRadius" in str(name) and share >= 0.1,
        }  # fmt: skip
    head = report["local_voltage"]["head"]["test"]
    out["local_voltage_mean_reproduces_voltage"] = {
        "linear_head_test_mae": head["linear_head_vs_dft"]["mae"],
        "model_test_mae": head["model_vs_dft"]["mae"],
        "held": bool(head["linear_head_vs_dft"]["mae"] <= 1.25 * head["model_vs_dft"]["mae"]),
    }
    knn = report["environments"]["knn10_r2_local_voltage"]["tsne"]
    out["environments_cluster_by_local_voltage"] = {
        "tsne_knn10_r2": knn, "held": bool(np.isfinite(knn) and knn >= 0.5),
    }  # fmt: skip
    return out


# =============================================================================== stage
def _figures(report: dict[str, Any], proj: dict[str, Any], paths: InterpretPaths, ion: str) -> list:
    emb = report["element_embedding"]
    files = [
        plots.element_pca_plot(
            emb["elements"], np.asarray(emb["pc"]), emb["groups"], emb["explained_variance_ratio"],
            paths.plot("element_pca"), f"{ion}: learned element embeddings (backbone 0), PCA",
        ),
        plots.periodic_heatmap(
            report["local_voltage"]["o_coordinated"]["by_element"], paths.plot("local_voltage"),
            f"{ion}: median local voltage of O-coordinated sites "
            f"(>= {report['local_voltage']['o_coordinated']['min_o_neighbors']} O neighbours)",
        ),
        plots.environments_plot(
            proj["pca"], proj["tsne"], proj["values"], paths.plot("environments"),
            f"{ion}: local environments (n={len(proj['values'])})",
        ),
    ]  # fmt: skip
    rf = report.get("rf_importance")
    if rf:
        files.append(
            plots.rf_importance_plot(
                rf["top15"],
                rf["by_property"],
                paths.plot("rf_importance"),
                f"{ion}: random forest on composition features",
            )
        )
    return files


def run_interpret(
    inputs: IonInputs,
    checkpoint: Path,
    baselines_metrics: Path | None,
    paths: InterpretPaths,
    settings: InterpretSettings,
    mlflow_settings: MlflowSettings | None = None,
) -> dict[str, Any]:
    """Compute every analysis, write PNGs + JSON + head sidecar, log to MLflow; returns the JSON.
    ``inputs.store`` None: graphs built from the structures. A model that serves a CHGNet head
    also gets a CHGNet local-voltage head (needs ``inputs.chg``)."""
    t0 = time.perf_counter()
    ion, data, store, chg = inputs.ion, inputs.data, inputs.store, inputs.chg
    model = VoltageModel.from_checkpoint(checkpoint)
    ids, crystal_graphs, skipped = _graphs_for(data, store, model)
    act = compute_activations(
        model.loaded, crystal_graphs, ids, model.converter, model.encoding, settings.batch_size
    )
    fingerprint = backbone_fingerprint(model.loaded)
    head, head_metrics = fit_head(data, act, fingerprint, settings)
    chgnet_metrics = None
    if model.loaded.chgnet is not None:
        if chg is None:
            raise ValueError(f"{ion}: the model serves a CHGNet head; pass the CHGNet features")
        chgnet_head, chgnet_metrics = fit_chgnet_local_head(data, chg, model.loaded.chgnet.spec,
                                                            settings)  # fmt: skip
        head = replace(head, chgnet=chgnet_head)
    o_summary, proj = local_environment_analysis(act, crystal_graphs, head, settings)
    zs = sorted({int(z) for z in act.atomic_numbers})
    members = [m for m, _ in model.loaded.backbones()]
    emb = embedding_analysis(members[0], model.encoding, zs)
    report: dict[str, Any] = {
        "ion": ion,
        "model": {
            "checkpoint": str(checkpoint), "mlflow_run_id": model.info.get("mlflow_run_id"),
            "backbone_fingerprint": fingerprint, "n_backbones": len(members),
        },
        "n_structures": len(ids), "skipped": skipped,
        "element_embedding": {"backbone": 0, "properties": PROPERTIES, **emb},
        "element_embedding_other_backbones": [
            embedding_analysis(m, model.encoding, zs)["spearman"] for m in members[1:]
        ],
        "local_voltage": {"head": head_metrics, "o_coordinated": o_summary,
                          "chgnet_head": chgnet_metrics},
        "environments": proj["metrics"],
        "rf_importance": rf_importances(baselines_metrics),
    }  # fmt: skip
    report["claims"] = claims(report)
    files = _figures(report, proj, paths, ion)
    head.save(paths.head)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    paths.metrics.parent.mkdir(parents=True, exist_ok=True)
    paths.metrics.write_text(json.dumps(_json_safe(report), indent=1, allow_nan=False) + "\n")
    if mlflow_settings is not None:
        log_to_mlflow(mlflow_settings, report, [*files, paths.metrics], paths.head)
    return report


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None recursively: strict JSON, which DVC and other readers accept."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# =============================================================================== mlflow
def _scalar_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Headline numbers as flat MLflow metrics (NaN dropped: some stores reject it)."""
    out: dict[str, float] = {}
    for pc, props in report["element_embedding"]["spearman"].items():
        for name, r in props.items():
            out[f"spearman_{pc}_{name}"] = r["rho"]
    for split, m in report["local_voltage"]["head"].items():
        if isinstance(m, dict):
            out[f"local_head_{split}_mae"] = m["linear_head_vs_dft"]["mae"]
            out[f"model_{split}_mae"] = m["model_vs_dft"]["mae"]
    for name, v in report["environments"]["knn10_r2_local_voltage"].items():
        out[f"env_knn10_r2_{name}"] = v
    out["o_coordinated_sites"] = report["local_voltage"]["o_coordinated"]["n_o_coordinated_sites"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def log_to_mlflow(
    mlflow_settings: MlflowSettings, report: dict[str, Any], files: list[Path],
    head: Path | None = None,
) -> str:  # fmt: skip
    """Run ``interpret-<ion>``, tagged with the checkpoint's run and nested under it if present;
    the local-voltage head goes to its own folder as ``<ion>.json``, where the service looks for
    the head of a served version (``serving.local_heads``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from training.tracking import setup_mlflow, standard_tags

    setup_mlflow(mlflow_settings)
    model_run = report["model"].get("mlflow_run_id")
    tags = {"stage": "interpret", "ion": report["ion"], **standard_tags()}
    if model_run:
        tags["model_run_id"] = model_run
        try:
            mlflow.get_run(model_run)
            tags["mlflow.parentRunId"] = model_run  # shows the run under the model's run in the UI
        except MlflowException:
            log.warning("model run %s not in this tracking store; tagging only", model_run)
    with mlflow.start_run(run_name=f"interpret-{report['ion']}") as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics(_scalar_metrics(report))
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="interpret")
        if head is not None:
            mlflow.log_dict(json.loads(head.read_text()), mlflow_artifact_paths(report["ion"])[0])
        return run.info.run_id


@dataclass(frozen=True)
class Options:
    ion: str
    checkpoint: Path
    records: Path
    splits: Path
    graphs: Path
    baselines_metrics: Path
    paths: InterpretPaths
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params).require_ion(opts.ion)
    graphs = opts.graphs
    inputs = IonInputs(
        load_ion_data(opts.records, opts.splits, opts.ion),
        GraphStore.load(graphs) if graphs is not None and graphs.is_file() else None,
        p.source_ion,
        chg=load_optional(opts.chgnet_features),
    )
    return run_interpret(
        inputs, opts.checkpoint, opts.baselines_metrics, opts.paths, p.interpret, p.mlflow
    )
