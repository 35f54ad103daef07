"""Where served models come from: the MLflow registry (``champion`` alias), a built Bento, or the
pretrained release in the repository (``release/``, written by ``voltage release``).

A registry version is read by ``voltage_model.registry`` (the one safe loader, shared with
screening): only its checkpoint is fetched and loaded weights-only; why, and how "no champion"
is told apart from "registry not reachable", is said there.

Nothing heavy is imported here at module level (no torch, no MLflow): the command line imports
this module on its way to a release model, and MLflow costs seconds it does not need there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voltage_model.naming import VersionInfo
from voltage_model.registry import ModelLoadError, load_version

if TYPE_CHECKING:
    from voltage_model.predict import VoltageModel

logger = logging.getLogger(__name__)

#: File name of the checkpoint inside an exported BentoML model.
BENTO_CHECKPOINT = "checkpoint.pt"


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


def load_registry_model(ion: str, tracking_uri: str, version: VersionInfo) -> ServedModel:
    """Download and load one registered version's checkpoint; raises ModelLoadError."""
    model = load_version(tracking_uri, version)
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
    from voltage_model.predict import VoltageModel

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
    """The pretrained release's model of ``ion`` (``voltage_model/release.py``): the file is checked
    against the manifest's sha256 before it is read; raises ModelLoadError naming the problem.
    Its name and version are the registered ones it was released from (version 0: never
    registered), so an answer can be traced to the pipeline run either way."""
    from voltage_model.artifact import CheckpointError
    from voltage_model.release import ReleaseError, load_release

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
