"""The service's Prometheus metrics (names and labels fixed by docs/CONTRACTS.md).

Why a class on an injectable registry: importing this module registers nothing, so tests and the
command line create as many independent sets as they like; the BentoML worker creates one.

Several workers: BentoML starts each worker with ``PROMETHEUS_MULTIPROC_DIR`` set, so
``prometheus_client`` stores every value in per-process files of that folder (whatever registry
the metric was created on) and BentoML's ``/metrics`` merges them: counters and histograms are
summed over workers; each gauge declares how workers combine (``multiprocess_mode``), chosen so
that the alert rules read the right thing: ``voltage_model_loaded`` is the *minimum* over live
workers (one worker without the model is enough for "no champion"), versions the *maximum*,
the queue depth the *sum*.

Drift across workers: each worker keeps its own window, so a per-worker PSI (and the maximum of
several) is a noisy, upward-biased estimate from a fraction of the traffic. Instead each worker
exports its window as counts that add up (``voltage_drift_window_requests``,
``voltage_drift_window_unseen`` and ``voltage_drift_window_bin{feature, bin}``, all ``livesum``),
and the three drift gauges (``voltage_drift_psi``, ``voltage_drift_sites_psi``,
``voltage_drift_unseen_element_share``) are computed when ``/metrics`` is scraped, from the summed
counts, by :func:`aggregate_drift` (the service's ``__metrics__`` hook): exactly the drift of the
union of the live workers' windows. In one process (no multiprocess folder: the command line,
tests) the gauges are set directly from the window instead; both give the same numbers.

Labels stay low-cardinality: ions outside the configured list are counted as ``unknown``, never
with the raw value a client sent; material ids and formulas never become labels.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from serving.drift import DriftStats, DriftWindow, WindowCounts

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: -1 .. 7 V in 0.25 V steps (CONTRACTS.md): fine enough for quantiles of typical 1-5 V cells.
VOLT_BUCKETS = tuple(-1.0 + 0.25 * i for i in range(33))
STAGES = ("parse", "graph", "inference")
#: ``reason`` label of ``voltage_requests_shed_total``: the prediction queue was full (503) or
#: more HTTP requests were open than BentoML's ``max_concurrency`` (429).
SHED_REASONS = ("queue", "concurrency")
#: Gauges computed at scrape time from the summed window counts (see the module doc).
DRIFT_GAUGES = {
    "voltage_drift_psi": "PSI of the windowed predicted voltages vs. the training reference "
    "(all live workers' windows together)",
    "voltage_drift_sites_psi": "PSI of the windowed structures' site counts vs. the training "
    "reference (all live workers' windows together)",
    "voltage_drift_unseen_element_share": "Share of windowed requests with elements never seen "
    "in the ion's training data (all live workers' windows together)",
}
RELOAD_RESULTS = ("success", "failure")
UNKNOWN_ION = "unknown"
ALL_IONS = "all"


class ServiceMetrics:
    """All service metrics on one registry; helper methods keep label use consistent."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        ions: Iterable[str] = (),
        aggregate_drift_at_scrape: bool | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.ions = tuple(ions)
        if aggregate_drift_at_scrape is None:
            aggregate_drift_at_scrape = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        #: True under BentoML (several processes): drift gauges come from :func:`aggregate_drift`.
        self.aggregate_drift_at_scrape = aggregate_drift_at_scrape
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
        self.shed = Counter(
            "voltage_requests_shed_total",
            "Requests refused at once to keep the service responsive (queue full: 503, "
            "too many open HTTP requests: 429)",
            ["protocol", "reason"],
            registry=r,
        )
        self.queue_items = Gauge(
            "voltage_queue_items",
            "Structures admitted and not yet answered (summed over workers)",
            [],
            registry=r,
            multiprocess_mode="livesum",
        )
        # Set only in one process; under BentoML the scrape computes them (aggregate_drift).
        self.drift_psi = Gauge(
            "voltage_drift_psi", DRIFT_GAUGES["voltage_drift_psi"], ["ion"], registry=r,
            multiprocess_mode="livemax",
        )  # fmt: skip
        self.drift_sites_psi = Gauge(
            "voltage_drift_sites_psi", DRIFT_GAUGES["voltage_drift_sites_psi"], ["ion"],
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.drift_unseen = Gauge(
            "voltage_drift_unseen_element_share",
            DRIFT_GAUGES["voltage_drift_unseen_element_share"],
            ["ion"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_requests = Gauge(
            "voltage_drift_window_requests",
            "Predictions currently in the ion's drift windows (summed over workers)",
            ["ion"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.drift_window_unseen = Gauge(
            "voltage_drift_window_unseen",
            "Windowed predictions whose structure has an element unseen in training (summed)",
            ["ion"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.drift_window_bins = Gauge(
            "voltage_drift_window_bin",
            "Windowed predictions per reference bin (feature voltage or sites; bin = index into "
            "the drift reference's edges), summed over workers",
            ["ion", "feature", "bin"],
            registry=r,
            multiprocess_mode="livesum",
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
    def set_drift(self, stats: DriftStats, counts: WindowCounts | None = None) -> None:
        """Export one ion's window: its counts always (they add up over workers), the drift
        gauges only in a single process (else :func:`aggregate_drift` computes them)."""
        self.drift_requests.labels(stats.ion).set(stats.requests)
        if counts is not None:
            self.drift_window_unseen.labels(stats.ion).set(counts.unseen)
            for feature, binned in (("voltage", counts.voltage), ("sites", counts.sites)):
                for i, c in enumerate(binned):
                    self.drift_window_bins.labels(stats.ion, feature, str(i)).set(c)
        if not self.aggregate_drift_at_scrape:
            self.drift_psi.labels(stats.ion).set(stats.psi)
            self.drift_sites_psi.labels(stats.ion).set(stats.sites_psi)
            self.drift_unseen.labels(stats.ion).set(stats.unseen_element_share)

    # ------------------------------------------------------------------ load shedding
    def record_shed(self, protocol: str, reason: str) -> None:
        self.shed.labels(protocol, reason).inc()

    def set_queue_items(self, n: int) -> None:
        self.queue_items.set(n)

    def exposition(self) -> bytes:
        """Text exposition of this registry (single process; BentoML merges workers itself)."""
        return generate_latest(self.registry)


_SAMPLE = re.compile(r'^(voltage_drift_window_(?:requests|unseen|bin))\{([^}]*)\}\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def aggregate_drift(text: str, drift: DriftWindow | None) -> str:
    """Append the drift gauges computed from the workers' summed window counts to a merged
    ``/metrics`` exposition (see the module doc). Ions without a windowed prediction get no
    series; ions below the minimum window get NaN (no data), as in one process."""
    if drift is None:
        return text
    from serving.drift import WindowCounts

    requests: dict[str, float] = {}
    unseen: dict[str, float] = {}
    bins: dict[tuple[str, str], dict[int, float]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, raw_labels, raw_value = m.groups()
        labels = dict(_LABEL.findall(raw_labels))
        ion, value = labels.get("ion"), float(raw_value)
        if ion is None:
            continue
        if name == "voltage_drift_window_requests":
            requests[ion] = value
        elif name == "voltage_drift_window_unseen":
            unseen[ion] = value
        else:
            bins.setdefault((ion, labels.get("feature", "")), {})[int(labels.get("bin", 0))] = value
    lines: dict[str, list[str]] = {name: [] for name in DRIFT_GAUGES}
    for ion in sorted(requests):
        if ion not in drift.ions or requests[ion] <= 0:
            continue

        def binned(feature: str, ion: str = ion) -> tuple[int, ...]:
            found = bins.get((ion, feature), {})
            k = len(drift.reference(ion)[feature]["fractions"])
            return tuple(int(found.get(i, 0)) for i in range(k))

        counts = WindowCounts(ion, int(requests[ion]), int(unseen.get(ion, 0)),
                              binned("voltage"), binned("sites"))  # fmt: skip
        stats = drift.stats_of(counts)
        for name, value in (("voltage_drift_psi", stats.psi),
                            ("voltage_drift_sites_psi", stats.sites_psi),
                            ("voltage_drift_unseen_element_share", stats.unseen_element_share)):
            lines[name].append(f'{name}{{ion="{ion}"}} {_number(value)}')  # fmt: skip
    extra = []
    for name, help_text in DRIFT_GAUGES.items():
        if lines[name]:
            extra += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", *lines[name]]
    if not extra:
        return text
    block = "\n".join(extra) + "\n"
    if text.rstrip().endswith("# EOF"):  # OpenMetrics: families go before the end marker
        head = text.rstrip()[: -len("# EOF")]
        return head + block + "# EOF\n"
    return (text if text.endswith("\n") or not text else text + "\n") + block
