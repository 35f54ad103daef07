"""The gRPC face of the predictor (``serving/voltage.proto``), with health and reflection.

Why in the BentoML process: one set of loaded models, one micro-batcher and one metrics
registry serve both protocols, so HTTP and gRPC answers are identical and Prometheus needs one
target. The ``grpc.aio`` server runs on the worker's event loop (started from the service's
``on_startup`` hook); with several workers each binds the same port (``SO_REUSEPORT``) and the
kernel spreads connections.

Errors: status code from :class:`serving.errors.ServingError` (INVALID_ARGUMENT, UNAVAILABLE,
INTERNAL), details = the message, and trailing metadata ``voltage-error-kind`` plus
``voltage-error-bin`` (a serialised ``Error``) for clients that want the structured form.
Standard health checking reports SERVING only while every configured ion has a model.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import voltage_pb2, voltage_pb2_grpc
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


def error_message(e: ServingError) -> voltage_pb2.Error:
    return voltage_pb2.Error(kind=e.kind, message=e.message, http_status=e.http_status)


class VoltageServicer(voltage_pb2_grpc.VoltageServiceServicer):
    """Translates between proto messages and the predictor; records gRPC latency."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.metrics = predictor.metrics

    async def _abort(self, context: grpc.aio.ServicerContext, e: ServingError) -> None:
        await context.abort(
            getattr(grpc.StatusCode, e.grpc_code_name),
            e.message,
            trailing_metadata=(
                ("voltage-error-kind", e.kind),
                ("voltage-error-bin", error_message(e).SerializeToString()),
            ),
        )

    async def Predict(
        self, request: voltage_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.Prediction:
        t0 = time.perf_counter()
        try:
            result = await self.predictor.predict(_request(request), "predict", PROTOCOL)
        except ServingError as e:
            self.metrics.observe_duration("predict", PROTOCOL, time.perf_counter() - t0)
            await self._abort(context, e)
            raise  # abort raises; this keeps type checkers aware
        msg = prediction_message(result)
        self.metrics.observe_duration("predict", PROTOCOL, time.perf_counter() - t0)
        return msg

    async def PredictBatch(
        self, request: voltage_pb2.PredictBatchRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.PredictBatchResponse:
        t0 = time.perf_counter()
        config = self.predictor.config
        size = sum(len(item.structure) + len(item.discharged_structure) for item in request.items)
        problem = None
        if len(request.items) > config.max_batch_items:
            problem = f"batch has {len(request.items)} items; the limit is {config.max_batch_items}"
        elif size > config.max_body_bytes:
            problem = f"batch structures total {size} bytes; the limit is {config.max_body_bytes}"
        if problem is not None:
            e = ServingError("too_large", problem)
            self.metrics.record_request("predict_batch", PROTOCOL, None, e.status_label, e.kind)
            self.metrics.observe_duration("predict_batch", PROTOCOL, time.perf_counter() - t0)
            await self._abort(context, e)
        outcomes = await self.predictor.predict_many(
            [_request(item) for item in request.items], "predict_batch", PROTOCOL
        )
        results = []
        for i, out in enumerate(outcomes):
            if isinstance(out, ServingError):
                results.append(voltage_pb2.BatchResult(index=i, error=error_message(out)))
            else:
                results.append(voltage_pb2.BatchResult(index=i, prediction=prediction_message(out)))
        self.metrics.observe_duration("predict_batch", PROTOCOL, time.perf_counter() - t0)
        return voltage_pb2.PredictBatchResponse(results=results)

    async def ListModels(
        self, request: voltage_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> voltage_pb2.ListModelsResponse:
        t0 = time.perf_counter()
        statuses = []
        for row in self.predictor.list_models():
            st = voltage_pb2.ModelStatus(
                ion=row["ion"], loaded=row["loaded"], disabled=row["disabled"]
            )
            m = row["model"]
            if m is not None:
                st.model.CopyFrom(
                    voltage_pb2.ModelRef(name=m["name"], version=m["version"], source=m["source"])
                )
                st.run_id = m["run_id"] or ""
                st.loaded_at = m["loaded_at"]
                st.backbone = m.get("backbone", "cgcnn")
                if m["test_mae"] is not None:
                    st.test_mae = m["test_mae"]
            statuses.append(st)
        self.metrics.record_request("models", PROTOCOL, "all", "ok")
        self.metrics.observe_duration("models", PROTOCOL, time.perf_counter() - t0)
        return voltage_pb2.ListModelsResponse(models=statuses)


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
