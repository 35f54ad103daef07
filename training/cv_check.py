"""Grouped k-fold cross-validation of GP transfer against the composition baselines, per ion.

Why: the per-ion test splits hold 11-43 crystals, so one test MAE carries a standard error of
0.04-0.15 V, too coarse to say whether transfer learning beats KRR. Cross-validation over all of
an ion's crystals (folds grouped by host structure, as the split is) scores every crystal once
and gives paired per-crystal differences, whose standard error is much smaller than either MAE's.

What is compared, with the settings the pipeline serves: the GP head (``transfer.gp``) on the
frozen source backbones' pooled vectors and, when configured, the composition descriptors, their
weight chosen by marginal likelihood within each fold (BatchNorm statistics as trained:
re-estimating them per fold would need the fold's graphs twice), and the baselines with their
``params.yaml`` hyperparameters (no per-fold search) on the same Magpie composition features.
The normaliser is refitted per fold. This report is a check, not a selection: nothing
downstream reads it. An ion with pool partners gets two GP rows, ``transfer_gp`` (pooled, as in
``training.gp_cv``) and ``transfer_gp_alone`` (its own crystals): the ``ion_model`` stage serves
the one its train+val CV chose (``pool_selection`` in ``reports/metrics/ion_<ion>.json``).

Caveat: the source backbones were trained on the source ion's training split; a target ion's
host structure can be among those (with a source-ion voltage as target). That holds for the
pipeline's test split too, so the two measurements share it. For the source ion itself the
backbone was trained on the targets being cross-validated, so it is reported as not applicable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.baselines.features import featurize_cached
from training.baselines.models import BaselineConfig, make_krr, make_mean, make_rf, make_svr
from training.datasets import IonData
from training.gp_cv import (
    SPLITS,
    gp_fold,
    group_folds,
    host_descriptors,
    load_partners,
    pooled_by_backbone,
    rows_of,
)
from training.graphs.store import GraphStore
from training.model.artifact import load_checkpoint
from training.model.gp_head import GPConfig


def cross_validate(
    data: IonData, store: GraphStore, source_checkpoint: Path, features_cache: Path,
    baselines: BaselineConfig, gp: GPConfig, folds: int = 10, partners: Sequence[IonData] = (),
) -> dict[str, Any]:  # fmt: skip
    """Per-crystal absolute errors of every method over grouped folds, summarised."""
    hosts, y = rows_of(data, SPLITS)
    x, _ = featurize_cached([f for s in SPLITS for f in data.formulas(s)], features_cache)
    source = load_checkpoint(source_checkpoint)
    feats = pooled_by_backbone(source, store, hosts)
    desc = host_descriptors(store, hosts, gp)
    pool = load_partners(partners, store, source, gp)
    makers = {
        "mean": make_mean,
        "svr": lambda: make_svr(baselines.svr),
        "krr": lambda: make_krr(baselines.krr),
        "rf": lambda: make_rf(baselines.first_rf),
    }
    gp_names = ("transfer_gp", "transfer_gp_alone") if pool is not None else ("transfer_gp",)
    errors = {name: np.zeros(len(y)) for name in (*gp_names, *makers)}
    splits = group_folds(hosts, folds)
    for tr, te in splits:
        held_out = {hosts[i] for i in te}
        pred = gp_fold(feats, desc, y, tr, te, gp, pool, held_out)
        errors["transfer_gp"][te] = np.abs(pred - y[te])
        if pool is not None:
            errors["transfer_gp_alone"][te] = np.abs(gp_fold(feats, desc, y, tr, te, gp) - y[te])
        for name, make in makers.items():
            errors[name][te] = np.abs(make().fit(x[tr], y[tr]).predict(x[te]) - y[te])
    return summarise(errors, len(splits), len(y))


def summarise(errors: dict[str, np.ndarray], folds: int, n: int) -> dict[str, Any]:
    """MAE +- standard error per method, and the paired difference of each GP head to it
    (``gp_minus_this`` for the pooled or only GP head, ``gp_alone_minus_this`` for the head on
    the ion's own crystals when the ion has pool partners)."""
    refs = {"gp": errors["transfer_gp"]}
    if "transfer_gp_alone" in errors:
        refs["gp_alone"] = errors["transfer_gp_alone"]
    out: dict[str, Any] = {"folds": folds, "n": n, "methods": {}}
    for name, err in errors.items():
        row = {"mae": float(err.mean()), "se": float(err.std(ddof=1) / np.sqrt(n))}
        for ref, ref_err in refs.items():
            diff = ref_err - err
            row[f"{ref}_minus_this"] = float(diff.mean())
            row[f"{ref}_minus_this_se"] = float(diff.std(ddof=1) / np.sqrt(n))
        out["methods"][name] = row
    return out


def run_cv_stage(
    data: IonData, store: GraphStore, source_ion: str, source_checkpoint: Path,
    features_cache: Path, baselines: BaselineConfig, gp: GPConfig, folds: int, out: Path,
    partners: Sequence[IonData] = (),
) -> dict[str, Any]:  # fmt: skip
    if data.ion == source_ion:
        report: dict[str, Any] = {
            "not_applicable": "the source backbone was trained on this ion's targets"
        }
    else:
        report = cross_validate(data, store, source_checkpoint, features_cache, baselines, gp,
                                folds, partners)  # fmt: skip
        report["pool_ions"] = [p.ion for p in partners]
    report = {"ion": data.ion, "source_ion": source_ion, **report}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report
