"""Stage ``compare``: the methods x ions table and the grid of parity plots
(``training/compare.py``), logged to MLflow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.compare import run_compare
from training.config import load_params
from training.tracking import setup_mlflow, standard_tags


@dataclass(frozen=True)
class Options:
    metrics_dir: Path
    predictions_dir: Path
    table: Path
    markdown: Path
    plot: Path
    summary: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> None:
    import mlflow

    p = load_params(opts.params)
    ions = p.ion_names
    run_compare(
        [opts.metrics_dir / f"ion_{i}.json" for i in ions],
        [opts.predictions_dir / f"ion_{i}.csv" for i in ions],
        opts.table, opts.markdown, opts.plot, opts.summary,
    )  # fmt: skip
    setup_mlflow(p.mlflow)
    with mlflow.start_run(run_name="compare"):
        mlflow.set_tags({"stage": "compare", **standard_tags()})
        for path in (opts.table, opts.markdown, opts.plot, opts.summary):
            mlflow.log_artifact(str(path))
