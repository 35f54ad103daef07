"""The service's Prometheus metrics (names and labels fixed by docs/CONTRACTS.md).

Why a class on an injectable registry: importing this module registers nothing, so tests and the
command line create as many independent sets as they like; the BentoML worker creates one.

Several workers: BentoML starts each worker with ``PROMETHEUS_MULTIPROC_DIR`` set, so
``prometheus_client`` stores every value in per-process files of that folder (whatever registry
the metric was created on) and BentoML's ``/metrics`` merges them: counters and histograms are
summed over workers; each gauge declares how workers combine (``multiprocess_mode``), chosen so
that the alert rules read the right thing: ``voltage_model_loaded`` is the *minimum* over live
workers (one worker without the model is enough for "no champion"), versions and drift the
*maximum*.

Labels stay low-cardinality: ions outside the configured list are counted as ``unknown``, never
with the raw value a client sent; material ids and formulas never become labels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from serving.drift import DriftStats

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: -1 .. 7 V in 0.25 V steps (CONTRACTS.md): fine enough for quantiles of typical 1-5 V cells.
VOLT_BUCKETS = tuple(-1.0 + 0.25 * i for i in range(33))
STAGES = ("parse", "graph", "inference")
RELOAD_RESULTS = ("success", "failure")
UNKNOWN_ION = "unknown"
ALL_IONS = "all"


class ServiceMetrics:
    """All service metrics on one registry; helper methods keep label use consistent."""

    def __init__(self, registry: CollectorRegistry | None = None, ions: Iterable[str] = ()) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.ions = tuple(ions)
        r = self.registry
        self.requests = Counter(
            "voltage_requests_total",
            "Prediction API requests (one per item for predict_batch)",
            ["endpoint", "protocol", "ion", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "voltage_request_duration_seconds",
            "Wall time of one API call, from body received to answer ready",
            ["endpoint", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "voltage_stage_duration_seconds",
            "Time per stage: parse (text to structure), graph (neighbour lists), inference "
            "(collate + forward of one micro-batch), physics (CHGNet cross-check)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predicted = Histogram(
            "voltage_predicted_volts",
            "Predicted average voltages",
            ["ion"],
            buckets=VOLT_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "voltage_errors_total",
            "Requests (or batch items) answered with an error, by kind",
            ["kind", "protocol"],
            registry=r,
        )
        self.model_info = Gauge(
            "voltage_model_info",
            "1 for the registered model version served per ion (0 for versions served before)",
            ["ion", "name", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_version = Gauge(
            "voltage_model_version",
            "Registry version served per ion (0 = none)",
            ["ion"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.model_loaded = Gauge(
            "voltage_model_loaded",
            "1 when a champion model is served for the ion, else 0",
            ["ion"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.reloads = Counter(
            "voltage_model_reloads_total",
            "Model loads (initial and after an alias change) by result",
            ["ion", "result"],
            registry=r,
        )
        self.drift_psi = Gauge(
            "voltage_drift_psi",
            "PSI of the windowed predicted voltages vs. the training reference",
            ["ion"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_unseen = Gauge(
            "voltage_drift_unseen_element_share",
            "Share of windowed requests with elements never seen in the ion's training data",
            ["ion"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_requests = Gauge(
            "voltage_drift_window_requests",
            "Predictions currently in the ion's drift window",
            ["ion"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._info_labels: dict[str, tuple[str, str]] = {}

    # ------------------------------------------------------------------ setup
    def init_ions(self, served: Iterable[str]) -> None:
        """Pre-create per-ion series at 0 so alerts and rates see them before any event."""
        for ion in served:
            for result in RELOAD_RESULTS:
                self.reloads.labels(ion, result)
            self.model_loaded.labels(ion).set(0)
            self.model_version.labels(ion).set(0)

    def ion_label(self, ion: str | None) -> str:
        return ion if ion in self.ions or ion == ALL_IONS else UNKNOWN_ION

    # ------------------------------------------------------------------ requests
    def record_request(
        self,
        endpoint: str,
        protocol: str,
        ion: str | None,
        status: str,
        error_kind: str | None = None,
    ) -> None:
        self.requests.labels(endpoint, protocol, self.ion_label(ion), status).inc()
        if error_kind is not None:
            self.errors.labels(error_kind, protocol).inc()

    def observe_duration(self, endpoint: str, protocol: str, seconds: float) -> None:
        self.request_duration.labels(endpoint, protocol).observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage).observe(seconds)

    def observe_prediction(self, ion: str, volts: float) -> None:
        if math.isfinite(volts):
            self.predicted.labels(self.ion_label(ion)).observe(volts)

    # ------------------------------------------------------------------ models
    def set_model(self, ion: str, name: str | None, version: int | None) -> None:
        """Reflect the model now served for ``ion`` (None: none)."""
        old = self._info_labels.pop(ion, None)
        if old is not None and old != (name, str(version)):
            # Zero, not remove: multiprocess files cannot forget a series, and a 0 also keeps
            # the history readable ("this version was served before").
            self.model_info.labels(ion, *old).set(0)
        if name is None or version is None:
            self.model_loaded.labels(ion).set(0)
            self.model_version.labels(ion).set(0)
            return
        self.model_info.labels(ion, name, str(version)).set(1)
        self._info_labels[ion] = (name, str(version))
        self.model_version.labels(ion).set(version)
        self.model_loaded.labels(ion).set(1)

    def record_reload(self, ion: str, ok: bool) -> None:
        self.reloads.labels(ion, "success" if ok else "failure").inc()

    # ------------------------------------------------------------------ drift
    def set_drift(self, stats: DriftStats) -> None:
        self.drift_requests.labels(stats.ion).set(stats.requests)
        self.drift_psi.labels(stats.ion).set(stats.psi)
        self.drift_unseen.labels(stats.ion).set(stats.unseen_element_share)

    def exposition(self) -> bytes:
        """Text exposition of this registry (single process; BentoML merges workers itself)."""
        return generate_latest(self.registry)
