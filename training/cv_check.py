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
downstream reads it.

Caveat: the source backbones were trained on the source ion's training split; a target ion's
host structure can be among those (with a source-ion voltage as target). That holds for the
pipeline's test split too, so the two measurements share it. For the source ion itself the
backbone was trained on the targets being cross-validated, so it is reported as not applicable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import GroupKFold

from training.baselines.features import featurize_cached
from training.baselines.models import BaselineConfig, make_krr, make_mean, make_rf, make_svr
from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from training.model.artifact import load_checkpoint
from training.model.descriptors import store_descriptors
from training.model.gp_head import GPConfig, fit_gp_head, head_mean_var
from training.train.heads import PooledRows, pooled_features, with_pooled_rows
from training.train.normalizer import Normalizer

SPLITS = ("train", "val", "test")


def _all_rows(data: IonData) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """(battery ids, host ids, formulas, targets) of every split, concatenated."""
    ids = [b for s in SPLITS for b in data.ids(s)]
    hosts = [h for s in SPLITS for h in data.host_ids(s)]
    formulas = [f for s in SPLITS for f in data.formulas(s)]
    return ids, hosts, formulas, np.concatenate([data.targets(s) for s in SPLITS])


def _pooled(checkpoint: Path, store: GraphStore, hosts: list[str]) -> list[torch.Tensor]:
    """Pooled vectors of every crystal, one matrix per source backbone."""
    loader = GraphLoader(store, [(h, 0.0) for h in hosts], batch_size=512, shuffle=False)
    return [pooled_features(model, loader) for model, _ in load_checkpoint(checkpoint).backbones()]


@dataclass
class Partners:
    """Every crystal of the pool partner ions (``ions.<ion>.pool``): a fold pools those whose
    host is not among its held-out hosts, as the pipeline pools the partners' training split."""

    hosts: np.ndarray
    y: np.ndarray
    ion_index: np.ndarray  # 1.. per row (0 is the cross-validated ion)
    feats: list[torch.Tensor]  # per source backbone
    desc: torch.Tensor | None
    n_ions: int

    def fold_rows(self, backbone: int, held_out: set[str]) -> PooledRows:
        """The rows a fold may use, each ion's targets normalised over its kept rows."""
        keep = torch.from_numpy(~np.isin(self.hosts, sorted(held_out)))
        return PooledRows.normalised(
            self.feats[backbone][keep], None if self.desc is None else self.desc[keep],
            self.y[keep.numpy()], self.ion_index[keep.numpy()], self.n_ions,
        )  # fmt: skip


def load_partners(
    partners: Sequence[IonData], store: GraphStore, source_checkpoint: Path, gp: GPConfig
) -> Partners | None:
    """Pooled vectors and descriptors of every partner crystal (None without partners)."""
    if not partners:
        return None
    rows = [(i + 1, h, t) for i, p in enumerate(partners) for s in SPLITS
            for h, t in zip(p.host_ids(s), p.targets(s), strict=True)]  # fmt: skip
    hosts = [h for _, h, _ in rows]
    desc = torch.from_numpy(store_descriptors(store, hosts)) if gp.uses_descriptors else None
    return Partners(
        hosts=np.array(hosts), y=np.array([t for *_, t in rows]),
        ion_index=np.array([i for i, *_ in rows]), feats=_pooled(source_checkpoint, store, hosts),
        desc=desc, n_ions=len(partners) + 1,
    )  # fmt: skip


def _gp_fold(feats: list[torch.Tensor], desc: torch.Tensor | None, y: np.ndarray,
             tr: np.ndarray, te: np.ndarray, cfg: GPConfig, partners: Partners | None = None,
             held_out: set[str] | None = None) -> np.ndarray:  # fmt: skip
    """Mean over backbones of one GP head each, fitted on the fold's training rows and the
    partners' crystals outside the fold's ``held_out`` hosts (descriptor weight and task scale
    chosen by marginal likelihood per fold, as the pipeline does)."""
    norm = Normalizer.fit(y[tr])
    d_tr, d_te = (None, None) if desc is None else (desc[tr], desc[te])
    preds = []
    with torch.no_grad():
        for b, f in enumerate(feats):
            pooled = None if partners is None else partners.fold_rows(b, held_out or set())
            x, yy, dd, tasks = with_pooled_rows(f[tr], d_tr, norm.norm(y[tr]), pooled)
            head = fit_gp_head(x, yy, cfg, dd, tasks)
            preds.append(norm.denorm(head_mean_var(head, f[te], d_te)[0].double().numpy()))
    return np.mean(preds, axis=0)


def cross_validate(
    data: IonData, store: GraphStore, source_checkpoint: Path, features_cache: Path,
    baselines: BaselineConfig, gp: GPConfig, folds: int = 10, partners: Sequence[IonData] = (),
) -> dict[str, Any]:  # fmt: skip
    """Per-crystal absolute errors of every method over grouped folds, summarised."""
    ids, hosts, formulas, y = _all_rows(data)
    x, _ = featurize_cached(formulas, features_cache)
    feats = _pooled(source_checkpoint, store, hosts)
    desc = torch.from_numpy(store_descriptors(store, hosts)) if gp.uses_descriptors else None
    pool = load_partners(partners, store, source_checkpoint, gp)
    makers = {
        "mean": make_mean,
        "svr": lambda: make_svr(baselines.svr),
        "krr": lambda: make_krr(baselines.krr),
        "rf": lambda: make_rf(baselines.rf),
    }
    errors = {name: np.zeros(len(y)) for name in ("transfer_gp", *makers)}
    n_folds = min(folds, len(set(hosts)))
    for tr, te in GroupKFold(n_splits=n_folds).split(x, y, groups=hosts):
        held_out = {hosts[i] for i in te}
        pred = _gp_fold(feats, desc, y, tr, te, gp, pool, held_out)
        errors["transfer_gp"][te] = np.abs(pred - y[te])
        for name, make in makers.items():
            errors[name][te] = np.abs(make().fit(x[tr], y[tr]).predict(x[te]) - y[te])
    return summarise(errors, n_folds, len(ids))


def summarise(errors: dict[str, np.ndarray], folds: int, n: int) -> dict[str, Any]:
    """MAE +- standard error per method, and the paired difference to GP transfer."""
    gp = errors["transfer_gp"]
    out: dict[str, Any] = {"folds": folds, "n": n, "methods": {}}
    for name, err in errors.items():
        diff = gp - err
        out["methods"][name] = {
            "mae": float(err.mean()),
            "se": float(err.std(ddof=1) / np.sqrt(n)),
            "gp_minus_this": float(diff.mean()),
            "gp_minus_this_se": float(diff.std(ddof=1) / np.sqrt(n)),
        }
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
