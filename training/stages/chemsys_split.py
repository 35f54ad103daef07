"""The source ion's headline comparison on a split grouped by chemical system.

Why: the pipeline's split is grouped by host structure, so a test crystal's chemical system
(e.g. Co-O) is usually among the training crystals through another host or another lithiation
state, and both the CGCNN and the composition baselines are scored mostly on chemistry they have
seen. The target ions get leave-chemical-system-out CV (``training.stages.cv``); the source ion's
CGCNN cannot be cross-validated that way without retraining it per fold, so this stage retrains
one CGCNN on a split that keeps every chemical system in one part and scores it, once, beside the
composition baselines fitted on the same rows.

What runs, with what the pipeline uses elsewhere:

* the split: the source ion's cleaned rows grouped by ``gp_cv.chemsys_keys`` (the host's
  elements without the working ion), balanced to ``params.split`` fractions with its seed by the
  pipeline's own rule (``training.data.split.assign_groups``);
* the CGCNN: one member trained from scratch (``train_from_scratch``, as member 0 of the train
  stage's ensemble) with the tuned hyperparameters merged over ``model``/``train`` exactly as the
  train stage merges them, its epoch chosen on this split's validation rows, its own MLP head;
* the baselines: mean, SVR, KRR, random forest, gp_comp (``baselines.suite.run_baselines``),
  tuned by the baselines stage's inner grouped CV on train+val, here grouped by chemical system,
  fitted on train; one forest seed (the first), as there is one CGCNN member.

Nothing is chosen on the test rows: the CGCNN's epoch comes from validation, the baselines'
hyperparameters and "the best baseline" (lowest inner-CV MAE) from train+val.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.baselines.models import OWN_METHODS, BaselineConfig
from training.baselines.suite import BaselineInputs, BaselineResult, SplitRows, run_baselines
from training.chgnet_store import ChgnetFeatures, load_optional
from training.config import Params, SplitSettings, load_params
from training.data.ion_inputs import IonInputs
from training.data.records import Record, read_records
from training.data.split import SPLITS, assign_groups
from training.datasets import IonData
from training.gp_cv import chemsys_keys
from training.graphs.store import GraphStore
from training.train.scoring import model_predictor, score
from training.train.scratch import Trained, train_from_scratch
from training.train.settings import TrainSettings, gp_config
from voltage_model.composition import composition_features
from voltage_model.models.gp_head import GPConfig

log = logging.getLogger(__name__)
GROUPING = "chemical system of the host without the working ion (gp_cv.chemsys_keys)"
ALL = "all"  # the one part of the stage's ``IonInputs.data``: every row, split here


def ion_records(records_path: Path, ion: str) -> list[Record]:
    """The ion's records (every split of the file: the chemsys split makes its own)."""
    rows = [r for r in read_records(records_path) if r.working_ion == ion]
    if not rows:
        raise ValueError(f"no {ion} record in {records_path}")
    return rows


def row_chemsys(ion: str, rows: Sequence[Record]) -> list[str]:
    """Each row's chemical system, by the rule the leave-chemical-system-out CV groups on."""
    return chemsys_keys(IonData(ion, {ALL: list(rows)}), (ALL,))


def chemsys_split(ion: str, rows: Sequence[Record], split: SplitSettings) -> IonData:
    """``rows`` split into train/val/test with whole chemical systems in one part, each part
    in battery-id order.

    The pipeline's balancing rule (``assign_groups``) assigns groups named by ``charged_id``;
    handing it the rows with their chemical system in that field makes it balance chemical
    systems instead, with the same fractions and seed, deterministically.
    """
    rows = sorted(rows, key=lambda r: r.battery_id)  # the split must not depend on row order
    keys = row_chemsys(ion, rows)
    tagged = [replace(r, charged_id=k) for r, k in zip(rows, keys, strict=True)]
    part_of = assign_groups(tagged, split.fractions(), split.seed)
    parts = {s: [r for r, k in zip(rows, keys, strict=True) if part_of[k] == s] for s in SPLITS}
    return IonData(ion, parts)


def _framework(formula: str, ion: str) -> str:
    """The reduced formula without the working ion (LiCoO2 and CoO2 -> CoO2)."""
    from pymatgen.core import Composition

    comp = Composition(formula)
    rest = Composition({el: n for el, n in comp.items() if el.symbol != ion})
    return rest.reduced_formula if rest.num_atoms else ion


def leak_check(data: IonData) -> dict[str, Any]:
    """What the split must not share: chemical systems across parts, and the test rows' reduced
    formulas (as written, and without the working ion) among the training rows'."""
    from pymatgen.core import Composition

    keys = {s: set(chemsys_keys(data, (s,))) for s in SPLITS}
    shared = sorted((keys["train"] & keys["val"]) | (keys["train"] & keys["test"])
                    | (keys["val"] & keys["test"]))  # fmt: skip

    def formulas(split: str, framework: bool) -> set[str]:
        return {_framework(f, data.ion) if framework else Composition(f).reduced_formula
                for f in data.formulas(split)}  # fmt: skip

    reduced = sorted(formulas("test", False) & formulas("train", False))
    frameworks = sorted(formulas("test", True) & formulas("train", True))
    return {"chemsys_in_two_parts": shared, "test_reduced_formulas_in_train": reduced,
            "test_frameworks_in_train": frameworks,
            "disjoint": not (shared or reduced or frameworks)}  # fmt: skip


def train_cgcnn(data: IonData, store: GraphStore, settings: TrainSettings) -> Trained:
    """One CGCNN from scratch on the split's training rows, its epoch chosen on validation
    (the train stage's member 0: same seed, same hyperparameters)."""
    return train_from_scratch(data, store, settings.model, settings.train)


def fit_baselines(data: IonData, cfg: BaselineConfig) -> dict[str, BaselineResult]:
    """Every own-crystal baseline, tuned by inner CV on train+val grouped by chemical system,
    fitted on train, with the first forest seed only."""
    X, names = composition_features([f for s in SPLITS for f in data.formulas(s)])
    bounds = np.cumsum([0] + [len(data.parts[s]) for s in SPLITS])
    xs = {s: X[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    rows = {s: SplitRows(xs[s], data.targets(s), data.ids(s), chemsys_keys(data, (s,)))
            for s in SPLITS}  # fmt: skip
    inputs = BaselineInputs(rows["train"], rows["val"], rows["test"], feature_names=names)
    return run_baselines(inputs, replace(cfg, seeds=[cfg.first_seed]), names=OWN_METHODS)


def paired(y: np.ndarray, pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean per-crystal |error| of ``pred`` minus that of ``ref``, with its standard error
    (negative: ``pred`` is better)."""
    diff = np.abs(pred - y) - np.abs(ref - y)
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"diff": float(diff.mean()), "se": se, "n": len(diff)}


def _test_predictions(data: IonData, cgcnn: dict[str, float],
                      baselines: dict[str, BaselineResult]) -> dict[str, np.ndarray]:  # fmt: skip
    ids = data.ids("test")
    out = {"cgcnn": np.array([cgcnn[b] for b in ids])}
    out.update({n: np.array([r.predictions["test"][b] for b in ids]) for n, r in baselines.items()})
    return out


@dataclass(frozen=True)
class _Fitted:
    """What the stage fitted on one split: the CGCNN (and its per-split metrics), the baselines
    and every method's test predictions."""

    trained: Trained
    cgcnn: dict[str, dict[str, float]]
    baselines: dict[str, BaselineResult]
    preds: dict[str, np.ndarray]


def _report(
    data: IonData, plan: ChemsysPlan, fitted: _Fitted, check: dict[str, Any]
) -> dict[str, Any]:
    """Sizes, leak check, per-method metrics per split and the paired test differences."""
    split, settings, trained = plan.split, plan.train, fitted.trained
    cgcnn, baselines, preds = fitted.cgcnn, fitted.baselines, fitted.preds
    y = data.targets("test")
    cv = {n: r.cv_mae for n, r in baselines.items() if r.cv_mae is not None}
    best = min(cv, key=lambda n: (cv[n], n))
    history = trained.fit.history
    return {
        "ion": data.ion, "grouping": GROUPING,
        "fractions": split.fractions(), "seed": split.seed,
        "n": {s: len(data.parts[s]) for s in SPLITS},
        "n_chemsys": {s: len(set(chemsys_keys(data, (s,)))) for s in SPLITS},
        "leak_check": check,
        "methods": {"cgcnn": cgcnn, **{n: r.metrics for n, r in baselines.items()}},
        "cv_mae": {n: round(v, 5) for n, v in cv.items()},
        "best_baseline": best,
        "best_baseline_chosen_by": "lowest inner grouped-CV MAE on train+val",
        "cgcnn_minus_best_baseline": paired(y, preds["cgcnn"], preds[best]),
        "cgcnn_minus_baseline": {n: paired(y, preds["cgcnn"], preds[n]) for n in baselines},
        "cgcnn": {
            "members": 1, "head": "its own MLP head", "best_epoch": trained.fit.best_epoch,
            "epochs": settings.train.epochs, "train_seconds": round(trained.fit.train_seconds, 1),
            "train_loss_first_epoch": history[0]["train_loss"],
            "train_loss_last_epoch": history[-1]["train_loss"],
            "model": settings.model.to_dict(), "train": settings.train.to_dict(),
        },
        "baselines": {"forest_seeds": 1, "params": {n: r.params for n, r in baselines.items()}},
    }  # fmt: skip


def _write_predictions(path: Path, data: IonData, preds: dict[str, np.ndarray]) -> None:
    """One row per test crystal: id, chemical system, target and every method's prediction."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(preds)
    keys = chemsys_keys(data, ("test",))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["battery_id", "chemsys", "target", *names])
        for i, (bid, y) in enumerate(zip(data.ids("test"), data.targets("test"), strict=True)):
            w.writerow([bid, keys[i], f"{y:.4f}", *(f"{preds[n][i]:.4f}" for n in names)])


def chgnet_rows(
    data: IonData, store: GraphStore, chg: ChgnetFeatures, gp: GPConfig,
    cgcnn: dict[str, dict[str, float]],
) -> dict[str, dict[str, np.ndarray]]:  # fmt: skip
    """The CHGNet GP (fitted on this split's training rows, as ``ion_model`` fits it) and its
    average with the CGCNN (the mean of the two predictions: the CGCNN member here has an MLP
    head and no std), per split, as arrays in the split's order."""
    from training.chgnet_heads import fit_chgnet_head

    fit = fit_chgnet_head(data, store, chg, gp)
    out: dict[str, dict[str, np.ndarray]] = {"chgnet_gp": fit.means(), "average": {}}
    for s in SPLITS:
        mine = np.array([cgcnn[s][b] for b in data.ids(s)])
        out["average"][s] = (mine + out["chgnet_gp"][s]) / 2
    return out


def _split_metrics(data: IonData, preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    from training.train.metrics import regression_metrics

    keep = ("mae", "rmse", "r2")  # the CGCNN's and the baselines' keys
    return {s: {k: v for k, v in regression_metrics(data.targets(s), preds[s]).items()
                if k in keep} for s in SPLITS}  # fmt: skip


@dataclass(frozen=True)
class ChemsysPlan:
    """The stage's settings: ``split`` (fractions and seed), the CGCNN's (tuned parameters
    merged, the epoch cap applied), the baselines' and the CHGNet GP's (None: defaults)."""

    split: SplitSettings
    train: TrainSettings
    baselines: BaselineConfig
    chgnet_gp: GPConfig | None = None

    @classmethod
    def from_params(cls, p: Params, best: dict | None = None) -> ChemsysPlan:
        """As the train stage merges ``best`` over ``model``/``train`` (one member, its own
        head); ``chemsys_split.epochs`` caps the epochs."""
        settings = TrainSettings.from_params(p.model, p.train, None, best)
        if p.chemsys_split.epochs is not None:
            train = replace(settings.train, epochs=p.chemsys_split.epochs)
            settings = replace(settings, train=train)
        return cls(
            split=p.split,
            train=settings,
            baselines=BaselineConfig.from_settings(p.baselines, p.transfer.gp),
            chgnet_gp=gp_config(p.transfer.chgnet.gp),
        )


def run_chemsys_split(
    inputs: IonInputs, plan: ChemsysPlan, out: Path, predictions_out: Path
) -> dict[str, Any]:
    """Split the ion's rows (``inputs.data``'s one part, ``ALL``), train the CGCNN, fit the
    baselines (and, with ``inputs.chg``, the CHGNet GP and its average with the CGCNN), score
    all once on test, write the report and the test predictions. A split sharing a chemical
    system or a test formula with training is refused (it cannot happen by construction)."""
    ion, store, chg = inputs.ion, inputs.store, inputs.chg
    split, settings, baselines = plan.split, plan.train, plan.baselines
    data = chemsys_split(ion, inputs.data.parts[ALL], split)
    check = leak_check(data)
    if not check["disjoint"]:
        raise RuntimeError(f"chemical-system split leaks: {check}")
    log.info("%s chemsys split: %s crystals", ion, {s: len(data.parts[s]) for s in SPLITS})
    trained = train_cgcnn(data, store, settings)
    scored = score(model_predictor(trained.model, trained.normalizer), data, store)
    fitted = fit_baselines(data, baselines)
    preds = _test_predictions(data, scored.predictions["test"], fitted)
    cgcnn = {s: {k: v for k, v in m.items() if k != "n"} for s, m in scored.metrics.items()}
    report = _report(data, plan, _Fitted(trained, cgcnn, fitted, preds), check)
    if chg is not None:
        y, best = data.targets("test"), report["best_baseline"]
        for name, by_split in chgnet_rows(data, store, chg, plan.chgnet_gp or GPConfig(),
                                          scored.predictions).items():  # fmt: skip
            report["methods"][name] = _split_metrics(data, by_split)
            preds[name] = by_split["test"]
            report[f"{name}_minus_best_baseline"] = paired(y, preds[name], preds[best])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    _write_predictions(predictions_out, data, preds)
    return report


@dataclass(frozen=True)
class Options:
    ion: str
    records: Path
    graphs: Path
    out: Path
    predictions: Path
    best_params: Path | None = None
    chgnet_features: Path | None = None
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params).require_ion(opts.ion)
    best = json.loads(opts.best_params.read_text()) if opts.best_params else None
    rows = IonData(opts.ion, {ALL: ion_records(opts.records, opts.ion)})
    inputs = IonInputs(
        rows, GraphStore.load(opts.graphs), p.source_ion, chg=load_optional(opts.chgnet_features)
    )
    return run_chemsys_split(inputs, ChemsysPlan.from_params(p, best), opts.out, opts.predictions)
