"""Where served models come from: the MLflow registry (``champion`` alias), a built Bento, or the
pretrained release in the repository (``release/``, written by ``voltage release``).

Why the checkpoint and not ``mlflow.pyfunc.load_model``: the registered pyfunc is "models from
code"; loading it would execute the logged ``mlflow_model.py`` and put the version's copy of the
``training`` package in front of ``sys.path`` inside a long-running server (a later reload could
then mix two code versions). The service only needs the self-describing checkpoint artifact,
which ``training.inference.VoltageModel`` reads with ``torch.load(weights_only=True)``: nothing
from the registry is executed or unpickled.

Registry errors are told apart from "no champion": :func:`champion_version` returns None only
when the registry answered that the model or alias does not exist, and raises when the registry
could not be asked (the watcher counts that as a failed reload and keeps the old model).

Nothing heavy is imported here at module level (no torch, no MLflow): the command line imports
this module on its way to a release model, and MLflow costs seconds it does not need there.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from training.registry import CHAMPION, VersionInfo

if TYPE_CHECKING:
    from training.inference import VoltageModel

logger = logging.getLogger(__name__)

#: File name of the checkpoint inside an exported BentoML model.
BENTO_CHECKPOINT = "checkpoint.pt"
#: MLflow error codes meaning "the registry answered: no such model / alias".
_NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


class ModelLoadError(RuntimeError):
    """A model could not be resolved or loaded; the message says which and why."""


@dataclass(frozen=True)
class ServedModel:
    """One loaded model and where it came from (immutable: swapped whole, never edited)."""

    ion: str
    model: VoltageModel
    name: str
    version: int
    source: str  # "registry" | "bento" | "release"
    run_id: str | None = None
    test_mae: float | None = None
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "run_id": self.run_id,
            "test_mae": self.test_mae,
            "loaded_at": self.loaded_at.isoformat(timespec="seconds"),
            "backbone": self.model.backbone,  # cgcnn, chgnet or cgcnn+chgnet (issue 16)
        }


def bento_model_name(prefix: str, ion: str) -> str:
    """BentoML model names are lower-case: ``electrode-voltage-li``."""
    return f"{prefix}-{ion}".lower()


def _test_mae(tags: dict[str, str], model: VoltageModel) -> float | None:
    raw = tags.get("test_mae", model.info.get("test_mae"))
    try:
        return float(raw) if raw not in (None, "") else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------- registry
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
    from training.mlflow_model import CHECKPOINT_KEY

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


def load_registry_model(ion: str, tracking_uri: str, version: VersionInfo) -> ServedModel:
    """Download and load one registered version's checkpoint; raises ModelLoadError."""
    from training.inference import VoltageModel

    tmp = Path(tempfile.mkdtemp(prefix=f"voltage-{ion}-"))
    try:
        ckpt = download_checkpoint(tracking_uri, version, tmp)
        model = VoltageModel.from_checkpoint(ckpt)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{version.uri}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the model is fully in memory now
    _check_ion(model, ion, version.uri)
    return ServedModel(
        ion=ion,
        model=model,
        name=version.name,
        version=version.version,
        source="registry",
        run_id=version.run_id,
        test_mae=_test_mae(version.tags, model),
    )


def _check_ion(model: VoltageModel, ion: str, where: str) -> None:
    if model.ion not in (None, ion):
        raise ModelLoadError(f"{where} is a model of ion {model.ion!r}, not {ion!r}")


# ---------------------------------------------------------------------------------- bento
def load_bento_model(ion: str, path: Path, metadata: dict[str, Any]) -> ServedModel:
    """Load a model exported into the BentoML store (``serving/export_models.py``)."""
    from training.inference import VoltageModel

    try:
        model = VoltageModel.from_checkpoint(path / BENTO_CHECKPOINT)
    except Exception as exc:
        raise ModelLoadError(f"BentoML model at {path}: {type(exc).__name__}: {exc}") from exc
    _check_ion(model, ion, str(path))
    raw_mae = metadata.get("test_mae")
    return ServedModel(
        ion=ion,
        model=model,
        name=str(metadata.get("registry_name", "")),
        version=int(metadata.get("registry_version", 0)),
        source="bento",
        run_id=metadata.get("run_id"),
        test_mae=float(raw_mae) if raw_mae is not None else None,
    )


# ---------------------------------------------------------------------------------- release
def load_release_model(ion: str, release_dir: Path) -> ServedModel:
    """The pretrained release's model of ``ion`` (``training/release.py``): the file is checked
    against the manifest's sha256 before it is read; raises ModelLoadError naming the problem.
    Its name and version are the registered ones it was released from (version 0: never
    registered), so an answer can be traced to the pipeline run either way."""
    from training.model.artifact import CheckpointError
    from training.release import ReleaseError, load_release

    try:
        model, entry = load_release(Path(release_dir), ion)
    except (ReleaseError, CheckpointError, OSError) as exc:
        raise ModelLoadError(f"release {release_dir}: {exc}") from exc
    _check_ion(model, ion, f"release {release_dir}")
    raw_mae = entry.get("test_mae")
    return ServedModel(
        ion=ion,
        model=model,
        name=str(entry.get("name") or ion),
        version=int(entry.get("version") or 0),
        source="release",
        run_id=entry.get("mlflow_run_id"),
        test_mae=float(raw_mae) if isinstance(raw_mae, int | float) else None,
    )
