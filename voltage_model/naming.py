"""The names a served model is found by, shared by the pipeline that registers it and the service
that loads it: registered-model names and aliases, the version record, the pyfunc's checkpoint
artifact key, the default tracking store, and the working ions of ``params.yaml``.

Import-light on purpose (standard library and PyYAML only): the service's command line imports
it before it decides whether a model needs loading at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Registry aliases: the pipeline points ``candidate`` at each new version; the service serves
#: ``champion`` (``training/registry.py`` moves it, behind the promotion gate).
CANDIDATE = "candidate"
CHAMPION = "champion"

#: Name of the checkpoint artifact inside a logged pyfunc model (``voltage_model/pyfunc.py``).
CHECKPOINT_KEY = "checkpoint"

#: The pipeline's default tracking store, relative to the project root (``training/tracking.py``
#: keeps its own ``DEFAULT_DB``, equal to this one: tests/project/test_architecture.py checks it).
DEFAULT_TRACKING_DB = Path("work/mlflow/mlflow.db")


def model_name(prefix: str, ion: str) -> str:
    return f"{prefix}-{ion}"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: int
    run_id: str | None
    tags: dict[str, str]

    @property
    def test_mae(self) -> float | None:
        """The reported test MAE (shown by the service; never read by the promotion gate)."""
        v = self.tags.get("test_mae")
        return float(v) if v not in (None, "") else None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def read_params(path: Path | str) -> dict[str, Any]:
    """What the service reads from ``params.yaml``: ``ions`` (the working ions, in order) and the
    ``mlflow`` section (``{}`` when absent). Raises FileNotFoundError for a missing file and
    ValueError when ``ions`` is not a non-empty mapping (the pipeline's own, stricter check is
    ``training.config.load_params``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    with path.open() as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a mapping of settings")
    ions = raw.get("ions")
    if not isinstance(ions, dict) or not ions or not all(isinstance(i, str) for i in ions):
        raise ValueError(f"{path}: params.ions must map at least one working ion to its settings")
    mlflow = raw.get("mlflow") or {}
    if not isinstance(mlflow, dict):
        raise ValueError(f"{path}: params.mlflow must be a mapping")
    return {"ions": list(ions), "mlflow": mlflow}
