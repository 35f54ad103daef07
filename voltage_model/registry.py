"""The registry's read side, shared by the service and screening: which version an alias points
at, and that version's checkpoint, fetched alone and loaded weights-only.

Why the checkpoint and not ``mlflow.pyfunc.load_model``: the registered pyfunc is "models from
code"; loading it executes the logged ``pyfunc.py`` and puts the version's copy of the package
(``training`` for versions logged before issue 18) in front of ``sys.path``, so a process could
mix two code versions, and a registry writer could run code in every reader. The checkpoint is
read by :meth:`voltage_model.predict.VoltageModel.from_checkpoint` with
``torch.load(weights_only=True)``: nothing from the registry is executed or unpickled.

Registry errors are told apart from "no champion": :func:`champion_version` returns None only
when the registry answered that the model or alias does not exist, and raises when the registry
could not be asked. Nothing heavy is imported at module level (no torch, no MLflow).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from voltage_model.naming import CHAMPION, VersionInfo

if TYPE_CHECKING:
    from voltage_model.predict import VoltageModel

logger = logging.getLogger(__name__)

#: MLflow error codes meaning "the registry answered: no such model / alias".
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message says which and why."""


def sqlite_path(tracking_uri: str) -> Path | None:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///"))
    return None


def champion_in_store(tracking_uri: str, name: str, alias: str = CHAMPION) -> bool | None:
    """Whether a local sqlite registry has ``alias`` on ``name``, read with sqlite3 directly
    (milliseconds; importing MLflow to ask costs seconds). None when that cannot be told this
    way (not a sqlite URI, or a schema this code does not know): then ask MLflow. A missing
    store file has no champion (MLflow would create an empty store there)."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    if not path.is_file():
        return False
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=2) as db:
            row = db.execute(
                "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                (name, alias),
            ).fetchone()
    except sqlite3.Error as exc:
        logger.debug("cannot read aliases from %s directly: %s", path, exc)
        return None
    return row is not None


def registry_reachable(tracking_uri: str) -> bool:
    """True when the registry answers a cheap query.

    A ``sqlite:///`` URI whose file is missing counts as unreachable: asking MLflow would
    silently create an empty store (e.g. inside a built Bento, far from the project's store).
    """
    path = sqlite_path(tracking_uri)
    if path is not None and not path.is_file():
        return False
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).search_registered_models(max_results=1)
    except Exception as exc:  # any failure means "not usable now"
        logger.warning("MLflow registry at %s not reachable: %s", tracking_uri, exc)
        return False
    return True


def champion_version(tracking_uri: str, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version ``alias`` points at; None if the registry says there is none; raises else."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        mv = MlflowClient(tracking_uri=tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND_CODES:
            return None
        raise
    return VersionInfo(mv.name, int(mv.version), mv.run_id, dict(mv.tags or {}))


def _checkpoint_relpath(mlmodel: Path) -> str:
    from voltage_model.naming import CHECKPOINT_KEY

    doc = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (doc.get("flavors", {}).get("python_function", {}) or {}).get("artifacts") or {}
    entry = artifacts.get(CHECKPOINT_KEY)
    if not entry or "path" not in entry:
        raise ModelLoadError(f"{mlmodel}: no '{CHECKPOINT_KEY}' artifact in the pyfunc flavour")
    rel = str(entry["path"])
    if rel.startswith("/") or ".." in Path(rel).parts:
        raise ModelLoadError(f"{mlmodel}: suspicious checkpoint path {rel!r}")
    return rel


def download_checkpoint(tracking_uri: str, version: VersionInfo, dst: Path) -> Path:
    """Copy the version's ``MLmodel`` and checkpoint (only those) into ``dst``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    base = client.get_model_version_download_uri(version.name, str(version.version)).rstrip("/")
    with _tracking(tracking_uri):
        mlmodel = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(dst))
        )
        rel = _checkpoint_relpath(mlmodel)
        ckpt = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{base}/{rel}", dst_path=str(dst / "ckpt")
        )
    return Path(ckpt)


class _tracking:
    """Temporarily point the global MLflow tracking URI at ``uri`` (artifact resolution of
    ``models:/`` URIs reads it)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.prev: str | None = None

    def __enter__(self) -> None:
        import mlflow

        self.prev = mlflow.get_tracking_uri()
        if self.prev != self.uri:
            mlflow.set_tracking_uri(self.uri)

    def __exit__(self, *exc: object) -> None:
        import mlflow

        if self.prev is not None and self.prev != self.uri:
            mlflow.set_tracking_uri(self.prev)


def load_version(tracking_uri: str, version: VersionInfo) -> VoltageModel:
    """One registered version's model: its checkpoint downloaded to a temporary folder, loaded
    weights-only, the folder removed (the model is fully in memory). Raises ModelLoadError."""
    from voltage_model.predict import VoltageModel

    tmp = Path(tempfile.mkdtemp(prefix=f"voltage-{version.name}-"))
    try:
        return VoltageModel.from_checkpoint(download_checkpoint(tracking_uri, version, tmp))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{version.uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_champion(tracking_uri: str, name: str, alias: str = CHAMPION) -> VoltageModel:
    """The model ``alias`` points at; ModelLoadError when there is none or it cannot load."""
    version = champion_version(tracking_uri, name, alias)
    if version is None:
        raise ModelLoadError(f"{name} has no {alias!r} version in the registry at {tracking_uri}")
    return load_version(tracking_uri, version)
