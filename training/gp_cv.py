"""Grouped cross-validation of GP transfer heads, shared by the pooling choice and the CV check.

A fold holds out whole host structures (as the pipeline's split does); a GP head per source
backbone is fitted on the fold's other rows (its descriptor weight and ion-column scale chosen by
marginal likelihood, as the pipeline chooses them) and, when the ion has pool partners, on the
partners' crystals whose host is not held out. BatchNorm statistics stay as the source trained
them: re-estimating them per fold would need every fold's graphs twice.

Two users:

* ``choose_pooling`` (the ``ion_model`` stage): whether an ion's GP head pools its partners'
  training crystals, decided by CV over the ion's train+val crystals alone (test untouched);
* ``training.stages.cv`` (the ``cv`` stage): a check over every crystal, nothing reads it.

Leak-free scoring: the source backbones were trained on the source ion's training split, and a
target ion's crystal can sit on one of those hosts (the split is grouped across ions, but a
*training* host is training for every ion). The backbone fits such hosts far better than unseen
ones, so a fold fits on every row it may use but scores only crystals whose host the backbones
never saw (``unseen_by_source``); reports say how many were scored.

Grouping: by host (``charged_id``), as the split, or by chemical system (``chemsys_keys``: the
host's elements without the working ion), so that no reduced formula of a held-out crystal is
among the fold's training rows for that ion (leave-chemical-system-out).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from sklearn.model_selection import GroupKFold

from training.data.split import SPLITS
from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from training.train.heads import PooledRows, pooled_features, with_pooled_rows
from voltage_model.artifact import LoadedModel, ensemble_volts
from voltage_model.models.descriptors import store_descriptors
from voltage_model.models.gp_head import GPConfig, fit_gp_head, head_mean_var
from voltage_model.normalizer import Normalizer

log = logging.getLogger(__name__)


def pooled_by_backbone(
    source: LoadedModel, store: GraphStore, hosts: list[str], n_backbones: int | None = None
) -> list[torch.Tensor]:
    """Pooled vectors of ``hosts``, one matrix per source backbone (the first ``n_backbones``)."""
    loader = GraphLoader(store, [(h, 0.0) for h in hosts], batch_size=512, shuffle=False)
    return [pooled_features(model, loader) for model, _ in source.backbones()[:n_backbones]]


def rows_of(data: IonData, splits: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """(host ids, targets) of ``splits``, concatenated in split order."""
    hosts = [h for s in splits for h in data.host_ids(s)]
    return hosts, np.concatenate([data.targets(s) for s in splits])


def host_descriptors(store: GraphStore, hosts: list[str], gp: GPConfig) -> torch.Tensor | None:
    """The hosts' composition descriptors, when the GP heads read them."""
    return torch.from_numpy(store_descriptors(store, hosts)) if gp.uses_descriptors else None


@dataclass
class Partners:
    """The pool partner ions' crystals (``ions.<ion>.pool``): a fold pools those whose host is
    not among its held-out hosts, as the pipeline pools the partners' training split."""

    hosts: np.ndarray
    y: np.ndarray
    ion_index: np.ndarray  # 1.. per row (0 is the cross-validated ion)
    feats: list[torch.Tensor]  # per source backbone
    desc: torch.Tensor | None
    n_ions: int
    chemsys: np.ndarray | None = None  # each row's chemical system (``chemsys_keys``)
    keys: np.ndarray | None = None  # the group key folds hold out; None: the host

    def fold_rows(self, backbone: int, held_out: set[str]) -> PooledRows:
        """The rows a fold may use (group key not held out), each ion's targets normalised over
        its kept rows."""
        keys = self.hosts if self.keys is None else self.keys
        keep = torch.from_numpy(~np.isin(keys, sorted(held_out)))
        return PooledRows.normalised(
            self.feats[backbone][keep], None if self.desc is None else self.desc[keep],
            self.y[keep.numpy()], self.ion_index[keep.numpy()], self.n_ions,
        )  # fmt: skip


Featurise = Callable[[list[str]], list[torch.Tensor]]


def backbone_features(
    source: LoadedModel, store: GraphStore, n_backbones: int | None = None
) -> Featurise:
    """hosts -> their pooled vectors, one matrix per source backbone (the first
    ``n_backbones``): ``pooled_by_backbone`` as a ``Featurise``."""

    def features(hosts: list[str]) -> list[torch.Tensor]:
        return pooled_by_backbone(source, store, hosts, n_backbones)

    return features


def load_partners(
    partners: Sequence[IonData],
    store: GraphStore,
    gp: GPConfig,
    features: Featurise,
    splits: Sequence[str] = SPLITS,
) -> Partners | None:
    """Features and descriptors of the partners' crystals in ``splits`` (None without
    partners). ``features``: hosts -> one matrix per backbone (``backbone_features`` for the
    source's pooled vectors, or e.g. CHGNet features)."""
    if not partners:
        return None
    rows = [(i + 1, h, t, k) for i, p in enumerate(partners) for s in splits
            for h, t, k in zip(p.host_ids(s), p.targets(s), chemsys_keys(p, (s,)),
                               strict=True)]  # fmt: skip
    hosts = [h for _, h, _, _ in rows]
    return Partners(
        hosts=np.array(hosts), y=np.array([t for _, _, t, _ in rows]),
        ion_index=np.array([i for i, *_ in rows]),
        feats=features(hosts),
        desc=host_descriptors(store, hosts, gp), n_ions=len(partners) + 1,
        chemsys=np.array([k for *_, k in rows]),
    )  # fmt: skip


def chemsys_keys(data: IonData, splits: Sequence[str]) -> list[str]:
    """Per crystal of ``splits``: its host's chemical system without the working ion
    ("Co-O" for both CoO2 and Mg0.5CoO2), the group of leave-chemical-system-out CV."""
    from pymatgen.core import Composition

    keys = []
    for s in splits:
        for formula in data.formulas(s):
            elements = {el.symbol for el in Composition(formula).elements} - {data.ion}
            keys.append("-".join(sorted(elements)) or data.ion)
    return keys


def unseen_by_source(hosts: Sequence[str], source_train_hosts: set[str]) -> np.ndarray:
    """Mask of the crystals whose host the source backbones never trained on: the rows a CV
    may score without leaking the backbone's training fit into the figure."""
    return np.array([h not in source_train_hosts for h in hosts], dtype=bool)


def gp_fold(
    bb: CVBackbone,
    y: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    held_out: set[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One GP head per backbone of ``bb``, fitted on the fold's training rows (and, when
    ``bb.partners`` is given, the partners' crystals outside the fold's ``held_out`` groups),
    predicting rows ``te``: the ensemble mean and std in volts by the served model's rule
    (``ensemble_volts``: spread of the backbones' means plus their mean predictive variance)."""
    norm = Normalizer.fit(y[tr])
    desc = bb.desc
    d_tr, d_te = (None, None) if desc is None else (desc[tr], desc[te])
    means, variances = [], []
    with torch.no_grad():
        for b, f in enumerate(bb.feats):
            pooled = None if bb.partners is None else bb.partners.fold_rows(b, held_out or set())
            x, yy, dd, tasks = with_pooled_rows(f[tr], d_tr, norm.norm(y[tr]), pooled)
            head = fit_gp_head(x, yy, bb.gp, dd, tasks)
            mean, var = head_mean_var(head, f[te], d_te)
            means.append(mean.double())
            variances.append(var.double())
    mean, std = ensemble_volts(norm, means, variances)
    return mean.numpy(), std.numpy()


def group_folds(keys: Sequence[str], folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grouped k-fold (train rows, held-out rows) by group key (host or chemical system),
    deterministic; at most one fold per group."""
    n_folds = min(folds, len(set(keys)))
    idx = np.zeros(len(keys))
    return list(GroupKFold(n_splits=n_folds).split(idx, idx, groups=list(keys)))


class CVIon(Protocol):
    """The parts of an ion's inputs a CV reads (``training.data.ion_inputs.IonInputs``): its
    data, the graph cache, its pool partners and the hosts the source backbones trained on."""

    @property
    def data(self) -> IonData: ...
    @property
    def store(self) -> GraphStore | None: ...
    @property
    def partners(self) -> Sequence[IonData]: ...
    @property
    def source_train_hosts(self) -> frozenset[str]: ...


def choose_pooling(ion: CVIon, source: LoadedModel, gp: GPConfig, folds: int) -> dict[str, Any]:
    """Whether ``data.ion``'s GP head should pool its partners' training crystals.

    Why CV and not validation: an ion's validation split holds 11-43 crystals, so the two heads'
    validation MAEs differ by less than their noise; grouped CV over train+val scores ~10x as
    many crystals. The test split is never read. Partners contribute their training split only
    (what the served head would pool). The first source backbone only: one pooled fit of ~900
    rows costs ~4 s per candidate weight, and the choice is about the data, not the backbone.
    Only crystals on hosts the backbone never trained on are scored
    (``ion.source_train_hosts``). Pooling is kept only when its CV MAE is lower (a tie keeps the
    ion's own crystals).
    """
    data, store, partners = ion.data, ion.store, ion.partners
    assert store is not None, "the pooling CV reads graphs from the graph cache"
    hosts, y = rows_of(data, ("train", "val"))
    desc = host_descriptors(store, hosts, gp)
    alone = CVBackbone(pooled_by_backbone(source, store, hosts, 1), desc, None, gp)
    pool = load_partners(partners, store, gp, backbone_features(source, store, 1), ("train",))
    pooled = replace(alone, partners=pool)
    scored = unseen_by_source(hosts, set(ion.source_train_hosts))
    err = {"alone": np.zeros(len(y)), "pooled": np.zeros(len(y))}
    splits = group_folds(hosts, folds)
    for tr, te in splits:
        held_out = {hosts[i] for i in te}
        err["alone"][te] = np.abs(gp_fold(alone, y, tr, te)[0] - y[te])
        pred = gp_fold(pooled, y, tr, te, held_out)[0]
        err["pooled"][te] = np.abs(pred - y[te])
    report = _pool_report(err, scored, len(splits), partners)
    n = report["n_scored"]
    log.info("%s pooling CV (train+val, %d folds, %d of %d scored): alone %.3f V, pooled %.3f V "
             "-> %s", data.ion, len(splits), n, len(y), report["alone_mae"],
             report["pooled_mae"], "pool" if report["pool"] else "own crystals")  # fmt: skip
    return report


# ============================================================ backbone variant choice (issue 16)
VARIANTS = ("cgcnn", "chgnet", "average")


def mixture(
    mean_a: np.ndarray, std_a: np.ndarray, mean_b: np.ndarray, std_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the equal-weight mixture of two predictive distributions: what the
    ``average`` variant serves (the spread between the two adds to their own variances)."""
    mean = (mean_a + mean_b) / 2
    var = (std_a**2 + std_b**2) / 2 + ((mean_a - mean_b) / 2) ** 2
    return mean, np.sqrt(var)


@dataclass
class CVBackbone:
    """One backbone family's inputs to a CV: features of the ion's rows (one matrix per member),
    descriptors when its GP reads them, the partners' rows, and its GP settings."""

    feats: list[torch.Tensor]
    desc: torch.Tensor | None
    partners: Partners | None
    gp: GPConfig


@dataclass(frozen=True)
class CVFolds:
    """The rows of a CV over an ion's crystals: targets, host ids, the grouped folds (train
    rows, held-out rows) and the rows it scores."""

    y: np.ndarray
    hosts: list[str]
    splits: list[tuple[np.ndarray, np.ndarray]]
    scored: np.ndarray


def out_of_fold(bb: CVBackbone, folds: CVFolds, pooled: bool) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (mean, std) in volts of ``bb``'s GP, pooling the partners or not."""
    y = folds.y
    run = bb if pooled else replace(bb, partners=None)
    mean, std = np.zeros(len(y)), np.zeros(len(y))
    for tr, te in folds.splits:
        held_out = {folds.hosts[i] for i in te}
        mean[te], std[te] = gp_fold(run, y, tr, te, held_out)
    return mean, std


def _paired(err_a: np.ndarray, err_b: np.ndarray) -> dict[str, float]:
    d = err_a - err_b
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"diff": float(d.mean()), "se": se, "n": len(d)}


def _pool_report(err: dict[str, np.ndarray], scored: np.ndarray, folds: int,
                 partners: Sequence[IonData]) -> dict[str, Any]:  # fmt: skip
    """``choose_pooling``'s report from out-of-fold errors of the alone and pooled GP."""
    diff = (err["pooled"] - err["alone"])[scored]
    n = int(scored.sum())
    return {
        "folds": folds, "n": len(scored), "n_scored": n,
        "scored": "crystals on hosts the source backbones never trained on",
        "partners": [p.ion for p in partners],
        "alone_mae": float(err["alone"][scored].mean()),
        "pooled_mae": float(err["pooled"][scored].mean()),
        "pooled_minus_alone": float(diff.mean()),
        "pooled_minus_alone_se": float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "pool": bool(diff.mean() < 0),
        "rule": "lower grouped-CV MAE on train+val",
    }  # fmt: skip


def _backbone_oof(
    name: str, bb: CVBackbone, folds: CVFolds, partners: Sequence[IonData]
) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any] | None]:
    """The backbone's out-of-fold predictions, pooled when its own CV says so, and that
    pooling report (None without partners)."""
    y = folds.y
    alone = out_of_fold(bb, folds, pooled=False)
    if bb.partners is None:
        return alone, None
    pooled = out_of_fold(bb, folds, pooled=True)
    err = {"alone": np.abs(alone[0] - y), "pooled": np.abs(pooled[0] - y)}
    report = _pool_report(err, folds.scored, len(folds.splits), partners)
    log.info("%s pooling CV: alone %.3f V, pooled %.3f V", name, report["alone_mae"],
             report["pooled_mae"])  # fmt: skip
    return (pooled if report["pool"] else alone), report


def choose_variant(
    ion: CVIon,
    backbones: dict[str, CVBackbone],
    folds: int,
    candidates: Sequence[str] = VARIANTS,
) -> dict[str, Any]:
    """Which model an ion serves: the GP over the CGCNN backbone, over CHGNet features, or
    their average (``mixture``), by grouped CV over the ion's train+val crystals (test never
    read; ``ion``: its data, pool partners and the hosts the source backbones trained on).
    Each backbone first decides its own pooling by the same CV (``choose_pooling``'s
    rule). Scored: crystals on hosts the Li backbones never trained on (the same rows for
    every variant, so the CGCNN is not flattered by its training fit). Lowest CV MAE wins; ties
    keep the earlier of ``VARIANTS``. The std scale that makes the chosen variant's 90%
    interval cover 90% of these out-of-fold crystals is returned for the served artifact.
    """
    from training.train.uncertainty import fit_std_scale, interval_metrics

    data, partners = ion.data, ion.partners
    hosts, y = rows_of(data, ("train", "val"))
    scored = unseen_by_source(hosts, set(ion.source_train_hosts))
    splits = group_folds(hosts, folds)
    cv_folds = CVFolds(y, hosts, splits, scored)
    preds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pooling: dict[str, Any] = {}
    for name, bb in backbones.items():
        preds[name], pooling[name] = _backbone_oof(name, bb, cv_folds, partners)
    if {"cgcnn", "chgnet"} <= set(preds):
        preds["average"] = mixture(*preds["cgcnn"], *preds["chgnet"])
    err = {k: np.abs(m - y)[scored] for k, (m, _) in preds.items()}
    cv_mae = {k: float(e.mean()) for k, e in err.items()}
    choice = min((k for k in VARIANTS if k in cv_mae and k in candidates),
                 key=lambda k: cv_mae[k])  # fmt: skip
    mean, std = preds[choice]
    scale = fit_std_scale(y[scored], mean[scored], std[scored])
    report = {
        "folds": len(splits), "n": len(y), "n_scored": int(scored.sum()),
        "cv_mae": cv_mae, "candidates": list(candidates), "choice": choice, "pooling": pooling,
        "paired_vs_cgcnn": {k: _paired(err[k], err["cgcnn"]) for k in err if k != "cgcnn"},
        "rule": "lowest grouped-CV MAE on train+val (scored: hosts the Li backbones never saw)",
        "std_scale": scale, "std_scale_from": "out-of-fold predictions of the chosen variant",
        "oof_uncertainty": interval_metrics(y[scored], mean[scored], std[scored] * scale),
    }  # fmt: skip
    log.info("%s variant CV (%d of %d scored): %s -> %s", data.ion, report["n_scored"], len(y),
             ", ".join(f"{k} {v:.3f}" for k, v in cv_mae.items()), choice)  # fmt: skip
    return report
