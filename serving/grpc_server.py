"""The gRPC face of the predictor (``serving/voltage.proto``), with health and reflection.

Why in the BentoML process: one set of loaded models, one micro-batcher and one metrics
registry serve both protocols, so HTTP and gRPC answers are identical and Prometheus needs one
target. The ``grpc.aio`` server runs on the worker's event loop (started from the service's
``on_startup`` hook); with several workers each binds the same port (``SO_REUSEPORT``) and the
kernel spreads connections.

Errors: status code from :class:`serving.errors.ServingError` (INVALID_ARGUMENT, UNAVAILABLE,
RESOURCE_EXHAUSTED when the prediction queue is full, INTERNAL), details = the message, and
trailing metadata ``voltage-error-kind`` plus ``voltage-error-bin`` (a serialised ``Error``,
with ``request_id``) for clients that want the structured form; a shed call also carries
``grpc-retry-pushback-ms`` and ``retry-after`` (seconds).

Request ids: a call's ``x-request-id`` metadata (when it looks like an id) or a new one; it is
returned as trailing metadata ``x-request-id`` on every answer, and the call's JSON access line
(:mod:`serving.logs`: method, status code, ion, model version, latency, error kind) carries it.
Standard health checking reports SERVING only while every configured ion has a model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import logs, voltage_pb2, voltage_pb2_grpc
from serving.errors import ServingError
from serving.predictor import Predictor, PredictRequest, PredictResult

logger = logging.getLogger(__name__)

SERVICE_NAME = voltage_pb2.DESCRIPTOR.services_by_name["VoltageService"].full_name
PROTOCOL = "grpc"


def _request(msg: voltage_pb2.PredictRequest) -> PredictRequest:
    """Proto3 has no null: empty strings mean "not given"."""
    return PredictRequest(
        ion=msg.ion or None,
        structure=msg.structure or None,
        format=msg.format or None,
        material_id=msg.material_id or None,
        explain=msg.explain,
        discharged_structure=msg.discharged_structure or None,
        discharged_format=msg.discharged_format or None,
    )


def prediction_message(r: PredictResult) -> voltage_pb2.Prediction:
    msg = voltage_pb2.Prediction(
        ion=r.ion,
        voltage=r.voltage,
        uncertainty=r.uncertainty,
        model=voltage_pb2.ModelRef(
            name=r.model_name, version=r.model_version, source=r.model_source
        ),
        formula=r.formula,
        n_sites=r.n_sites,
        unseen_elements=list(r.unseen_elements),
        warnings=list(r.warnings),
        material_id=r.material_id or "",
    )
    if r.reference_voltage is not None:
        msg.reference_voltage = r.reference_voltage
    if r.physics_voltage is not None:
        msg.physics_voltage = r.physics_voltage
    for site in r.local_voltages or ():
        msg.local_voltages.add(
            site=site["site"], element=site["element"], local_voltage=site["local_voltage"]
        )
    return msg


def error_message(e: ServingError, request_id: str = "") -> voltage_pb2.Error:
    return voltage_pb2.Error(
        kind=e.kind, message=e.message, http_status=e.http_status, request_id=request_id
    )


class VoltageServicer(voltage_pb2_grpc.VoltageServiceServicer):
    """Translates between proto messages and the predictor; records gRPC latency, logs one
    access line per call and returns the call's request id (``x-request-id`` trailing metadata,
    and ``Error.request_id``)."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.metrics = predictor.metrics

    @staticmethod
    def _context(context: grpc.aio.ServicerContext, endpoint: str) -> logs.RequestContext:
        sent = None
        for key, value in context.invocation_metadata() or ():
            if key == logs.REQUEST_ID_KEY:
                sent = value
        return logs.RequestContext(logs.request_id_from(sent), PROTOCOL, endpoint)

    async def _abort(
        self, context: grpc.aio.ServicerContext, e: ServingError, request_id: str
    ) -> None:
        metadata: list[tuple[str, str | bytes]] = [
            (logs.REQUEST_ID_KEY, request_id),
            ("voltage-error-kind", e.kind),
            ("voltage-error-bin", error_message(e, request_id).SerializeToString()),
        ]
        if e.retry_after_header is not None:
            # The standard pushback key (honoured by gRPC's retry policy) and a plain one.
            metadata.append(("grpc-retry-pushback-ms", str(int(float(e.retry_after) * 1000))))
            metadata.append(("retry-after", e.retry_after_header))
        await context.abort(
            getattr(grpc.StatusCode, e.grpc_code_name), e.message, trailing_metadata=tuple(metadata)
        )

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        endpoint: str,
        method: str,
        work: Callable[[logs.RequestContext], Awaitable[Any]],
    ) -> Any:
        """Run one call: bind its request context, answer or abort, record latency, log."""
        ctx = self._context(context, endpoint)
        status = "OK"
        with logs.bound(ctx):
            try:
                msg = await work(ctx)
            except ServingError as e:
                status = e.grpc_code_name
                ctx.note_error(e.kind)
                await self._abort(context, e, ctx.request_id)
                raise  # abort raises; this keeps type checkers aware
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except Exception:
                if status == "OK":  # not the abort of a ServingError: a bug
                    status = "INTERNAL"
                    ctx.note_error("internal")
                    logger.exception("gRPC %s failed", method)
                raise
            finally:
                self.metrics.observe_duration(endpoint, PROTOCOL, ctx.elapsed_ms() / 1000.0)
                logs.access_line(ctx, status, method=method)
        context.set_trailing_metadata(((logs.REQUEST_ID_KEY, ctx.request_id),))
        return msg

    async def Predict(
        self, request: voltage_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.Prediction:
        async def work(ctx: logs.RequestContext) -> voltage_pb2.Prediction:
            result = await self.predictor.predict(_request(request), "predict", PROTOCOL)
            return prediction_message(result)

        return await self._answer(context, "predict", "Predict", work)

    async def PredictBatch(
        self, request: voltage_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.PredictBatchResponse:
        async def work(ctx: logs.RequestContext) -> voltage_pb2.PredictBatchResponse:
            ctx.items = len(request.items)
            config = self.predictor.config
            size = sum(
                len(item.structure) + len(item.discharged_structure) for item in request.items
            )
            problem = None
            if len(request.items) > config.max_batch_items:
                problem = (
                    f"batch has {len(request.items)} items; the limit is {config.max_batch_items}"
                )
            elif size > config.max_body_bytes:
                problem = (
                    f"batch structures total {size} bytes; the limit is {config.max_body_bytes}"
                )
            if problem is not None:
                e = ServingError("too_large", problem)
                self.metrics.record_request(
                    "predict_batch", PROTOCOL, None, e.status_label, e.kind
                )
                raise e
            outcomes = await self.predictor.predict_many(
                [_request(item) for item in request.items], "predict_batch", PROTOCOL
            )
            results = []
            for i, out in enumerate(outcomes):
                if isinstance(out, ServingError):
                    results.append(voltage_pb2.BatchResult(index=i, error=error_message(out)))
                else:
                    results.append(
                        voltage_pb2.BatchResult(index=i, prediction=prediction_message(out))
                    )
            return voltage_pb2.PredictBatchResponse(results=results)

        return await self._answer(context, "predict_batch", "PredictBatch", work)

    async def ListModels(
        self, request: voltage_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.ListModelsResponse:
        async def work(ctx: logs.RequestContext) -> voltage_pb2.ListModelsResponse:
            statuses = []
            for row in self.predictor.list_models():
                st = voltage_pb2.ModelStatus(
                    ion=row["ion"], loaded=row["loaded"], disabled=row["disabled"]
                )
                m = row["model"]
                if m is not None:
                    st.model.CopyFrom(voltage_pb2.ModelRef(name=m["name"], version=m["version"],
                                                           source=m["source"]))  # fmt: skip
                    st.run_id = m["run_id"] or ""
                    st.loaded_at = m["loaded_at"]
                    st.backbone = m.get("backbone", "cgcnn")
                    if m["test_mae"] is not None:
                        st.test_mae = m["test_mae"]
                statuses.append(st)
            self.metrics.record_request("models", PROTOCOL, "all", "ok")
            return voltage_pb2.ListModelsResponse(models=statuses)

        return await self._answer(context, "models", "ListModels", work)


class GrpcServer:
    """A ``grpc.aio`` server around one predictor; start/stop from async code."""

    def __init__(
        self, predictor: Predictor, host: str = "127.0.0.1", port: int = 50051,
        max_message_bytes: int | None = None,
    ) -> None:  # fmt: skip
        self.predictor = predictor
        self.address = f"{host}:{port}"
        # Transport limit above the service's own (which answers INVALID_ARGUMENT naming the
        # limit); only a message beyond this gets gRPC's RESOURCE_EXHAUSTED.
        limit = max_message_bytes or max(4 * predictor.config.max_body_bytes, 4 * 1024 * 1024)
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.so_reuseport", 1),
        ]
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._serving: bool | None = None

    async def update_health(self) -> None:
        """Mirror the predictor's readiness (what ``/readyz`` says) into the health service."""
        ready = self.predictor.ready()
        if ready == self._serving:
            return
        self._serving = ready
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def _follow_health(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.update_health()
            except Exception:
                logger.exception("gRPC health update failed")

    async def start(self) -> int:
        server = grpc.aio.server(options=self.options)
        voltage_pb2_grpc.add_VoltageServiceServicer_to_server(
            VoltageServicer(self.predictor), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        port = server.add_insecure_port(self.address)
        if port == 0:
            raise RuntimeError(f"gRPC server could not bind {self.address}")
        await self.update_health()
        await server.start()
        self.server, self.port = server, port
        self._health_task = asyncio.get_running_loop().create_task(self._follow_health())
        logger.info("gRPC server listening on %s", self.address.rsplit(":", 1)[0] + f":{port}")
        return port

    async def stop(self, grace: float = 5.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
            self.server = None
