"""Command line: one subcommand per pipeline stage (``dvc.yaml`` calls these).

Errors the user can fix (missing data, bad parameters, bad input) exit with status 2 and a message
naming the problem; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError

from training.config import Params, UsageError, load_params
from training.data.ingest import DataSourceError

if TYPE_CHECKING:
    pass

app = typer.Typer(help="Electrode voltage platform: pipeline stages.", no_args_is_help=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read")]
# Options several stages share, declared once so their help reads the same everywhere.
IonOpt = Annotated[str, typer.Option(help="working ion")]
RecordsOpt = Annotated[Path, typer.Option(help="cleaned records")]
SplitsOpt = Annotated[Path, typer.Option(help="splits file")]
GraphsOpt = Annotated[Path, typer.Option(help="graph cache")]
SourceCheckpointOpt = Annotated[Path, typer.Option(help="the source ion's checkpoint")]
MetricsDirOpt = Annotated[Path, typer.Option(help="folder with ion_<ion>.json reports")]
ChgnetFeaturesOpt = Annotated[
    Path | None, typer.Option(help="CHGNet features (.npz, stage chgnet_features); none: no CHGNet")
]
RecordsAllOpt = Annotated[
    Path | None, typer.Option(help="ingested records before cleaning (with --splits-all)")
]
SplitsAllOpt = Annotated[
    Path | None, typer.Option(help="split of every ingested row: also score uncleaned test")
]


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
    # Idle OpenMP threads sleep instead of spinning, unless the user chose: two spinning torch
    # processes on a shared CPU slow each other 10-25x. Before torch is imported (just below).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from voltage_model.numerics import flush_subnormals

    flush_subnormals()  # before torch creates its thread pool (voltage_model/numerics.py)


@app.command()
@_user_errors
def ingest(
    out: Annotated[Path, typer.Option(help="records file (jsonl.gz)")],
    reports: Annotated[Path, typer.Option(help="folder of per-ion ingest reports")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Read the MP source (snapshot, or MP API with MP_API_KEY), validate, write records."""
    from training.stages import ingest as stage

    report = stage.run(stage.Options(out, reports, params))
    for ion in report.ions:
        typer.echo(f"{ion}: {report.valid[ion]} valid, {len(report.bad[ion])} reported invalid")


@app.command()
@_user_errors
def clean(
    records: Annotated[Path, typer.Option(help="ingested records")],
    splits_all: Annotated[Path, typer.Option(help="split of every ingested row")],
    out: Annotated[Path, typer.Option(help="cleaned records")],
    splits_out: Annotated[Path, typer.Option(help="split file of the kept rows")],
    report: Annotated[Path, typer.Option(help="cleaning report (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Apply the per-ion k-sigma outlier rule, its thresholds fitted on training rows."""
    from training.stages import clean as stage

    res = stage.run(stage.Options(records, splits_all, out, splits_out, report, params))
    for ion, st in res.items():
        typer.echo(f"{ion}: kept {st['kept']}, removed {st['removed']} (k={st['k']})")


@app.command()
@_user_errors
def split(
    records: RecordsOpt,
    out: Annotated[Path, typer.Option(help="splits file (JSON id lists)")],
    report: Annotated[Path, typer.Option(help="split sizes (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Seeded per-ion split of every ingested row, grouped by charged_id across ions."""
    from training.stages import split as stage

    for ion, sizes in stage.run(stage.Options(records, out, report, params)).items():
        typer.echo(f"{ion}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))


@app.command()
@_user_errors
def graphs(
    records: RecordsOpt,
    out: Annotated[Path, typer.Option(help="graph cache (.pt)")],
    report: Annotated[Path, typer.Option(help="graph report (JSON)")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Build the crystal graph of every distinct charged structure once."""
    from training.stages import graphs as stage

    res = stage.run(stage.Options(records, out, report, params))
    typer.echo(f"{res['structures']} graphs in {res['seconds']} s, {len(res['skipped'])} skipped")


@app.command("chgnet-features")
@_user_errors
def chgnet_features(
    records: Annotated[Path, typer.Option(help="records of every ion (all hosts)")],
    out: Annotated[Path, typer.Option(help="features (.npz)")],
    report: Annotated[Path, typer.Option(help="stage report (JSON)")],
) -> None:
    """Frozen CHGNet features of every distinct charged host, once per pipeline."""
    from training.stages import chgnet_features as stage

    res = stage.run(stage.Options(records, out, report))
    typer.echo(f"{res['hosts']} hosts in {res['seconds']} s, {len(res['failed'])} failed")


@app.command()
@_user_errors
def baselines(
    ion: IonOpt,
    records: RecordsOpt,
    splits: SplitsOpt,
    features_cache: Annotated[Path, typer.Option(help="composition feature cache (.npz)")],
    metrics: Annotated[Path, typer.Option(help="metrics JSON out")],
    predictions: Annotated[Path, typer.Option(help="test predictions CSV out")],
    val_predictions: Annotated[
        Path | None,
        typer.Option(help="validation predictions CSV out (default: <predictions>_val.csv)"),
    ] = None,
    records_all: RecordsAllOpt = None,
    splits_all: SplitsAllOpt = None,
    uncleaned_predictions: Annotated[
        Path | None,
        typer.Option(
            help="uncleaned test predictions CSV out, with --records-all and --splits-all "
            "(default: <predictions>_uncleaned.csv)"
        ),
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Mean, SVR, KRR, random forest and a GP on composition features (plus pooled variants
    for ions with pool partners), tuned per ion by grouped CV on train+val, same splits as the
    CGCNN; optionally also predicting the test rows before cleaning (nothing refitted)."""
    from training.stages import baselines as stage

    opts = stage.Options(
        ion, records, splits, features_cache, metrics, predictions, val_predictions, records_all,
        splits_all, uncleaned_predictions, params,
    )
    res = stage.run(opts)
    for name, per_split in res.items():
        typer.echo(f"{ion} {name}: test MAE {per_split['test']['mae']:.3f} V")


@app.command()
@_user_errors
def train(
    ion: Annotated[str, typer.Option(help="working ion (the source ion)")],
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
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
    from training.stages import train as stage

    opts = stage.Options(
        ion, records, splits, graphs, checkpoint, metrics, plot, best_params, epochs, params,
    )
    report = stage.run(opts)
    ens, single = report["ensemble"]["test"], report["single_model"]["test"]
    typer.echo(
        f"{ion}: test MAE {ens['mae']:.3f} V (ensemble), {single['mae']:.3f} V (single model); "
        f"coverage90 {report['uncertainty']['coverage_90']:.2f}"
    )


@app.command()
@_user_errors
def tune(
    ion: IonOpt,
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
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
    from training.stages import tune as stage

    best = stage.run(stage.Options(ion, records, splits, graphs, out, storage, n_trials, params))
    typer.echo(
        f"{ion}: best val MAE {best['value']:.3f} V (trial {best['trial']}), {best['states']}"
    )


@app.command("ion-model")
@_user_errors
def ion_model(
    ion: IonOpt,
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
    source_checkpoint: SourceCheckpointOpt,
    baselines: Annotated[Path, typer.Option(help="baseline test predictions CSV of this ion")],
    checkpoint: Annotated[Path, typer.Option(help="this ion's model checkpoint out")],
    metrics: Annotated[Path, typer.Option(help="comparison metrics JSON out")],
    predictions: Annotated[Path, typer.Option(help="test predictions CSV out")],
    records_all: RecordsAllOpt = None,
    splits_all: SplitsAllOpt = None,
    baselines_uncleaned: Annotated[
        Path | None,
        typer.Option(help="baselines' uncleaned test predictions CSV (with --splits-all)"),
    ] = None,
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Transfer learning (or, for the source ion, evaluation) and the comparison for one ion."""
    from training.stages import ion_model as stage

    opts = stage.Options(
        ion, records, splits, graphs, source_checkpoint, baselines, checkpoint, metrics,
        predictions, records_all, splits_all, baselines_uncleaned, chgnet_features, params,
    )
    report = stage.run(opts)
    for name, m in sorted(report["methods"].items(), key=lambda kv: kv[1]["test_mae_mean"]):
        typer.echo(
            f"{ion} {name:20s} test MAE {m['test_mae_mean']:.3f} +- {m['test_mae_std']:.3f} V"
        )


@app.command("chemsys-split")
@_user_errors
def chemsys_split(
    ion: Annotated[str, typer.Option(help="working ion (the source ion)")],
    records: RecordsOpt,
    graphs: GraphsOpt,
    out: Annotated[Path, typer.Option(help="report JSON out")],
    predictions: Annotated[Path, typer.Option(help="test predictions CSV out")],
    best_params: Annotated[
        Path | None, typer.Option(help="tuned parameters (JSON) overriding params.yaml")
    ] = None,
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """One CGCNN, the composition baselines (and the CHGNet GP and its average with the CGCNN)
    on a split grouped by chemical system, scored once on its test part."""
    from training.stages import chemsys_split as stage

    opts = stage.Options(
        ion, records, graphs, out, predictions, best_params, chgnet_features, params,
    )
    report = stage.run(opts)
    typer.echo(f"{ion}: {report['n']} crystals in {report['n_chemsys']} chemical systems")
    for name, m in sorted(report["methods"].items(), key=lambda kv: kv[1]["test"]["mae"]):
        typer.echo(f"{ion} {name:8s} test MAE {m['test']['mae']:.3f} V")
    d = report["cgcnn_minus_best_baseline"]
    typer.echo(f"cgcnn - {report['best_baseline']}: {d['diff']:+.3f} +- {d['se']:.3f} V")


@app.command("cv")
@_user_errors
def cv(
    ion: IonOpt,
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
    source_checkpoint: SourceCheckpointOpt,
    features_cache: Annotated[Path, typer.Option(help="composition features cache (.npz)")],
    out: Annotated[Path, typer.Option(help="cross-validation report JSON out")],
    rows_out: Annotated[
        Path | None, typer.Option(help="per-crystal out-of-fold predictions CSV out")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="reliability diagram PNG out")] = None,
    ion_metrics: Annotated[
        Path | None, typer.Option(help="ion_model report: the served GP variant")
    ] = None,
    baseline_metrics: Annotated[
        Path | None, typer.Option(help="baselines report: the best baseline by inner CV")
    ] = None,
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Leak-free grouped CV (by host and by chemical system) over the ion's whole data: GP
    transfer vs the tuned baselines, with uncertainty scores."""
    from training.stages import cv as stage

    opts = stage.Options(
        ion, records, splits, graphs, source_checkpoint, features_cache, out, rows_out, plot,
        ion_metrics, baseline_metrics, chgnet_features, params,
    )
    report = stage.run(opts)
    if "groupings" not in report:
        typer.echo(f"{ion}: {report['not_applicable']}")
        return
    for grouping, rep in report["groupings"].items():
        for name, m in sorted(rep["methods"].items(), key=lambda kv: kv[1]["mae"]):
            typer.echo(f"{ion} {grouping:7s} {name:26s} CV MAE {m['mae']:.3f} +- {m['se']:.3f} V"
                       f" ({rep['n_scored']} of {rep['n']} scored)")  # fmt: skip


@app.command()
@_user_errors
def compare(
    metrics_dir: MetricsDirOpt,
    predictions_dir: Annotated[Path, typer.Option(help="folder with ion_<ion>.csv predictions")],
    table: Annotated[Path, typer.Option(help="comparison CSV out")],
    markdown: Annotated[Path, typer.Option(help="comparison markdown out")],
    plot: Annotated[Path, typer.Option(help="parity grid PNG out")],
    summary: Annotated[Path, typer.Option(help="summary metrics JSON out")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The methods x ions table and the grid of parity plots."""
    from training.stages import compare as stage

    stage.run(stage.Options(metrics_dir, predictions_dir, table, markdown, plot, summary, params))
    typer.echo(markdown.read_text())


@app.command()
@_user_errors
def plots(
    predictions_dir: Annotated[Path, typer.Option(help="folder with ion_<ion>.csv predictions")],
    cv_dir: Annotated[Path, typer.Option(help="folder with the cv stage's <ion>.csv/.json")],
    metrics_dir: Annotated[Path, typer.Option(help="folder with baselines_<ion>.json reports")],
    models_dir: Annotated[Path, typer.Option(help="folder with the served <ion>.pt models")],
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
    out_dir: Annotated[Path, typer.Option(help="folder for the parity/reliability PNGs")],
    importance_dir: Annotated[Path, typer.Option(help="folder for the RF importance PNGs")],
    test_predictions: Annotated[Path, typer.Option(help="CSV out: test predictions + std")],
    summary: Annotated[Path, typer.Option(help="JSON out: the numbers the figures show")],
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Figures people read: parity with uncertainty bars, reliability, RF importances."""
    from training.stages import plots as stage

    for path in stage.run(stage.Options(
        predictions_dir, cv_dir, metrics_dir, models_dir, records, splits, graphs, out_dir,
        importance_dir, test_predictions, summary, chgnet_features, params,
    )):  # fmt: skip
        typer.echo(f"wrote {path}")


@app.command("docs")
@_user_errors
def docs(
    reports: Annotated[Path, typer.Option(help="the pipeline's reports folder")] = Path("reports"),
    root: Annotated[Path, typer.Option(help="repository root (README.md, docs/)")] = Path("."),
    check: Annotated[bool, typer.Option(help="only check; exit 1 when anything is stale")] = False,
) -> None:
    """Render every run-derived figure of README.md and docs/results.md from the reports."""
    from training.stages import docs as stage

    opts = stage.Options(reports, root)
    if check:
        found = stage.stale(opts)
        for line in found:
            typer.echo(line, err=True)
        raise typer.Exit(1 if found else 0)
    for path in stage.run(opts):
        typer.echo(f"wrote {path}")


@app.command("pair-voltage")
@_user_errors
def pair_voltage(
    out: Annotated[Path, typer.Option(help="per-pair CSV out")],
    summary: Annotated[Path, typer.Option(help="summary JSON out (per ion and overall)")],
    features: Annotated[
        Path | None,
        typer.Option(help="chgnet_features npz: its charged-structure energies are reused"),
    ] = None,
    snapshot_dir: Annotated[
        Path | None, typer.Option(help="snapshot folder (default: data.snapshot_dir)")
    ] = None,
    sample: Annotated[
        int | None, typer.Option(min=1, help="only this many random pairs (timing, smoke runs)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of --sample")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Physics cross-check: CHGNet voltage of every charged/discharged snapshot pair of the
    configured ions, scored against pair_voltage and battery_avg_voltage."""
    from training.stages import pair_voltage as stage

    opts = stage.Options(
        out, summary, features, snapshot_dir, sample, seed, progress, params,
    )
    report = stage.run(opts)
    for ion, s in [*report["per_ion"].items(), ("all", report["overall"])]:
        mae_p, mae_a = s["mae_vs_pair_voltage"], s["mae_vs_battery_avg_voltage"]
        typer.echo(f"{ion}: {s['n_scored']} of {s['n']} scored, MAE vs pair_voltage {mae_p} V, "
                   f"vs battery_avg_voltage {mae_a} V")  # fmt: skip
    typer.echo(f"{report['seconds']} s ({report['seconds_per_pair']} s per pair)")


@app.command()
@_user_errors
def protocol(
    metrics_dir: MetricsDirOpt,
    predictions_dir: Annotated[Path, typer.Option(help="folder with ion_/baselines_ CSVs")],
    cv_dir: Annotated[Path, typer.Option(help="folder with the cv stage's <ion>.csv rows")],
    out: Annotated[Path, typer.Option(help="primary comparison JSON out")],
    markdown: Annotated[Path, typer.Option(help="primary comparison markdown out")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The protocol's primary comparison: served vs best inner-CV baseline, paired, Holm."""
    from training.stages import protocol as stage

    stage.run(stage.Options(metrics_dir, predictions_dir, cv_dir, out, markdown, params))
    typer.echo(markdown.read_text())


@app.command()
@_user_errors
def register(
    metrics_dir: MetricsDirOpt,
    models_dir: Annotated[Path, typer.Option(help="folder with <ion>.pt checkpoints")],
    splits: Annotated[Path, typer.Option(help="splits file (its test ids are hashed)")],
    receipt: Annotated[Path, typer.Option(help="registration receipt JSON out")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Register every ion's changed model (alias candidate); first run promotes champions."""
    from training.stages import register as stage

    def echo(r: dict[str, Any]) -> None:
        typer.echo(f"{r['name']}: v{r['version']} (new: {r['registered_now']}), "
                   f"champion v{r['champion']}")  # fmt: skip

    stage.run(stage.Options(metrics_dir, models_dir, splits, receipt, params), on_ion=echo)


@app.command()
def promote(
    ion: IonOpt,
    version: Annotated[int | None, typer.Option(help="version (default: the candidate)")] = None,
    force: Annotated[bool, typer.Option(help="skip the validation gate")] = False,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Point alias champion at a version, refusing one worse than the champion on validation.

    The gate pairs both versions' validation predictions crystal by crystal and refuses when the
    candidate is worse by more than one paired standard error (the test split is never read).
    Exit status: 0 promoted, 1 refused by the gate, 2 usage error, 4 no such model or version.
    """
    from training.registry import NoSuchVersion, PromotionRefused
    from training.registry import promote as do_promote
    from training.tracking import setup_mlflow
    from voltage_model.naming import model_name

    try:
        p = _require_ion(load_params(params), ion)
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    mls = p.mlflow
    setup_mlflow(mls)
    try:
        info, reason = do_promote(model_name(mls.model_name_prefix, ion), version, force)
    except PromotionRefused as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from None
    except NoSuchVersion as exc:  # a typo, not a gate decision: its own status, no traceback
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(4) from None
    typer.echo(f"{info.name} v{info.version} is now champion ({reason})")


@app.command()
@_user_errors
def release(
    out: Annotated[Path, typer.Option(help="release folder (replaced whole)")] = Path("release"),
    models_dir: Annotated[
        Path, typer.Option(help="the served artifacts, <Ion>.pt")
    ] = Path("models/ions"),
    reports: Annotated[
        Path, typer.Option(help="reports folder: metrics/, cv/, protocol.json, registry.json")
    ] = Path("reports"),
    records: RecordsOpt = Path("data/clean/records.jsonl.gz"),
    splits: SplitsOpt = Path("data/splits.json"),
    check: Annotated[
        int, typer.Option(help="test crystals per ion predicted by release and source (0: none)")
    ] = 16,
    ions: Annotated[str, typer.Option(help="comma-separated (default: params.yaml)")] = "",
    max_mb: Annotated[float, typer.Option(help="refuse a bigger release (MB)")] = 25.0,
    float32_inputs: Annotated[bool | None, typer.Option(
        "--float32-inputs/--exact-inputs",
        help="round GP training inputs float32 cannot hold exactly (smaller; checked against "
             "--tol), or never; default: exact, rounded only if exact exceeds --max-mb")] = None,
    tol: Annotated[float | None, typer.Option(
        help="largest difference in V allowed by the check (default 1e-6; 1e-4 with "
             "--float32-inputs)")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:  # fmt: skip
    """Write the pretrained release (release/<Ion>.pt, manifest.json, MODEL_CARD.md) from the
    served models and the reports. Run on purpose after a pipeline run; no DVC stage runs it."""
    from training.release import ReleaseInputs, ReleaseOptions, release, release_lines
    from voltage_model.release import ReleaseError

    p = load_params(params)
    names = [i.strip() for i in ions.split(",") if i.strip()] or p.ion_names
    for ion in names:
        _require_ion(p, ion)
    if check > 0:
        for path in (records, splits):
            if not path.is_file():
                raise UsageError(f"{path} not found: the check predicts test crystals from it "
                                 "(run the pipeline, or pass --check 0)")  # fmt: skip
    options = ReleaseOptions(p.mlflow.model_name_prefix, check, tol, int(max_mb * 1e6),
                             float32_inputs)  # fmt: skip
    try:
        manifest = release(names, out, ReleaseInputs(models_dir, reports, records, splits), options)
    except ReleaseError as exc:
        raise UsageError(str(exc)) from None
    for line in release_lines(manifest, out):
        typer.echo(line)


@app.command("drift-reference")
@_user_errors
def drift_reference(
    records: RecordsOpt,
    splits: SplitsOpt,
    out: Annotated[Path, typer.Option(help="drift reference JSON out")],
    graphs: Annotated[Path | None, typer.Option(help="graph cache (with --models-dir)")] = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="folder of <ion>.pt: reference = their predictions")
    ] = None,
    predictions_json: Annotated[
        Path | None, typer.Option(help="or: {ion: {battery_id: volts}} on the training split")
    ] = None,
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Per-ion training-data statistics the service compares live traffic against (drift)."""
    from training.stages import drift_reference as stage

    opts = stage.Options(
        records, splits, out, graphs, models_dir, predictions_json, chgnet_features, params,
    )
    stats = stage.run(opts)
    for ion, entry in stats.items():
        typer.echo(f"{ion}: n={entry['n']}, {len(entry['elements'])} elements")


@app.command()
@_user_errors
def interpret(
    ion: IonOpt,
    checkpoint: Annotated[Path, typer.Option(help="the ion's model checkpoint")],
    records: RecordsOpt,
    splits: SplitsOpt,
    graphs: GraphsOpt,
    baselines_metrics: Annotated[Path, typer.Option(help="baselines JSON (RF importances)")],
    plots_dir: Annotated[Path, typer.Option(help="folder for the PNGs")],
    metrics: Annotated[Path, typer.Option(help="interpretation JSON out")],
    head: Annotated[Path, typer.Option(help="local-voltage head JSON out (for the service)")],
    chgnet_features: ChgnetFeaturesOpt = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """What the model learned (paper Fig. 3): embeddings, local voltages, environments, RF."""
    from training.stages import interpret as stage

    opts = stage.Options(
        ion, checkpoint, records, splits, graphs, baselines_metrics,
        stage.InterpretPaths(plots_dir, metrics, head), chgnet_features, params,
    )
    report = stage.run(opts)
    for name, claim in report["claims"].items():
        typer.echo(f"{ion} {name}: {'held' if claim['held'] else 'NOT held'}")


def _require_ion(p: Params, ion: str) -> Params:
    return p.require_ion(ion)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
