"""Command line: one subcommand per pipeline stage (``dvc.yaml`` calls these).

Errors the user can fix (missing data, bad parameters, bad input) exit with status 2 and a message
naming the problem; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from training.config import Params, load_params
from training.data.ingest import DataSourceError

app = typer.Typer(help="Electrode voltage platform: pipeline stages.", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]


class UsageError(Exception):
    """A problem the user can fix: printed without a traceback, exit status 2."""


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (DataSourceError, UsageError, FileNotFoundError, ValidationError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
@_user_errors
def ingest(
    out: Annotated[Path, typer.Option(help="records file (jsonl.gz)")],
    reports: Annotated[Path, typer.Option(help="folder of per-ion ingest reports")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Read the MP source (snapshot, or MP API with MP_API_KEY), validate, write records."""
    from training.data.stages import run_ingest

    report = run_ingest(load_params(params), out, reports)
    for ion in report.ions:
        typer.echo(f"{ion}: {report.valid[ion]} valid, {len(report.bad[ion])} reported invalid")


@app.command()
@_user_errors
def clean(
    records: Annotated[Path, typer.Option(help="ingested records")],
    out: Annotated[Path, typer.Option(help="cleaned records")],
    report: Annotated[Path, typer.Option(help="cleaning report (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Apply the per-ion k-sigma outlier rule."""
    from training.data.stages import run_clean

    for ion, st in run_clean(load_params(params), records, out, report).items():
        typer.echo(f"{ion}: kept {st['kept']}, removed {st['removed']} (k={st['k']})")


@app.command()
@_user_errors
def split(
    records: Annotated[Path, typer.Option(help="cleaned records")],
    out: Annotated[Path, typer.Option(help="splits file (JSON id lists)")],
    report: Annotated[Path, typer.Option(help="split sizes (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Seeded per-ion split, grouped by charged_id across ions."""
    from training.data.stages import run_split

    for ion, sizes in run_split(load_params(params), records, out, report).items():
        typer.echo(f"{ion}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


@app.command()
@_user_errors
def graphs(
    records: Annotated[Path, typer.Option(help="cleaned records")],
    out: Annotated[Path, typer.Option(help="graph cache (.pt)")],
    report: Annotated[Path, typer.Option(help="graph report (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Build the crystal graph of every distinct charged structure once."""
    from training.graphs.stage import run_graphs

    p = load_params(params)
    res = run_graphs(p.graph, records, out, report, workers=p.data.workers)
    typer.echo(f"{res['structures']} graphs in {res['seconds']} s, {len(res['skipped'])} skipped")


@app.command()
@_user_errors
def baselines(
    ion: Annotated[str, typer.Option(help="working ion")],
    records: Annotated[Path, typer.Option(help="cleaned records")],
    splits: Annotated[Path, typer.Option(help="splits file")],
    features_cache: Annotated[Path, typer.Option(help="composition feature cache (.npz)")],
    metrics: Annotated[Path, typer.Option(help="metrics JSON out")],
    predictions: Annotated[Path, typer.Option(help="test predictions CSV out")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Mean, SVR, KRR and random forest on composition features, same splits as the CGCNN."""
    from training.baselines.models import BaselineConfig
    from training.baselines.stage import run_baseline_stage
    from training.datasets import load_ion_data
    from training.tracking import MlflowSettings

    p = _require_ion(load_params(params), ion)
    data = load_ion_data(records, splits, ion)
    res = run_baseline_stage(
        data,
        BaselineConfig.from_dict(p.section("baselines")),
        MlflowSettings.model_validate(p.section("mlflow")),
        features_cache,
        metrics,
        predictions,
    )
    for name, per_split in res.items():
        typer.echo(f"{ion} {name}: test MAE {per_split['test']['mae']:.3f} V")


@app.command()
@_user_errors
def train(
    ion: Annotated[str, typer.Option(help="working ion (the source ion)")],
    records: Annotated[Path, typer.Option(help="cleaned records")],
    splits: Annotated[Path, typer.Option(help="splits file")],
    graphs: Annotated[Path, typer.Option(help="graph cache")],
    checkpoint: Annotated[Path, typer.Option(help="checkpoint out (.pt)")],
    metrics: Annotated[Path, typer.Option(help="metrics JSON out")],
    plot: Annotated[Path, typer.Option(help="test parity plot PNG out")],
    best_params: Annotated[
        Path | None, typer.Option(help="tuned parameters (JSON) overriding params.yaml")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="override train.epochs (smoke runs)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Train the CGCNN from scratch on one ion, with a head ensemble for uncertainty."""
    import json

    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.tracking import MlflowSettings
    from training.train.stage import TrainSettings, run_train_stage

    p = _require_ion(load_params(params), ion)
    best = json.loads(best_params.read_text()) if best_params else None
    settings = TrainSettings.from_sections(
        p.section("model"), p.section("train"), p.section("ensemble"), best
    )
    if epochs is not None:
        from dataclasses import replace

        settings = replace(settings, train=replace(settings.train, epochs=epochs))
    report = run_train_stage(
        load_ion_data(records, splits, ion),
        GraphStore.load(graphs),
        settings,
        MlflowSettings.model_validate(p.section("mlflow")),
        checkpoint,
        metrics,
        plot,
    )
    ens, single = report["ensemble"]["test"], report["single_model"]["test"]
    typer.echo(
        f"{ion}: test MAE {ens['mae']:.3f} V (ensemble), {single['mae']:.3f} V (single model); "
        f"coverage90 {report['uncertainty']['coverage_90']:.2f}"
    )


@app.command()
@_user_errors
def tune(
    ion: Annotated[str, typer.Option(help="working ion")],
    records: Annotated[Path, typer.Option(help="cleaned records")],
    splits: Annotated[Path, typer.Option(help="splits file")],
    graphs: Annotated[Path, typer.Option(help="graph cache")],
    out: Annotated[Path | None, typer.Option(help="best parameters JSON out")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (overrides tune.storage)")
    ] = None,
    n_trials: Annotated[
        int | None, typer.Option(help="trials this worker may start (total set by params)")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Optuna study on the ion's validation MAE; run it on several machines to scale out."""
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.tracking import MlflowSettings, setup_mlflow
    from training.train.stage import TrainSettings
    from training.tune import TuneSettings, run_tune, study_key

    p = _require_ion(load_params(params), ion)
    settings = TuneSettings.model_validate(p.section("tune"))
    if storage:
        settings = settings.model_copy(update={"storage": storage})
    base = TrainSettings.from_sections(
        p.section("model"), p.section("train"), p.section("ensemble")
    )
    settings = settings.model_copy(update={"study_name": study_key(settings, base, splits)})
    setup_mlflow(MlflowSettings.model_validate(p.section("mlflow")))
    best = run_tune(
        load_ion_data(records, splits, ion), GraphStore.load(graphs), base, settings, out, n_trials
    )
    typer.echo(
        f"{ion}: best val MAE {best['value']:.3f} V (trial {best['trial']}), {best['states']}"
    )


def _require_ion(p: Params, ion: str) -> Params:
    if ion not in p.ions:
        raise UsageError(f"ion {ion!r} is not enabled in params.yaml (ions: {p.ion_names})")
    return p


def main() -> None:
    app()


if __name__ == "__main__":
    main()
