"""Leak-free grouped cross-validation of GP transfer against tuned baselines, per ion.

Why: the per-ion test splits hold 11-43 crystals, so one test MAE carries a standard error of
0.04-0.15 V, too coarse to say whether transfer learning beats a baseline. Cross-validation over
all of an ion's crystals scores many more of them and gives paired per-crystal differences,
whose standard error is much smaller than either MAE's. This is the protocol's primary evidence
(docs/protocol.md); nothing in the pipeline decides anything from it.

Leak-free: the source backbones were trained on the source ion's training split; a crystal whose
host is among those is fitted by the backbone far better than an unseen one (Li train 0.12 V
against 0.33 V on test), so only crystals on unseen hosts are scored (``n_scored``). Folds still
fit on every row they may use, as the served head does.

Two groupings: ``host`` (folds hold out whole host structures, like the split) and ``chemsys``
(folds hold out whole chemical systems of the host without the working ion: no reduced formula of
a held-out crystal is among the fold's training rows for that ion). The second is the
out-of-domain test (does the GP's std grow where its errors grow?) and the protocol's secondary
evidence: it runs the served GP variant (``ion_model``'s choice) and the best baseline (the
baselines stage's inner-CV choice) only, since every method under both groupings would make
the stage several times slower.

What is compared, with the settings the pipeline serves: the GP head (``transfer.gp``) on the
frozen source backbones' pooled vectors (the first ``cv.backbones`` of them) and the composition
descriptors, weights chosen by marginal likelihood within each fold, pooled with the partner
ions (``transfer_gp``) and on the ion's own crystals (``transfer_gp_alone``), the same GP on the
pooled vectors alone
(``transfer_gp_backbone_only``: no composition in the head); and every baseline of the baselines
stage, its hyperparameters tuned by inner grouped CV inside each outer fold (nested), pooled
variants given the partners' crystals outside the fold's held-out groups.
Uncertainty: the GP std as served (no rescaling), and rescaled by a factor fitted on the other
folds (cross-fitted), scored by coverage at 50/80/90/95%, NLL and CRPS.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.baselines.models import BASELINE_METHODS, OWN_METHODS, BaselineConfig
from training.baselines.tuning import PartnerRows, TuningRows, fit_tuned, one_thread
from training.chgnet_store import ChgnetFeatures
from training.config import CvSettings, Params, load_params
from training.data.ion_inputs import IonFiles, IonInputs
from training.data.split import SPLITS
from training.datasets import IonData
from training.gp_cv import (
    CVBackbone,
    Partners,
    backbone_features,
    chemsys_keys,
    gp_fold,
    group_folds,
    host_descriptors,
    load_partners,
    mixture,
    pooled_by_backbone,
    rows_of,
    unseen_by_source,
)
from training.graphs.store import GraphStore
from training.train.settings import gp_config
from training.train.uncertainty import (
    coverage_band,
    cross_fitted_scale,
    interval_metrics,
    reliability_curve,
)
from voltage_model.artifact import LoadedModel
from voltage_model.composition import composition_features, featurize_cached
from voltage_model.models.gp_fit import parallel_fits
from voltage_model.models.gp_head import GPConfig

log = logging.getLogger(__name__)
GROUPINGS = ("host", "chemsys")
INNER_FOLDS = 3  # nested tuning inside each outer fold: 3 inner folds keep the stage in minutes


def cv_methods(pooled: bool) -> tuple[str, ...]:
    """The baselines cross-validated beside the GP: with partners, their pooled variants too."""
    return BASELINE_METHODS if pooled else OWN_METHODS


@dataclass
class IonRows:
    """Everything a fold needs about the ion's crystals (and its partners'), computed once."""

    ids: list[str]
    hosts: list[str]
    y: np.ndarray
    x: np.ndarray  # composition features (baselines)
    feats: list[Any]  # pooled vectors per source backbone
    desc: Any  # GP descriptors or None
    scored: np.ndarray
    chemsys: list[str]
    partners: Partners | None
    partner_rows: PartnerRows | None
    partner_chemsys: np.ndarray | None
    chgnet: CVBackbone | None = None  # CHGNet features of the rows and partners, its GP


@dataclass(frozen=True)
class CvPlan:
    """What the CV runs: the baselines as tuned, the GP heads' settings (``transfer.gp``, and
    ``transfer.chgnet.gp`` for the CHGNet head; None: ``gp``), ``cv``, and what the reports say
    the ion serves: ``served`` (served column, its CGCNN GP column, whether the CHGNet head
    pools: ``protocol.served_cv_columns``) and the baselines stage's ``best_baseline``."""

    baselines: BaselineConfig
    gp: GPConfig
    cv: CvSettings = field(default_factory=CvSettings)
    chgnet_gp: GPConfig | None = None
    served: tuple[str, str, bool] = ("transfer_gp", "transfer_gp", False)
    best_baseline: str = "krr"

    @classmethod
    def from_params(
        cls, p: Params, ion_metrics: Path | None = None, baseline_metrics: Path | None = None
    ) -> CvPlan:
        served, best = served_and_best(ion_metrics, baseline_metrics)
        return cls(
            baselines=BaselineConfig.from_settings(p.baselines, p.transfer.gp),
            gp=gp_config(p.transfer.gp),
            cv=p.cv,
            chgnet_gp=gp_config(p.transfer.chgnet.gp),
            served=served,
            best_baseline=best,
        )


@dataclass(frozen=True)
class CvPaths:
    """The composition feature cache (read and filled) and where the stage writes."""

    features_cache: Path
    out: Path
    rows: Path | None = None
    plot: Path | None = None


def load_rows(
    inputs: IonInputs, source: LoadedModel, plan: CvPlan, features_cache: Path
) -> IonRows:
    """The ion's crystals of every split with their features (pooled vectors of the first
    ``plan.cv.backbones`` source backbones; None: all; CHGNet features when ``inputs.chg`` is
    given), and its partners' crystals."""
    data, store, partners, chg = inputs.data, inputs.store, inputs.partners, inputs.chg
    gp, backbones = plan.gp, plan.cv.backbones
    hosts, y = rows_of(data, SPLITS)
    x, _ = featurize_cached([f for s in SPLITS for f in data.formulas(s)], features_cache)
    pool = load_partners(partners, store, gp, backbone_features(source, store, backbones), SPLITS)
    partner_rows = None
    if pool is not None:
        px, _ = composition_features([f for p in partners for s in SPLITS for f in p.formulas(s)])
        partner_rows = PartnerRows(X=px, y=pool.y, ion_index=pool.ion_index,
                                   n_ions=pool.n_ions, hosts=pool.hosts)  # fmt: skip
    return IonRows(
        ids=[b for s in SPLITS for b in data.ids(s)], hosts=hosts, y=y, x=x,
        feats=pooled_by_backbone(source, store, hosts, backbones),
        desc=host_descriptors(store, hosts, gp),
        scored=unseen_by_source(hosts, set(inputs.source_train_hosts)),
        chemsys=chemsys_keys(data, SPLITS), partners=pool, partner_rows=partner_rows,
        partner_chemsys=None if pool is None else pool.chemsys,
        chgnet=None if chg is None else _chgnet_rows(chg, plan.chgnet_gp or gp, store, hosts,
                                                     partners),
    )  # fmt: skip


def _chgnet_rows(
    chg: ChgnetFeatures, gp: GPConfig, store: GraphStore, hosts: list[str],
    partners: Sequence[IonData],
) -> CVBackbone:  # fmt: skip
    """CHGNet features of the ion's crystals and of its partners' (every split: the folds drop
    held-out groups), with the CHGNet GP's settings."""

    def feats(h: list[str]) -> list[Any]:
        return [torch.from_numpy(chg.rows(h))]

    pool = load_partners(partners, store, gp, feats, SPLITS)
    return CVBackbone(feats(hosts), host_descriptors(store, hosts, gp), pool, gp)


def _partners_for(rows: IonRows, grouping: str) -> tuple[Partners | None, PartnerRows | None]:
    """Partners keyed by the grouping's group (host, or chemical system)."""
    if rows.partners is None or rows.partner_rows is None:
        return None, None
    if grouping == "host":
        return replace(rows.partners, keys=None), rows.partner_rows
    keys = rows.partner_chemsys
    return (replace(rows.partners, keys=keys),
            replace(rows.partner_rows, hosts=np.asarray(keys)))  # fmt: skip


def _chgnet_partners(rows: IonRows, grouping: str) -> Partners | None:
    """The CHGNet partner rows keyed like ``_partners_for`` keys the CGCNN ones."""
    if rows.chgnet is None or rows.chgnet.partners is None:
        return None
    keys = None if grouping == "host" else rows.partner_chemsys
    return replace(rows.chgnet.partners, keys=keys)


def _gp_runs(
    rows: IonRows, grouping: str, gp: GPConfig, pool: Partners | None, chgnet_pool: bool
) -> dict[str, CVBackbone]:
    """Every GP method of the CV: (features, descriptors, partners, settings). ``chgnet_gp``
    pools as the served CHGNet head does (``chgnet_pool``); ``chgnet_gp_alone`` never pools."""
    backbone_only = replace(gp, descriptor_weights=(0.0,))
    desc = rows.desc if gp.uses_descriptors else None
    runs = {
        "transfer_gp": CVBackbone(rows.feats, desc, pool, gp),
        "transfer_gp_alone": CVBackbone(rows.feats, desc, None, gp),
        "transfer_gp_backbone_only": CVBackbone(rows.feats, None, None, backbone_only),
    }
    if rows.chgnet is not None:
        c = rows.chgnet
        cpool = _chgnet_partners(rows, grouping)
        runs["chgnet_gp"] = replace(c, partners=cpool if chgnet_pool else None)
        runs["chgnet_gp_alone"] = replace(c, partners=None)
    return runs


def run_grouping(
    rows: IonRows,
    grouping: str,
    plan: CvPlan,
    methods: tuple[Sequence[str], Sequence[str]],
    average_of: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Out-of-fold predictions (and GP stds) of ``methods`` (GP methods, baselines) under one
    grouping, ``plan.cv.folds`` folds; ``average_of``: the (CGCNN, CHGNet) GP columns whose
    mixture is the ``average`` method.

    Every (fold, method) pair is an independent fit, so they run side by side on the usable
    cores (``parallel_fits``), each on one thread; each result equals a sequential run's
    (tests/training/test_transfer.py). The fits are small (a few hundred to ~900 rows) and much
    of their time is Python or one-thread LAPACK: cv@Mg took 147 s one fit at a time and 124 s
    side by side on 2 cores (bench/baseline_search.py times the inner searches alone)."""
    gp_methods, baseline_methods = methods
    gp, baselines, chgnet_pool = plan.gp, _cv_baselines(plan.baselines), plan.served[2]
    keys = rows.hosts if grouping == "host" else rows.chemsys
    pool, prows = _partners_for(rows, grouping)
    n = len(rows.y)
    names = [*gp_methods, *baseline_methods]
    pred = {m: np.zeros(n) for m in names}
    std = {m: np.zeros(n) for m in names}
    fold_of = np.zeros(n, dtype=int)
    gp_runs = _gp_runs(rows, grouping, gp, pool, chgnet_pool)
    splits = group_folds(keys, plan.cv.folds)
    held_out = [{keys[i] for i in te} for _, te in splits]
    fold_partners = [None if prows is None else prows.without_hosts(h) for h in held_out]
    for k, (_, te) in enumerate(splits):
        fold_of[te] = k

    def fold_method(task: tuple[int, str]) -> tuple[np.ndarray, np.ndarray | None]:
        k, m = task
        tr, te = splits[k]
        if m in gp_methods:
            return gp_fold(gp_runs[m], rows.y, tr, te, held_out[k])
        pool_m = fold_partners[k] if m.endswith("_pooled") else None
        inner = TuningRows(rows.x[tr], rows.y[tr], [keys[i] for i in tr], partners=pool_m)
        fitted = fit_tuned(m, inner, baselines, folds=INNER_FOLDS)
        return fitted.predict(rows.x[te]), fitted.predict_std(rows.x[te])

    tasks = [(k, m) for k in range(len(splits)) for m in names]
    with one_thread():  # torch/BLAS at one thread before the pool: the tasks' own limits nest
        results = parallel_fits(fold_method, tasks)
    for (k, m), (p, s) in zip(tasks, results, strict=True):
        te = splits[k][1]
        pred[m][te] = p
        if s is not None:
            std[m][te] = s
    log.info("%s CV: %d folds x %d methods done", grouping, len(splits), len(names))
    if average_of is not None:
        a, b = average_of
        pred["average"], std["average"] = mixture(pred[a], std[a], pred[b], std[b])
        names.append("average")
    has_std = [m for m in names if std[m].any()]
    return {"pred": pred, "std": {m: std[m] for m in has_std}, "fold": fold_of,
            "folds": len(splits)}  # fmt: skip


def _se(x: np.ndarray) -> float:
    """Standard error of the mean (NaN for fewer than two values)."""
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def summarise(
    y: np.ndarray, scored: np.ndarray, out: dict[str, Any], refs: Sequence[str]
) -> dict[str, Any]:
    """On the scored crystals: MAE +- SE per method, paired differences of each GP method in
    ``refs`` to every method (``<ref>_minus_this``), and uncertainty scores of the GP methods."""
    n = int(scored.sum())
    if n == 0:
        raise ValueError("no crystal to score: every host was in the source's training split")
    err = {m: np.abs(p - y)[scored] for m, p in out["pred"].items()}
    methods: dict[str, Any] = {}
    for name, e in err.items():
        row = {"mae": float(e.mean()), "se": _se(e)}
        for ref in refs:
            diff = err[ref] - e
            row[f"{ref}_minus_this"] = float(diff.mean())
            row[f"{ref}_minus_this_se"] = _se(diff)
        methods[name] = row
    unc = {}
    for name, s in out["std"].items():
        m = out["pred"][name]
        crossfit = cross_fitted_scale(y, m, s, out["fold"], scored)
        unc[name] = {
            "as_served": interval_metrics(y[scored], m[scored], s[scored]),
            "cross_fitted": interval_metrics(y[scored], m[scored], crossfit[scored]),
        }
    return {"folds": out["folds"], "n": len(y), "n_scored": n, "methods": methods,
            "uncertainty": unc, "coverage_90_band": list(coverage_band(n))}  # fmt: skip


def cross_validate(
    inputs: IonInputs, source: LoadedModel, plan: CvPlan, features_cache: Path
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], IonRows]:
    """Both groupings: (report, out-of-fold results per grouping, rows). The chemsys grouping
    runs what ``plan.served`` names and ``plan.best_baseline`` only; ``inputs.chg`` (CHGNet
    features) adds the CHGNet GP and its average with the CGCNN GP."""
    column, cgcnn_col, chgnet_pool = plan.served
    partners, best_baseline = inputs.partners, plan.best_baseline
    rows = load_rows(inputs, source, plan, features_cache)
    gp_methods = ["transfer_gp", "transfer_gp_backbone_only"]
    if partners:
        gp_methods.insert(1, "transfer_gp_alone")
    average_of = None
    if rows.chgnet is not None:
        gp_methods += ["chgnet_gp", *(["chgnet_gp_alone"] if partners and chgnet_pool else [])]
        average_of = (cgcnn_col, "chgnet_gp")
    served_parts = [cgcnn_col, "chgnet_gp"] if column == "average" else [column]
    methods_of = {"host": (gp_methods, list(cv_methods(bool(partners)))),
                  "chemsys": (served_parts, [best_baseline])}  # fmt: skip
    report: dict[str, Any] = {"groupings": {}, "served": column, "best_baseline": best_baseline,
                              "backbones": len(rows.feats)}  # fmt: skip
    results = {}
    for grouping in GROUPINGS:
        gps, bases = methods_of[grouping]
        avg = average_of if average_of and set(average_of) <= set(gps) else None
        res = run_grouping(rows, grouping, plan, (gps, bases), avg)
        results[grouping] = res
        refs = [m for m in ("transfer_gp", "transfer_gp_alone", column) if m in res["pred"]]
        report["groupings"][grouping] = summarise(rows.y, rows.scored, res,
                                                  list(dict.fromkeys(refs)))  # fmt: skip
    return report, results, rows


def _cv_baselines(cfg: BaselineConfig) -> BaselineConfig:
    """The baselines as the stage tunes them, with one forest size (``cv_rf_trees``) for search
    and fit: the nested CV refits every method 10 times per ion, and forests dominate its cost."""
    trees = cfg.cv_rf_trees or cfg.rf.n_estimators
    return replace(cfg, rf=replace(cfg.rf, n_estimators=trees))


def write_rows(path: Path, rows: IonRows, results: dict[str, dict[str, Any]]) -> None:
    """Per crystal and grouping: fold, scored, target, every method's prediction and GP stds
    (the primary comparison's paired tests read these)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(m for r in results.values() for m in r["pred"]))
    std_names = sorted({m for r in results.values() for m in r["std"]})
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "grouping", "fold", "scored", "target", *names,
                    *(f"{m}_std" for m in std_names)])  # fmt: skip
        for grouping, res in results.items():
            for i, bid in enumerate(rows.ids):
                w.writerow([bid, grouping, int(res["fold"][i]), int(rows.scored[i]),
                            f"{rows.y[i]:.4f}",
                            *(f"{res['pred'][m][i]:.4f}" if m in res["pred"] else ""
                              for m in names),
                            *(f"{res['std'][m][i]:.4f}" if m in res["std"] else ""
                              for m in std_names)])  # fmt: skip


def reliability_plot(path: Path, ion: str, rows: IonRows, results: dict[str, Any]) -> None:
    """Observed vs nominal coverage of every GP method, as served, per grouping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (grouping, res) in zip(axes[0], results.items(), strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
        for name, s in res["std"].items():
            m = res["pred"][name]
            nominal, observed = reliability_curve(rows.y[rows.scored], m[rows.scored],
                                                  s[rows.scored])  # fmt: skip
            ax.plot(nominal, observed, marker="o", ms=3, label=name)
        ax.set(title=f"{ion}: {grouping}-grouped CV (n={int(rows.scored.sum())})",
               xlabel="nominal coverage of central interval", ylabel="observed coverage",
               xlim=(0, 1), ylim=(0, 1))  # fmt: skip
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _not_applicable_outputs(ion: str, rows_out: Path | None, plot_out: Path | None) -> None:
    """The source ion's stage outputs: a header-only rows file and a plot that says why (every
    ion's stage declares the same outputs)."""
    if rows_out is not None:
        rows_out.parent.mkdir(parents=True, exist_ok=True)
        rows_out.write_text("battery_id,grouping,fold,scored,target\n")
    if plot_out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"{ion}: no CV (the source backbones trained on {ion}'s crystals)",
                ha="center", va="center")  # fmt: skip
        plot_out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_out, dpi=100)
        plt.close(fig)


def run_cv_stage(
    inputs: IonInputs, source: LoadedModel | None, plan: CvPlan, paths: CvPaths
) -> dict[str, Any]:
    """The ion's CV report (the source ion's: why there is none), written with its rows and
    reliability diagram where ``paths`` asks for them."""
    ion = inputs.ion
    if inputs.is_source:
        report: dict[str, Any] = {
            "not_applicable": "the source backbone was trained on this ion's targets"
        }
        _not_applicable_outputs(ion, paths.rows, paths.plot)
    else:
        assert source is not None, "a transferred ion's CV needs the source model"
        report, results, rows = cross_validate(inputs, source, plan, paths.features_cache)
        report["pool_ions"] = [p.ion for p in inputs.partners]
        report["scored"] = "crystals on hosts the source backbones never trained on"
        if paths.rows is not None:
            write_rows(paths.rows, rows, results)
        if paths.plot is not None:
            reliability_plot(paths.plot, ion, rows, results)
    report = {"ion": ion, "source_ion": inputs.source_ion, **report}
    paths.out.parent.mkdir(parents=True, exist_ok=True)
    paths.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    splits: Path
    graphs: Path
    source_checkpoint: Path
    features_cache: Path
    out: Path
    rows_out: Path | None = None
    plot: Path | None = None
    ion_metrics: Path | None = None
    baseline_metrics: Path | None = None
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def served_and_best(
    ion_metrics: Path | None, baseline_metrics: Path | None
) -> tuple[tuple[str, str, bool], str]:
    """The CV columns of what the ion_model stage serves (served, CGCNN GP, whether the CHGNet
    head pools) and the baselines stage's best baseline by inner CV (defaults without the
    reports: the pooled CGCNN GP, KRR)."""
    from training.protocol import best_baseline, served_cv_columns

    served, best = ("transfer_gp", "transfer_gp", False), "krr"
    if ion_metrics is not None and ion_metrics.is_file():
        served = served_cv_columns(json.loads(ion_metrics.read_text()))
    if baseline_metrics is not None and baseline_metrics.is_file():
        best = best_baseline(json.loads(baseline_metrics.read_text()))[0]
    return served, best


def run(opts: Options) -> dict[str, Any]:
    from voltage_model.artifact import load_checkpoint

    p = load_params(opts.params).require_ion(opts.ion)
    source = None if opts.ion == p.source_ion else load_checkpoint(opts.source_checkpoint)
    files = IonFiles(opts.records, opts.splits, opts.graphs, opts.chgnet_features)
    return run_cv_stage(
        IonInputs.load(p, opts.ion, files),
        source,
        CvPlan.from_params(p, opts.ion_metrics, opts.baseline_metrics),
        CvPaths(opts.features_cache, opts.out, opts.rows_out, opts.plot),
    )
