"""MLflow plumbing shared by every training stage: where runs go and what every run is tagged with.

Nothing here runs at import: the tracking URI is set only when a stage calls ``setup_mlflow``.
Default store: a sqlite file plus an artifact folder in the project's working area (``work/``),
overridable by ``params.yaml`` (``mlflow.tracking_uri``) and, above that, ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from training.config import MlflowSettings

DEFAULT_DB = Path("work/mlflow/mlflow.db")
DEFAULT_ARTIFACTS = Path("work/mlflow/artifacts")
#: The pipeline's data files a run's ``dataset_hash`` tag covers: cleaned rows and splits, and
#: for the stages that read graphs, the graph cache too.
CLEAN_DATA_FILES = ("data/clean/records.jsonl.gz", "data/splits.json")
GRAPH_DATA_FILES = (*CLEAN_DATA_FILES, "data/graphs/graphs.pt")


def resolve_tracking_uri(settings: MlflowSettings, root: Path = Path(".")) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    if settings.tracking_uri:
        return settings.tracking_uri
    return f"sqlite:///{(root / DEFAULT_DB).resolve()}"


def is_tracking_server(uri: str) -> bool:
    """An ``http(s)://`` tracking server (``mlflow server``), as opposed to a local store."""
    return uri.startswith(("http://", "https://"))


def setup_mlflow(settings: MlflowSettings, root: Path = Path(".")) -> str:
    """Point MLflow at the store and make sure the pipeline's experiment exists; returns its id.

    A new experiment's artifacts go to ``mlflow.artifact_location`` when set; else, on a local
    store, to ``work/mlflow/artifacts``; on a tracking server, wherever the server says (with
    ``--serve-artifacts``: its object store, proxied), since a folder of this machine would be
    unreadable from every other one. Workers started together on a fresh server race to create
    the experiment: the loser uses the winner's.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(settings, root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is not None:
        mlflow.set_experiment(settings.experiment)
        return exp.experiment_id
    location = settings.artifact_location
    if location is None and not is_tracking_server(uri):
        location = (root / DEFAULT_ARTIFACTS).resolve().as_uri()
    try:
        exp_id = mlflow.create_experiment(settings.experiment, artifact_location=location)
    except MlflowException:
        exp = mlflow.get_experiment_by_name(settings.experiment)
        if exp is None:
            raise
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: Path = Path(".")) -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dataset_version(root: Path = Path("."), outputs: tuple[str, ...] = ()) -> dict[str, str]:
    """The DVC content hashes (from ``dvc.lock``) of the data a run trained on."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    found: dict[str, str] = {}
    for stage in stages.values():
        for out in stage.get("outs", []):
            if not outputs or out["path"] in outputs:
                found[out["path"]] = out.get("md5", "")
    return found


def standard_tags(root: Path = Path("."), data_outputs: tuple[str, ...] = ()) -> dict[str, Any]:
    tags: dict[str, Any] = {"git_commit": git_commit(root)}
    for path, md5 in dataset_version(root, data_outputs).items():
        tags[f"dvc:{path}"] = md5
    return tags
