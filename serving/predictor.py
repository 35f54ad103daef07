"""The predictor: one served model per ion, structures in, voltages with uncertainty out.

Shared by the BentoML HTTP API, the gRPC server and ``voltage-serve predict`` (no BentoML or gRPC
import here), so the three answer identically. A request goes through:

1. ion check (configured, not disabled, has a model) -> ``unknown_ion`` / ``no_champion``;
2. parse + checks (:mod:`serving.inputs`) -> the structure kinds of ``voltage_model.structures``;
3. graph with the converter stored in *that* model's checkpoint (never current settings);
   with a ``discharged_structure``, also its CHGNet physics voltage
   (:mod:`voltage_model.models.physics`) -> ``physics`` when the pair is refused;
4. inference in the process-wide :class:`~serving.batching.MicroBatcher`.

Before step 1 a request must be admitted (:class:`~serving.batching.Admission`): at most
``VOLTAGE_MAX_QUEUE`` structures per worker are being answered at once; beyond that the request
is shed at once with an ``overloaded`` error (HTTP 503 + ``Retry-After``, gRPC
RESOURCE_EXHAUSTED) instead of waiting in an unbounded queue until the client gives up.

Model swaps are atomic: :meth:`Predictor.set_model` replaces the ion's immutable
:class:`~serving.models.ServedModel` in a dict; a request reads it once, at step 1, and keeps
that object until its answer, so requests in flight finish on the old model.

The predictor counts requests, errors, stage times and predictions on :class:`ServiceMetrics`,
feeds the drift window and the prediction log (:mod:`serving.predlog`), and notes ion, model
version and error kind on the current request (:mod:`serving.logs`) for its access log line;
the transports only add their own latency histogram.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from serving import logs
from serving.batching import Admission, MicroBatcher
from serving.config import ServingConfig
from serving.drift import DriftWindow, element_symbols
from serving.errors import ServingError, internal
from serving.inputs import to_structure
from serving.lookup import MaterialLookup
from serving.metrics import ServiceMetrics
from serving.models import ServedModel
from serving.predlog import PredictionLog, structure_hash

logger = logging.getLogger(__name__)

#: How often (seconds) drift gauges of one ion are recomputed at most: on the request path for
#: the first prediction after a quiet second, else by the predictor's drift thread, which also
#: exports the last predictions of a burst (the window must not look frozen after traffic stops).
DRIFT_REFRESH_S = 1.0


@dataclass(frozen=True)
class PredictRequest:
    """One prediction request, as received (fields unchecked)."""

    ion: str | None = None
    structure: str | dict[str, Any] | None = None
    format: str | None = None
    material_id: str | None = None
    explain: bool = False
    discharged_structure: str | dict[str, Any] | None = None
    discharged_format: str | None = None

    @classmethod
    def from_mapping(cls, data: Any) -> PredictRequest:
        """From a JSON object; wrong field types become a ``parse`` error naming the field."""
        if not isinstance(data, dict):
            raise ServingError("parse", "each item must be a JSON object")
        for key in ("ion", "format", "material_id", "discharged_format"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ServingError("parse", f"'{key}' must be a string")
        for key in ("structure", "discharged_structure"):
            if data.get(key) is not None and not isinstance(data[key], str | dict):
                raise ServingError("parse", f"'{key}' must be a string (or a JSON object)")
        explain = data.get("explain")
        if explain is not None and not isinstance(explain, bool):
            raise ServingError("parse", "'explain' must be true or false")
        return cls(
            data.get("ion"), data.get("structure"), data.get("format"), data.get("material_id"),
            bool(explain), data.get("discharged_structure"), data.get("discharged_format"),
        )  # fmt: skip


@dataclass(frozen=True)
class PredictResult:
    """One answered prediction (the HTTP JSON and the gRPC message carry the same fields)."""

    ion: str
    voltage: float
    uncertainty: float
    model_name: str
    model_version: int
    model_source: str
    formula: str
    n_sites: int
    unseen_elements: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    material_id: str | None = None
    reference_voltage: float | None = None
    local_voltages: tuple[dict[str, Any], ...] | None = None
    physics_voltage: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "ion": self.ion,
            "voltage": self.voltage,
            "uncertainty": self.uncertainty,
            "model": {
                "name": self.model_name,
                "version": self.model_version,
                "source": self.model_source,
            },
            "formula": self.formula,
            "n_sites": self.n_sites,
            "unseen_elements": list(self.unseen_elements),
            "warnings": list(self.warnings),
            "material_id": self.material_id,
            "reference_voltage": self.reference_voltage,
        }
        out["local_voltages"] = None if self.local_voltages is None else list(self.local_voltages)
        out["physics_voltage"] = self.physics_voltage
        return out


Outcome = PredictResult | ServingError


@dataclass
class _Prepared:
    ion: str
    served: ServedModel
    structure: Any
    graph: Any
    material_id: str | None
    timings: dict[str, float] = field(default_factory=dict)
    explain: bool = False
    physics_voltage: float | None = None


class Predictor:
    """Holds the served models and answers prediction requests (thread- and task-safe)."""

    def __init__(
        self,
        config: ServingConfig,
        metrics: ServiceMetrics | None = None,
        drift: DriftWindow | None = None,
        lookup: MaterialLookup | None = None,
        predictions: PredictionLog | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or ServiceMetrics(ions=config.ions)
        self.drift = drift
        self.predictions = predictions
        self.lookup = lookup or MaterialLookup(config.records_path)
        self.admission = Admission(config.max_queue, on_change=self.metrics.set_queue_items)
        self._models: dict[str, ServedModel] = {}
        self._by_lower = {ion.lower(): ion for ion in config.ions}
        self._heads: dict[tuple[str, int, str], Any] = {}
        self._drift_refreshed: dict[str, float] = {}
        self._drift_dirty: set[str] = set()
        self._drift_stop = threading.Event()
        self._drift_thread: threading.Thread | None = None
        self._drift_export = threading.Lock()  # one export at a time: a later one never loses
        self._parsers_warm = False
        self._lock = threading.Lock()
        self.batcher = MicroBatcher(
            self._infer,
            max_batch=config.batch_max_size,
            max_wait_s=config.batch_max_wait_ms / 1000.0,
            on_batch=lambda n, s: self.metrics.observe_stage("inference", s),
        )
        self.metrics.init_ions(config.enabled_ions)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Predictor:
        self.batcher.start()
        if self.drift is not None and self._drift_thread is None:
            self._drift_stop.clear()
            self._drift_thread = threading.Thread(
                target=self._drift_loop, name="voltage-drift", daemon=True
            )
            self._drift_thread.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()
        self._drift_stop.set()
        if self._drift_thread is not None:
            self._drift_thread.join(5)
            self._drift_thread = None
        if self.predictions is not None:
            self.predictions.close()

    # ------------------------------------------------------------------ models
    def warm(self, served: ServedModel) -> None:
        """Run the parsers (once) and ``served`` on a tiny crystal so the first real request is
        not slow (lazy imports in pymatgen, first torch call), and look up its local-voltage
        head: the lookup may ask the registry, which must happen here (the watcher's thread), not
        on the event loop that answers requests. Not counted in any metric."""
        from pymatgen.core import Lattice, Structure
        from pymatgen.io.cif import CifWriter

        s = Structure(Lattice.cubic(4.2), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
        if not self._parsers_warm:
            for fmt, text in (("cif", str(CifWriter(s))), ("poscar", s.to(fmt="poscar"))):
                to_structure(text, fmt, self.config.max_sites)
            self._parsers_warm = True
        served.model.predict_graphs([served.model.prepare(s)])
        self._local_head(served)

    def set_model(self, ion: str, served: ServedModel | None) -> None:
        """Atomically replace the model served for ``ion`` (None: serve nothing)."""
        if ion not in self.config.ions:
            raise ValueError(f"ion {ion!r} is not configured")
        with self._lock:
            old = self._models.get(ion)
            if served is None:
                self._models.pop(ion, None)
            else:
                self._models[ion] = served
        if served is None:
            self.metrics.set_model(ion, None, None)
        else:
            self.metrics.set_model(ion, served.name, served.version)
        if self.drift is not None and old is not served:
            self.drift.clear(ion)  # the window describes one model's predictions
            with self._lock:
                self._drift_dirty.add(ion)

    def model_for(self, ion: str) -> ServedModel | None:
        return self._models.get(ion)

    def models(self) -> dict[str, ServedModel]:
        return dict(self._models)

    def ready(self) -> bool:
        """Every configured, enabled ion has a model (disabled ions do not count)."""
        return all(ion in self._models for ion in self.config.enabled_ions)

    def missing(self) -> list[str]:
        return [ion for ion in self.config.enabled_ions if ion not in self._models]

    def list_models(self) -> list[dict[str, Any]]:
        out = []
        for ion in self.config.ions:
            served = self._models.get(ion)
            out.append(
                {
                    "ion": ion,
                    "loaded": served is not None,
                    "disabled": ion in self.config.disabled_ions,
                    "model": served.describe() if served is not None else None,
                }
            )
        return out

    # ------------------------------------------------------------------ steps
    def resolve_ion(self, ion: str | None) -> tuple[str, ServedModel]:
        if ion is None or not str(ion).strip():
            raise ServingError(
                "unknown_ion", f"'ion' is missing; use one of {', '.join(self.config.ions)}"
            )
        name = self._by_lower.get(str(ion).strip().lower())
        if name is None:
            shown = str(ion)[:20]
            raise ServingError(
                "unknown_ion",
                f"unknown ion {shown!r}; this service serves {', '.join(self.config.ions)}",
            )
        if name in self.config.disabled_ions:
            raise ServingError("no_champion", f"ion {name} is disabled on this service")
        served = self._models.get(name)
        if served is None:
            raise ServingError(
                "no_champion",
                f"no champion model for ion {name}: registered model "
                f"{self.config.model_name(name)} has no loadable 'champion' version",
            )
        return name, served

    def _structure_input(self, req: PredictRequest) -> tuple[Any, str | None, str | None]:
        """(structure, format, material_id): the request's own, or the snapshot's."""
        if req.material_id is None or not str(req.material_id).strip():
            return req.structure, req.format, None
        mid = str(req.material_id).strip()
        has_structure = req.structure is not None and not (
            isinstance(req.structure, str) and not req.structure.strip()
        )
        if has_structure:
            raise ServingError("format", "give either 'structure' or 'material_id', not both")
        if not self.lookup.available:
            raise ServingError(
                "format",
                "lookup by material_id is not available on this service (no snapshot records "
                f"at {self.config.records_path}); send the structure instead",
            )
        text = self.lookup.structure_json(mid)
        if text is None:
            raise ServingError("parse", f"unknown material id {mid[:40]!r} (not in the snapshot)")
        return text, "json", mid

    def prepare(self, req: PredictRequest) -> _Prepared:
        """Steps 1-3 (CPU work; call from a worker thread in async code)."""
        ion, served = self.resolve_ion(req.ion)
        structure, fmt, material_id = self._structure_input(req)
        if isinstance(structure, str) and len(structure) > self.config.max_body_bytes:
            raise ServingError(
                "too_large",
                f"structure text is {len(structure)} bytes; the limit is "
                f"{self.config.max_body_bytes}",
            )
        t0 = time.perf_counter()
        parsed = to_structure(structure, fmt, self.config.max_sites)
        t1 = time.perf_counter()
        graph = served.model.prepare(parsed)  # CGCNN graph, and CHGNet's when served
        t2 = time.perf_counter()
        self.metrics.observe_stage("parse", t1 - t0)
        self.metrics.observe_stage("graph", t2 - t1)
        physics = self._physics_voltage(ion, parsed, req)
        return _Prepared(ion, served, parsed, graph, material_id, {"parse": t1 - t0},
                         explain=req.explain, physics_voltage=physics)  # fmt: skip

    def _physics_voltage(self, ion: str, charged: Any, req: PredictRequest) -> float | None:
        """The CHGNet voltage of charged -> ``discharged_structure`` when one is given (format
        defaults like ``format``); a refused pair is a ``physics`` error naming the problem."""
        text = req.discharged_structure
        if text is None or (isinstance(text, str) and not text.strip()):
            return None
        if isinstance(text, str) and len(text) > self.config.max_body_bytes:
            raise ServingError("too_large", f"discharged structure text is {len(text)} bytes; "
                               f"the limit is {self.config.max_body_bytes}")  # fmt: skip
        try:
            discharged = to_structure(text, req.discharged_format or req.format,
                                      self.config.max_sites)  # fmt: skip
        except ServingError as exc:
            raise ServingError(exc.kind, f"discharged structure: {exc.message}") from None
        from voltage_model.models.physics import PhysicsError, physics_voltage

        t0 = time.perf_counter()
        try:
            voltage = physics_voltage(charged, discharged, ion).voltage
        except PhysicsError as exc:
            raise ServingError("physics", str(exc)) from None
        self.metrics.observe_stage("physics", time.perf_counter() - t0)
        return voltage

    def _infer(self, served: ServedModel, graphs: Sequence[Any]) -> tuple[Any, Any]:
        return served.model.predict_graphs(graphs)

    def finish(self, prep: _Prepared, voltage: float, uncertainty: float) -> PredictResult:
        """Build the answer, and feed metrics and drift."""
        if not (math.isfinite(voltage) and math.isfinite(uncertainty)):
            raise ServingError("internal", "the model returned a non-finite prediction")
        unseen = prep.served.model.unseen(prep.structure)
        warnings = ()
        if unseen:
            warnings = (
                f"elements never seen in the {prep.ion} training data: {', '.join(unseen)}; "
                "the prediction is an extrapolation",
            )
        self.metrics.observe_prediction(prep.ion, voltage)
        self._observe_drift(prep, voltage)
        ctx = logs.current()
        if ctx is not None:
            ctx.note_prediction(prep.ion, prep.served.version)
        ref = None
        if prep.material_id is not None:
            ref = self.lookup.voltage(prep.material_id, prep.ion)
        local = None
        if prep.explain:
            local, note = self._explain(prep)
            if note:
                warnings = (*warnings, note)
        result = PredictResult(
            ion=prep.ion,
            voltage=voltage,
            uncertainty=uncertainty,
            model_name=prep.served.name,
            model_version=prep.served.version,
            model_source=prep.served.source,
            formula=prep.structure.composition.reduced_formula,
            n_sites=len(prep.structure),
            unseen_elements=unseen,
            warnings=warnings,
            material_id=prep.material_id,
            reference_voltage=ref,
            local_voltages=local,
            physics_voltage=prep.physics_voltage,
        )
        if self.predictions is not None:
            self._log_prediction(prep, result, ctx)
        return result

    def _log_prediction(
        self, prep: _Prepared, r: PredictResult, ctx: logs.RequestContext | None
    ) -> None:
        """One line of the prediction log; a failure to write never fails the answer."""
        try:
            self.predictions.write({  # type: ignore[union-attr]
                "request_id": ctx.request_id if ctx is not None else None,
                "protocol": ctx.protocol if ctx is not None else None,
                "endpoint": ctx.endpoint if ctx is not None else None,
                "ion": r.ion, "model": r.model_name, "version": r.model_version,
                "source": r.model_source, "structure_sha256": structure_hash(prep.structure),
                "formula": r.formula, "n_sites": r.n_sites, "voltage": r.voltage,
                "uncertainty": r.uncertainty, "unseen_elements": list(r.unseen_elements),
                "material_id": r.material_id,
            })  # fmt: skip
        except Exception:
            logger.exception("writing the prediction log failed")

    def _local_head(self, served: ServedModel) -> Any:
        """The ion's local-voltage head (paper Eq. 2) for the served version, looked up once per
        version (``serving.local_heads``: the sidecar, else the registry); a head fitted on
        other backbones is refused, not misapplied."""
        from serving.local_heads import find_head

        key = (served.ion, served.version, served.source)
        if key not in self._heads:
            try:
                uri = self.config.tracking_uri or None
                self._heads[key] = find_head(self.config.local_voltage_dir, uri, served)
            except (OSError, ValueError, LookupError) as exc:
                self._heads[key] = str(exc)
        return self._heads[key]

    def _explain(self, prep: _Prepared) -> tuple[tuple[dict[str, Any], ...] | None, str | None]:
        from voltage_model.local_voltage import explain_graph

        head = self._local_head(prep.served)
        if isinstance(head, str):
            return None, f"local voltages unavailable: {head}"
        return tuple(explain_graph(prep.served.model, prep.structure, prep.graph, head)), None

    def _observe_drift(self, prep: _Prepared, voltage: float) -> None:
        if self.drift is None:
            return
        elements = element_symbols(prep.structure)
        if not self.drift.observe(prep.ion, voltage, elements, len(prep.structure)):
            return
        now = time.monotonic()
        if now - self._drift_refreshed.get(prep.ion, -math.inf) >= DRIFT_REFRESH_S:
            self._drift_refreshed[prep.ion] = now
            self.refresh_drift(prep.ion)
        else:
            with self._lock:
                self._drift_dirty.add(prep.ion)

    def _drift_loop(self) -> None:
        """Export the windows of ions with predictions not yet exported, once a second."""
        while not self._drift_stop.wait(DRIFT_REFRESH_S):
            with self._lock:
                dirty, self._drift_dirty = self._drift_dirty, set()
            for ion in dirty:
                try:
                    self._drift_refreshed[ion] = time.monotonic()
                    self.refresh_drift(ion)
                except Exception:
                    logger.exception("drift refresh for %s failed", ion)

    def refresh_drift(self, ion: str | None = None) -> None:
        """Recompute drift gauges (one ion, or all reference ions that are served)."""
        if self.drift is None:
            return
        ions = [ion] if ion is not None else [i for i in self.drift.ions if i in self.config.ions]
        for name in ions:
            with self._drift_export:
                try:
                    counts = self.drift.counts(name)
                except KeyError:
                    continue
                self.metrics.set_drift(self.drift.stats_of(counts), counts)

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, endpoint: str, protocol: str, ion: Any, outcome: Outcome) -> None:
        ion_label = ion if isinstance(ion, str) else None
        if ion_label is not None:
            ion_label = self._by_lower.get(ion_label.strip().lower(), ion_label)
        ctx = logs.current()
        if isinstance(outcome, ServingError):
            self.metrics.record_request(
                endpoint, protocol, ion_label, outcome.status_label, outcome.kind
            )
            if ctx is not None:
                ctx.note_error(outcome.kind)
                if ion_label in self.config.ions:
                    ctx.note_ion(ion_label)
        else:
            self.metrics.record_request(endpoint, protocol, outcome.ion, "ok")

    # ------------------------------------------------------------------ admission
    def _admit(self, n: int, protocol: str) -> None:
        """Admit ``n`` structures or raise ``overloaded`` (counted as shed, not yet as a request:
        the caller settles it like any other outcome)."""
        if self.admission.try_admit(n):
            return
        self.metrics.record_shed(protocol, "queue")
        raise self.overloaded()

    def overloaded(self) -> ServingError:
        """The error of a shed request (also used by the HTTP guard's pre-check)."""
        return ServingError(
            "overloaded",
            f"the service is at capacity ({self.admission.limit} structures queued per worker); "
            f"retry in {self.config.retry_after_s:g} s",
            retry_after=self.config.retry_after_s,
        )

    def _submit(self, req: PredictRequest) -> tuple[_Prepared, Future[tuple[float, float]]]:
        try:
            prep = self.prepare(req)
            return prep, self.batcher.submit(prep.served, prep.graph)
        finally:
            self.batcher.arrived()

    def _prepare_many(
        self, reqs: Sequence[PredictRequest]
    ) -> list[tuple[_Prepared, Future[tuple[float, float]]] | ServingError]:
        """Prepare every item, then queue all graphs at once (one micro-batch if they fit)."""
        prepared: list[_Prepared | ServingError] = []
        try:
            for req in reqs:
                try:
                    prepared.append(self.prepare(req))
                except ServingError as exc:
                    prepared.append(exc)
                except Exception as exc:
                    logger.exception("preparing a batch item failed")
                    prepared.append(internal(exc))
        finally:
            self.batcher.arrived()
        out: list[tuple[_Prepared, Future[tuple[float, float]]] | ServingError] = []
        for p in prepared:
            out.append(
                p if isinstance(p, ServingError) else (p, self.batcher.submit(p.served, p.graph))
            )
        return out

    @staticmethod
    def _failure(exc: Exception) -> ServingError:
        """A request's exception as its outcome: bad input as is, anything else as internal."""
        if isinstance(exc, ServingError):
            return exc
        logger.exception("prediction failed")
        return internal(exc)

    def _settle(
        self, endpoint: str, protocol: str, req: PredictRequest, outcome: Outcome
    ) -> PredictResult:
        """Count the outcome, then return the result or raise the error."""
        self._record(endpoint, protocol, req.ion, outcome)
        if isinstance(outcome, ServingError):
            raise outcome
        return outcome

    def _outcome(self, prep: _Prepared, fut_result: Any) -> Outcome:
        try:
            voltage, uncertainty = fut_result
            return self.finish(prep, voltage, uncertainty)
        except ServingError as exc:
            return exc
        except Exception as exc:
            logger.exception("finishing a prediction failed")
            return internal(exc)

    # ------------------------------------------------------------------ async API
    async def predict(
        self, req: PredictRequest, endpoint: str = "predict", protocol: str = "http"
    ) -> PredictResult:
        """One prediction; raises ServingError (already counted) on failure."""
        try:
            self._admit(1, protocol)
        except ServingError as exc:
            return self._settle(endpoint, protocol, req, exc)
        try:
            self.batcher.expect()
            try:
                prep, fut = await asyncio.to_thread(self._submit, req)
                result = await asyncio.wrap_future(fut)
                outcome = self._outcome(prep, result)
            except Exception as exc:
                outcome = self._failure(exc)
        finally:
            self.admission.release(1)
        return self._settle(endpoint, protocol, req, outcome)

    async def predict_many(
        self,
        reqs: Sequence[PredictRequest | ServingError],
        endpoint: str = "predict_batch",
        protocol: str = "http",
    ) -> list[Outcome]:
        """Many predictions in order; a failed item is a ServingError in its slot. A batch the
        queue cannot take is refused whole: raises ``overloaded`` (every item counted)."""
        todo = [r for r in reqs if isinstance(r, PredictRequest)]
        try:
            self._admit(len(todo), protocol)
        except ServingError as exc:
            for req in reqs:
                self._record(endpoint, protocol, getattr(req, "ion", None), exc)
            raise
        try:
            return await self._predict_admitted(reqs, todo, endpoint, protocol)
        finally:
            self.admission.release(len(todo))

    async def _predict_admitted(
        self,
        reqs: Sequence[PredictRequest | ServingError],
        todo: list[PredictRequest],
        endpoint: str,
        protocol: str,
    ) -> list[Outcome]:
        self.batcher.expect()
        staged = iter(await asyncio.to_thread(self._prepare_many, todo))
        results: list[Outcome] = []
        for req in reqs:
            if isinstance(req, ServingError):
                results.append(req)
                continue
            item = next(staged)
            if isinstance(item, ServingError):
                results.append(item)
                continue
            prep, fut = item
            try:
                value = await asyncio.wrap_future(fut)
            except Exception as exc:
                logger.exception("batch item inference failed")
                results.append(internal(exc))
                continue
            results.append(self._outcome(prep, value))
        for req, outcome in zip(reqs, results, strict=True):
            ion = req.ion if isinstance(req, PredictRequest) else None
            self._record(endpoint, protocol, ion, outcome)
        return results

    # ------------------------------------------------------------------ sync API
    def predict_sync(
        self, req: PredictRequest, endpoint: str = "predict", protocol: str = "local"
    ) -> PredictResult:
        """Blocking variant (command line, tests); same behaviour as :meth:`predict`."""
        try:
            self._admit(1, protocol)
        except ServingError as exc:
            return self._settle(endpoint, protocol, req, exc)
        try:
            self.batcher.expect()
            try:
                prep, fut = self._submit(req)
                outcome = self._outcome(prep, fut.result())
            except Exception as exc:
                outcome = self._failure(exc)
        finally:
            self.admission.release(1)
        return self._settle(endpoint, protocol, req, outcome)
