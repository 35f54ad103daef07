"""Wiring: configuration -> metrics, drift window, predictor, model manager.

Kept apart from the BentoML service so the command line and tests build exactly the same
objects without a server (``ServingRuntime(config).start()``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from prometheus_client import CollectorRegistry

from serving.config import ServingConfig
from serving.drift import DriftWindow, load_reference
from serving.metrics import ServiceMetrics
from serving.predictor import Predictor
from serving.predlog import PredictionLog
from serving.watcher import ModelManager, PackagedModel

logger = logging.getLogger(__name__)


def load_drift(config: ServingConfig) -> DriftWindow | None:
    """The drift window, or None (logged) when the reference is absent or unusable."""
    path = config.drift_reference
    if path is None:
        logger.info("drift monitoring disabled (no reference configured)")
        return None
    if not path.is_file():
        logger.warning("drift reference %s not found: drift gauges will not be set", path)
        return None
    try:
        return DriftWindow(load_reference(path), size=config.drift_window)
    except (OSError, ValueError) as exc:
        logger.error("drift reference %s unusable (%s): drift gauges will not be set", path, exc)
        return None


class ServingRuntime:
    """Everything one serving process needs, started and stopped together."""

    def __init__(
        self,
        config: ServingConfig,
        registry: CollectorRegistry | None = None,
        packaged: Mapping[str, PackagedModel] | None = None,
        warm: bool = True,
    ) -> None:
        self.config = config
        self.metrics = ServiceMetrics(registry, ions=config.ions)
        self.drift = load_drift(config)
        predictions = None
        if config.prediction_log is not None:
            predictions = PredictionLog(
                config.prediction_log,
                config.prediction_log_max_bytes,
                config.prediction_log_backups,
            )
        self.predictor = Predictor(config, self.metrics, self.drift, predictions=predictions)
        # warm=False: no warm-up prediction per model (a one-shot command line answers once)
        self.manager = ModelManager(config, self.predictor, packaged, warm=warm)
        self.started = False

    def start(self, watch: bool = True) -> ServingRuntime:
        """Load the models (blocking) and start the inference and watcher threads."""
        self.predictor.start()
        self.manager.initial_load()
        if watch:
            self.manager.start()
        self.started = True
        return self

    def stop(self) -> None:
        self.manager.stop()
        self.predictor.stop()
        self.started = False
