"""Service settings, read from the environment (with ``params.yaml`` for the ion list).

Why environment variables: the same code runs from a checkout (``bentoml serve``), from a built
Bento and from a container, and each BentoML worker is a separate process that inherits the
environment. Every variable is listed in docs/serving.md. Nothing is read at import time:
:meth:`ServingConfig.from_env` is called when the service instance is created.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_IONS = ("Li", "Na", "K", "Mg", "Ca", "Zn", "Al")
MODEL_SOURCES = ("auto", "registry", "bento", "release")
#: The pretrained release of the checkout this package runs from (``voltage release``): found
#: whatever the working directory, as ``voltage-serve predict`` may run from anywhere.
DEFAULT_RELEASE_DIR = Path(__file__).resolve().parents[1] / "release"


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 0) -> int:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    value = int(raw)
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], key: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    value = float(raw)
    if value < minimum:
        raise ValueError(f"{key} must be >= {minimum}, got {value}")
    return value


def _flag(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw in (None, ""):
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off")


def max_sites(env: Mapping[str, str] | None = None) -> int:
    """``VOLTAGE_MAX_SITES`` (500): the command line checks a structure against it before it
    reads any other setting or loads a model."""
    return _int(os.environ if env is None else env, "VOLTAGE_MAX_SITES", 500, 1)


def _params_defaults(path: Path) -> dict[str, Any]:
    """Ion list, model name prefix and tracking URI from ``params.yaml`` (the pipeline's own
    settings), so a service started from the checkout follows the pipeline without extra env."""
    if not path.is_file():
        return {}
    from voltage_model.naming import read_params

    params = read_params(path)
    out: dict[str, Any] = {"ions": tuple(params["ions"])}
    mlflow_section = params["mlflow"]
    if mlflow_section.get("model_name_prefix"):
        out["name_prefix"] = str(mlflow_section["model_name_prefix"])
    if mlflow_section.get("tracking_uri"):
        out["tracking_uri"] = str(mlflow_section["tracking_uri"])
    return out


def resolve_tracking_uri(env: Mapping[str, str], params: Mapping[str, Any]) -> str:
    """The registry the service, the CLI and the screen read: ``MLFLOW_TRACKING_URI``, else
    ``params.yaml``'s ``mlflow.tracking_uri`` (``params``: that section, or
    ``_params_defaults``), else the pipeline's default store."""
    return env.get("MLFLOW_TRACKING_URI") or params.get("tracking_uri") or default_tracking_uri()


def default_tracking_uri(root: Path = Path(".")) -> str:
    """The pipeline's default store (``training.tracking``): sqlite under ``work/mlflow``."""
    from voltage_model.naming import DEFAULT_TRACKING_DB

    return f"sqlite:///{(root / DEFAULT_TRACKING_DB).resolve()}"


def quiet_mlflow_defaults() -> None:
    """Server-friendly MLflow client defaults (kept if already set): no progress bars in logs,
    and a registry that does not answer costs seconds, not minutes of retries."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@dataclass(frozen=True)
class ServingConfig:
    """Everything the service reads from its environment (defaults in brackets in the docs)."""

    ions: tuple[str, ...] = DEFAULT_IONS
    disabled_ions: frozenset[str] = frozenset()
    name_prefix: str = "electrode-voltage"
    tracking_uri: str = ""
    model_source: str = "auto"
    reload_interval_s: float = 30.0
    max_sites: int = 500
    max_body_bytes: int = 2 * 1024 * 1024
    max_batch_items: int = 256
    batch_max_size: int = 64
    batch_max_wait_ms: float = 2.0
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    grpc_enabled: bool = True
    drift_reference: Path | None = Path("data/drift_reference.json")
    drift_window: int = 1000
    records_path: Path | None = Path("data/clean/records.jsonl.gz")
    local_voltage_dir: Path | None = Path("models/local_voltage")
    #: Where an ion without a registry champion (or packaged model) is served from; None: never.
    release_dir: Path | None = None
    #: Items (structures) admitted per worker and not yet answered; beyond it requests are shed
    #: at once (503 ``overloaded`` + Retry-After; gRPC RESOURCE_EXHAUSTED) instead of queued.
    max_queue: int = 128
    #: Seconds a shed client is told to wait (``Retry-After``).
    retry_after_s: float = 1.0
    #: JSONL prediction log (one file per worker process); None: off.
    prediction_log: Path | None = None
    prediction_log_max_bytes: int = 50 * 1024 * 1024
    prediction_log_backups: int = 5
    #: ``json`` (default) or ``text``: format of the ``serving`` loggers.
    log_format: str = "json"
    #: One ``request`` line per API call on the ``serving.access`` logger.
    access_log: bool = True

    def __post_init__(self) -> None:
        if not self.ions:
            raise ValueError("no ions configured (VOLTAGE_IONS or params.yaml ions)")
        if self.model_source not in MODEL_SOURCES:
            raise ValueError(f"VOLTAGE_MODEL_SOURCE must be one of {MODEL_SOURCES}")
        if self.log_format not in ("json", "text"):
            raise ValueError(f"VOLTAGE_LOG_FORMAT must be json or text, not {self.log_format!r}")
        unknown = self.disabled_ions - set(self.ions)
        if unknown:
            raise ValueError(f"VOLTAGE_DISABLED_IONS names ions not served: {sorted(unknown)}")

    @property
    def enabled_ions(self) -> tuple[str, ...]:
        return tuple(i for i in self.ions if i not in self.disabled_ions)

    def model_name(self, ion: str) -> str:
        from voltage_model.naming import model_name

        return model_name(self.name_prefix, ion)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ServingConfig:
        """Build from ``env`` (default ``os.environ``); errors name the offending variable."""
        env = os.environ if env is None else env
        params = _params_defaults(Path(env.get("VOLTAGE_PARAMS", "params.yaml")))
        ions = _split(env.get("VOLTAGE_IONS")) or params.get("ions", DEFAULT_IONS)
        tracking_uri = resolve_tracking_uri(env, params)
        drift = env.get("VOLTAGE_DRIFT_REFERENCE", "data/drift_reference.json")
        records = env.get("VOLTAGE_RECORDS", "data/clean/records.jsonl.gz")
        heads = env.get("VOLTAGE_LOCAL_VOLTAGE_DIR", "models/local_voltage")
        release = env.get("VOLTAGE_RELEASE_DIR", str(DEFAULT_RELEASE_DIR))
        predictions = env.get("VOLTAGE_PREDICTION_LOG", "")
        return cls(
            ions=ions,
            disabled_ions=frozenset(_split(env.get("VOLTAGE_DISABLED_IONS"))),
            name_prefix=env.get("VOLTAGE_MODEL_PREFIX")
            or params.get("name_prefix", "electrode-voltage"),
            tracking_uri=tracking_uri,
            model_source=env.get("VOLTAGE_MODEL_SOURCE", "auto"),
            reload_interval_s=_float(env, "VOLTAGE_RELOAD_INTERVAL", 30.0, 0.1),
            max_sites=max_sites(env),
            max_body_bytes=_int(env, "VOLTAGE_MAX_BODY_BYTES", 2 * 1024 * 1024, 1),
            max_batch_items=_int(env, "VOLTAGE_MAX_BATCH_ITEMS", 256, 1),
            batch_max_size=_int(env, "VOLTAGE_BATCH_MAX_SIZE", 64, 1),
            batch_max_wait_ms=_float(env, "VOLTAGE_BATCH_MAX_WAIT_MS", 2.0, 0.0),
            grpc_host=env.get("VOLTAGE_GRPC_HOST", "127.0.0.1"),
            grpc_port=_int(env, "VOLTAGE_GRPC_PORT", 50051, 0),
            grpc_enabled=_flag(env, "VOLTAGE_GRPC_ENABLED", True),
            drift_reference=Path(drift) if drift else None,
            drift_window=_int(env, "VOLTAGE_DRIFT_WINDOW", 1000, 1),
            records_path=Path(records) if records else None,
            local_voltage_dir=Path(heads) if heads else None,
            release_dir=Path(release) if release else None,
            max_queue=_int(env, "VOLTAGE_MAX_QUEUE", 128, 1),
            retry_after_s=_float(env, "VOLTAGE_RETRY_AFTER_S", 1.0, 0.0),
            prediction_log=Path(predictions) if predictions else None,
            prediction_log_max_bytes=_int(
                env, "VOLTAGE_PREDICTION_LOG_MAX_BYTES", 50 * 1024 * 1024, 1024
            ),
            prediction_log_backups=_int(env, "VOLTAGE_PREDICTION_LOG_BACKUPS", 5, 0),
            log_format=env.get("VOLTAGE_LOG_FORMAT", "json").strip().lower() or "json",
            access_log=_flag(env, "VOLTAGE_ACCESS_LOG", True),
        )
