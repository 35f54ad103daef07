"""Optuna tuning of the source-ion CGCNN: search space and budget from ``params.yaml``.

Storage is a URL (sqlite file by default, PostgreSQL to scale out): every worker process that
points at the same storage and study name joins the same study, and ``MaxTrialsCallback`` keeps
the *total* budget. Trials report validation MAE per epoch and are pruned by the configured
pruner. MLflow: one parent run per study, one nested run per trial (the parent's id lives in the
study's user attributes so workers on other machines nest under it too).

The budget is exact across workers: the storage numbers trials 0, 1, 2, ... atomically, and trials
0..n_trials-1 are the budget. A worker stops once the study's finished *and running* trials fill
it; a worker that still draws a number past it (it asked for a trial in the same instant another
finished, or joined late) does not train: the trial is recorded as failed with user attribute
``surplus`` and the worker stops. A worker killed mid-trial (SIGKILL, a lost machine) leaves its
trial RUNNING: it keeps its place in the budget; Ctrl-C marks it failed, which counts as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

from training.config import SearchSpace, TuneSettings
from training.datasets import IonData
from training.graphs.store import GraphStore
from training.train.scratch import train_from_scratch
from training.train.settings import TrainSettings

log = logging.getLogger(__name__)
PARENT_ATTR = "mlflow_parent_run_id"
SURPLUS_ATTR = "surplus"
DEFAULT_STORAGE = Path("work/optuna/optuna.db")


class BudgetSpent(RuntimeError):
    """Raised by a trial numbered past the budget: other workers hold every budget slot."""


def study_key(settings: TuneSettings, base: TrainSettings, splits: Path) -> str:
    """Study name + a digest of everything the trials depend on (space, base settings, split).

    Workers with the same configuration join one study; a changed configuration or split starts
    a fresh one instead of silently reusing finished trials of another setup.
    """
    payload = json.dumps(
        [
            settings.model_dump(exclude={"storage", "study_name"}),
            base.model.to_dict(),
            base.train.to_dict(),
            hashlib.sha256(Path(splits).read_bytes()).hexdigest(),
        ],
        sort_keys=True,
        default=str,
    )
    return f"{settings.study_name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"


def storage_url(settings: TuneSettings, root: Path = Path(".")) -> str:
    if settings.storage:
        return settings.storage
    path = (root / DEFAULT_STORAGE).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _pruner(settings: TuneSettings, max_epochs: int) -> Any:
    import optuna

    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=settings.n_startup_trials, n_warmup_steps=settings.n_warmup_steps
        )
    if settings.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=2, max_resource=max_epochs)
    return optuna.pruners.NopPruner()


def open_study(settings: TuneSettings, storage: str, attempts: int = 5) -> Any:
    """Create or join the study. Workers started together on a fresh database race to create
    its schema: the loser gets an IntegrityError (a duplicate catalogue row) or, on PostgreSQL,
    a ProgrammingError (DuplicateTable: the other created the table first); it retries and joins."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=settings.study_name,
                storage=storage,
                direction="minimize",
                sampler=optuna.samplers.TPESampler(seed=settings.sampler_seed),
                pruner=_pruner(settings, settings.epochs),
                load_if_exists=True,
            )
        except (IntegrityError, OperationalError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def suggest(trial: Any, space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Sampled overrides, grouped like params.yaml (``train``/``model`` sections)."""
    out: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for name, spec in space.model_dump().items():
        section = "model" if name in ("atom_fea_len", "h_fea_len", "n_conv", "n_h") else "train"
        if isinstance(spec, dict):
            val = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
        else:
            val = trial.suggest_categorical(name, list(spec))
        out[section][name] = val
    return out


def _create_parent(study: Any, ion: str) -> str:
    import mlflow

    run = mlflow.start_run(run_name=f"tune-{ion}-{study.study_name}")
    mlflow.set_tags({"stage": "tune", "ion": ion, "optuna_study": study.study_name})
    mlflow.end_run()
    study.set_user_attr(PARENT_ATTR, run.info.run_id)
    return run.info.run_id


def _parent_run(study: Any, ion: str, trial_number: int, wait_s: float = 120.0) -> str:
    """The study's one MLflow parent run, shared by every worker.

    Workers start together, so "create it if absent" races (both see none, both create). The
    storage's trial numbers are unique, so the worker that draws trial 0 creates it and the
    others wait for its id in the study's user attributes (a worker that never sees it, because
    trial 0's worker died first, creates one itself).
    """
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        return run_id
    if trial_number == 0:
        return _create_parent(study, ion)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            return run_id
    log.warning("no MLflow parent run for study %s after %.0f s: creating one", study.study_name,
                wait_s)  # fmt: skip
    return _create_parent(study, ion)


def objective_factory(
    data: IonData, store: GraphStore, base: TrainSettings, settings: TuneSettings
):
    import mlflow
    import optuna

    def objective(trial: optuna.Trial) -> float:
        if trial.number >= settings.n_trials:  # numbers are unique: the budget is 0..n-1
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise BudgetSpent(f"study budget of {settings.n_trials} trials is taken")
        overrides = suggest(trial, settings.space)
        cfg = TrainSettings.from_sections(
            base.model.to_dict(), {**base.train.to_dict(), "epochs": settings.epochs},
            vars(base.heads), overrides,
        )  # fmt: skip
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        parent = _parent_run(trial.study, data.ion, trial.number)
        tags = {"mlflow.parentRunId": parent, "stage": "tune-trial", "ion": data.ion}
        with mlflow.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags):
            mlflow.log_params({f"{s}.{k}": v for s, d in overrides.items() for k, v in d.items()})

            def report(epoch: int, m: dict[str, float]) -> None:
                mlflow.log_metrics(m, step=epoch)
                trial.report(m["val_mae"], epoch)
                if trial.should_prune():
                    mlflow.set_tag("optuna_state", "pruned")
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

            result = train_from_scratch(data, store, cfg.model, cfg.train, on_epoch=report).fit
            mlflow.set_tag("optuna_state", "complete")
            mlflow.log_metric("best_val_mae", result.best_val_mae)
        return result.best_val_mae

    return objective


def run_tune(
    data: IonData,
    store: GraphStore,
    base: TrainSettings,
    settings: TuneSettings,
    out: Path | None,
    n_trials: int | None = None,
) -> dict[str, Any]:
    """Run trials until the study holds ``settings.n_trials`` finished trials (all workers)."""
    import mlflow
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    study = open_study(settings, storage_url(settings))
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    # Running trials count too: a worker must not start one more while its peers run the last.
    budget = MaxTrialsCallback(settings.n_trials, states=(*finished, TrialState.RUNNING))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # ``optimize`` starts a trial before any callback can stop it, so a study that already holds
    # its budget (a rerun of the stage, or a late worker) would grow by one trial per call.
    remaining = settings.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        try:
            study.optimize(
                objective_factory(data, store, base, settings),
                n_trials=min(n_trials or settings.n_trials, remaining),
                callbacks=[budget],
                catch=(FloatingPointError,),
            )
        except BudgetSpent as exc:
            log.info("study %s: %s by other workers; stopping", study.study_name, exc)
    else:
        log.info("study %s already holds %d finished trials", study.study_name, settings.n_trials)
    best = best_params(study)
    # Workers share the parent run and each records the best it sees when it stops; a later
    # worker may see a better trial. MLflow params are immutable (a second worker's log_params
    # raised), so the best parameters are tags: the last worker to finish, which saw every
    # trial, has the final word.
    parent = study.user_attrs.get(PARENT_ATTR) or _create_parent(study, data.ion)
    with mlflow.start_run(run_id=parent):
        mlflow.log_metric("best_val_mae", best["value"])
        mlflow.set_tags(
            {f"best.{s}.{k}": str(v) for s in ("train", "model") for k, v in best[s].items()}
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(best, indent=2) + "\n")
    return best


def best_params(study: Any) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    if not done:
        raise RuntimeError(f"study {study.study_name} has no completed trial")
    best = study.best_trial
    groups: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for k, v in best.params.items():
        groups["model" if k in ("atom_fea_len", "h_fea_len", "n_conv", "n_h") else "train"][k] = v
    states = [t.state.name.lower() for t in trials]
    return {
        **groups,
        "value": best.value,
        "trial": best.number,
        "n_trials": len(trials),
        "states": {s: states.count(s) for s in sorted(set(states))},
    }
