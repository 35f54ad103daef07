"""BentoML service: the champion model per working ion over HTTP (and gRPC, same process).

Run from the repository root::

    bentoml serve serving.service:VoltageService --port 3000

HTTP: ``POST /predict`` (JSON, or a ``multipart/form-data`` upload), ``POST /predict_batch`` (a
JSON list), ``POST|GET /models``; ``/docs`` (Swagger UI), ``/docs.json`` (OpenAPI, BentoML's
document completed by :mod:`serving.openapi`), ``/healthz``, ``/readyz``, ``/metrics``.
gRPC (``serving/voltage.proto``) on ``VOLTAGE_GRPC_HOST:VOLTAGE_GRPC_PORT`` (127.0.0.1:50051),
started by the ``on_startup`` hook and stopped by ``on_shutdown``. Settings: docs/serving.md.

Packaged models: BentoML packs into a Bento only the models declared as class attributes, so
each model exported by ``voltage-serve export-models`` (BentoML name ``electrode-voltage-<ion>``)
that exists in the local BentoML store when this module is imported becomes an attribute
``model_<ion>``. That store lookup is the only thing done at import; the models are loaded
(and the registry asked) only when a worker starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, Field, WithJsonSchema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from serving import logs
from serving.errors import ServingError
from serving.http_guard import RequestGuard, error_body, install_traffic_answers, note_of
from serving.predictor import PredictRequest, PredictResult

logger = logging.getLogger("serving.service")

PROTOCOL = "http"


# ------------------------------------------------------------------------------ schemas
def _loose(schema: dict[str, Any]) -> Any:
    """Accept any JSON value (the predictor reports a wrong type as a 400 naming the field)
    while documenting the intended type in the OpenAPI schema."""
    return Annotated[Any, WithJsonSchema(schema)]


#: A structure is text (CIF, POSCAR, JSON text) or a pymatgen ``Structure.as_dict()`` object.
#: ``oneOf``, not ``anyOf``: BentoML's generator keeps only the first member of an ``anyOf``.
STRUCTURE_FORMS = [
    {"type": "string", "title": "text",
     "description": "CIF or POSCAR text (or pymatgen JSON text with format json)"},
    {"type": "object", "title": "pymatgen Structure.as_dict()", "additionalProperties": True,
     "required": ["lattice", "sites"],
     "description": "with format json: lattice.matrix and sites[].species / sites[].abc are "
     "read, nothing else"},
]  # fmt: skip
IonField = _loose(
    {"type": "string", "description": "working ion: Li, Na, K, Mg, Ca, Zn or Al (as served, "
     "see /models); case-insensitive"}
)  # fmt: skip
StructureField = _loose(
    {
        "description": "the electrode material in its **charged** (ion-poor) state: structure "
        "text in `format` (CIF by default, POSCAR), or with `format` json a pymatgen "
        "Structure.as_dict() object or JSON text. Required unless `material_id` is given.",
        "oneOf": STRUCTURE_FORMS,
    }
)
FormatField = _loose(
    {"type": "string", "enum": ["cif", "poscar", "json"], "default": "cif",
     "description": "format of `structure`"}
)  # fmt: skip
MaterialField = _loose(
    {"type": "string", "description": "instead of `structure`: a material id of the service's "
     "local snapshot (e.g. mp-10033), when the service has one"}
)  # fmt: skip
DischargedField = _loose(
    {
        "description": "optional discharged (ion-rich) end of the same host, same formats as "
        "`structure`: the answer then adds `physics_voltage` (CHGNet energies)",
        "oneOf": STRUCTURE_FORMS,
    }
)
DischargedFormatField = _loose(
    {"type": "string", "enum": ["cif", "poscar", "json"], "description": "default: `format`"}
)


class PredictItem(BaseModel):
    """One item of ``/predict_batch`` (same fields as ``/predict``)."""

    ion: IonField
    structure: StructureField = None
    format: FormatField = None
    material_id: MaterialField = None
    explain: bool = Field(False, description="also return per-site local voltages")
    discharged_structure: DischargedField = None
    discharged_format: DischargedFormatField = None


BatchItem = _loose(PredictItem.model_json_schema())


class ModelRef(BaseModel):
    """The model that answered: registered name and version, and where it was loaded from."""

    name: str = Field(description="registered model name, electrode-voltage-<Ion>")
    version: int = Field(description="registry version (0: a release never registered)")
    source: str = Field(
        description="registry (the MLflow champion), bento (packaged in a built Bento) or "
        "release (the repository's pretrained release, for an ion without a champion)"
    )


class PredictionOut(BaseModel):
    """One prediction (docs/serving.md, "Predict over HTTP")."""

    ion: str = Field(description="working ion, as configured (e.g. Li)")
    voltage: float = Field(description="predicted average voltage vs. the ion's metal (V)")
    uncertainty: float = Field(
        description="calibrated predictive standard deviation (V): voltage +- 1.645 x "
        "uncertainty is meant to cover 90% of DFT voltages (GP posterior std and/or the spread "
        "of the ensemble's heads, rescaled on validation data)"
    )
    model: ModelRef
    formula: str = Field(description="reduced formula of the structure sent")
    n_sites: int = Field(description="sites in the structure sent")
    unseen_elements: list[str] = Field(
        default_factory=list, description="elements never seen in this ion's training data"
    )
    warnings: list[str] = Field(default_factory=list)
    material_id: str | None = None
    reference_voltage: float | None = Field(None, description="snapshot DFT voltage, if known")
    local_voltages: list[dict[str, Any]] | None = Field(
        None, description='with "explain": true, per-site local voltages (site, element, V)'
    )
    physics_voltage: float | None = Field(
        None,
        description="with a discharged_structure: the step's voltage from CHGNet energies (V), "
        "a cross-check of `voltage`",
    )


class BatchItemOut(BaseModel):
    """One item's outcome: a prediction, or the error it would have got from /predict."""

    index: int = Field(description="position of the item in the request")
    ok: bool
    prediction: PredictionOut | None = None
    error: str | None = Field(None, description="what is wrong with this item")
    kind: str | None = Field(None, description="error kind (docs/serving.md, Errors)")
    status: int | None = Field(None, description="the HTTP status /predict would answer")


class IonModel(BaseModel):
    ion: str
    loaded: bool
    disabled: bool
    name: str | None = None
    version: int | None = None
    source: str | None = Field(None, description="registry, bento or release")
    run_id: str | None = None
    test_mae: float | None = Field(None, description="test MAE recorded with the version (V)")
    loaded_at: str | None = Field(None, description="when this worker loaded it (UTC)")
    backbone: str | None = Field(None, description="cgcnn, chgnet or cgcnn+chgnet")


class ModelsOut(BaseModel):
    ready: bool
    models: list[IonModel]


def _prediction(r: PredictResult) -> PredictionOut:
    return PredictionOut.model_validate(r.to_dict())


def _models_out(runtime: Any) -> ModelsOut:
    rows = []
    for row in runtime.predictor.list_models():
        m = row["model"] or {}
        rows.append(IonModel(ion=row["ion"], loaded=row["loaded"], disabled=row["disabled"], **m))
    return ModelsOut(ready=runtime.predictor.ready(), models=rows)


def _error_response(e: ServingError, ctx: bentoml.Context) -> Any:
    """Errors bypass the output model: the service's error body (message, kind, status, request
    id) and ``Retry-After`` for a shed request. (BentoML copies ``ctx.response.status_code``
    onto any response of an API that takes a context.)"""
    ctx.response.status_code = e.http_status
    note = note_of(ctx.request.state)
    headers = {"Retry-After": e.retry_after_header} if e.retry_after_header else None
    body = error_body(e, note.request_id if note is not None else None)
    return Response(body, status_code=e.http_status, media_type="application/json",
                    headers=headers)  # fmt: skip


class _request:  # lower case: used like a function, ``with _request(ctx) as note:``
    """Mark the request as counted by the API method, and make its context current (it is
    already, through the guard; binding again costs nothing and does not rely on BentoML
    running the method in the guard's task). A class: see ``serving.logs.bound``."""

    def __init__(self, ctx: bentoml.Context) -> None:
        self.note = note_of(ctx.request.state)
        self._bound = logs.bound(self.note) if self.note is not None else None

    def __enter__(self) -> logs.RequestContext | None:
        if self.note is not None:
            self.note.recorded = True
        if self._bound is not None:
            self._bound.__enter__()
        return self.note

    def __exit__(self, *exc: object) -> None:
        if self._bound is not None:
            self._bound.__exit__(*exc)


# ------------------------------------------------------------------------------ packaged models
def _packaged_attributes() -> dict[str, bentoml.models.BentoModel]:
    """``model_<ion>`` -> BentoModel for each exported model present in the BentoML store."""
    from serving.export_models import packaged_tags

    prefix = os.environ.get("VOLTAGE_MODEL_PREFIX", "electrode-voltage")
    try:
        tags = packaged_tags(prefix)
    except Exception as exc:  # an unreadable store must not stop the service from importing
        logger.warning("BentoML model store not readable (%s): no packaged models", exc)
        return {}
    return {f"model_{ion.lower()}": bentoml.models.BentoModel(tag) for ion, tag in tags.items()}


def _workers() -> int:
    return int(os.environ.get("VOLTAGE_WORKERS", "1"))


def _traffic() -> dict[str, Any]:
    """BentoML's own limits (read when the module is imported, like the worker count):
    ``VOLTAGE_MAX_CONCURRENCY`` HTTP requests open at once over the whole service (BentoML splits
    it over the workers; beyond it: 429 + Retry-After), ``VOLTAGE_TIMEOUT_S`` per request (504).
    The default, 32 per worker, sits above what the prediction queue (``VOLTAGE_MAX_QUEUE``)
    holds for single-structure requests on a small machine, so the queue sheds first (503) and
    this limit catches what the queue does not see (slow uploads, page and docs requests)."""
    workers = _workers()
    concurrency = int(os.environ.get("VOLTAGE_MAX_CONCURRENCY") or 32 * workers)
    timeout = float(os.environ.get("VOLTAGE_TIMEOUT_S") or 60)
    if concurrency < 1 or timeout <= 0:
        raise ValueError("VOLTAGE_MAX_CONCURRENCY must be >= 1 and VOLTAGE_TIMEOUT_S > 0")
    return {"timeout": timeout, "max_concurrency": concurrency}


def _with_packaged_models(cls: type) -> type:
    """Add the packaged models as class attributes before BentoML inspects the class."""
    for attr, model in _packaged_attributes().items():
        setattr(cls, attr, model)
    return cls


# ------------------------------------------------------------------------------ service
@bentoml.service(
    workers=_workers(),
    traffic=_traffic(),
    # The service writes its own JSON access line per request (serving.logs, with request id,
    # ion, model version and error kind); BentoML's plain-text one would only repeat it.
    logging={"access": {"enabled": False}},
    envs=[
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "OMP_WAIT_POLICY", "value": "PASSIVE"},
    ],
)
@_with_packaged_models
class VoltageService:
    """Average voltage of insertion electrodes, one CGCNN champion per working ion."""

    def __init__(self) -> None:
        # Idle OpenMP threads sleep instead of spinning (unless the user chose): two spinning
        # torch processes on a shared CPU slow each other 10-25x. Before torch loads OpenMP.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from serving.config import ServingConfig, quiet_mlflow_defaults
        from voltage_model.numerics import flush_subnormals

        flush_subnormals()  # each worker, before its first torch op (voltage_model/numerics.py)
        torch.set_num_threads(int(os.environ.get("VOLTAGE_TORCH_THREADS", "1")))
        quiet_mlflow_defaults()
        self.config = ServingConfig.from_env()
        logs.configure(os.environ.get("VOLTAGE_LOG_LEVEL", "INFO"), self.config.log_format)
        if not self.config.access_log:
            logging.getLogger(logs.ACCESS_LOGGER).setLevel(logging.WARNING)
        self.runtime: Any = None
        self.grpc: Any = None

    def _packaged(self) -> dict[str, Any]:
        """ion -> PackagedModel: the Bento's own models when serving a built Bento, else the
        class attributes (models present in the local store)."""
        from serving.export_models import packaged_model

        svc = getattr(self, "bento_service", None)
        bento = getattr(svc, "bento", None)
        if bento is not None:
            tags = [info.tag for info in bento.info.all_models]
        else:
            tags = [
                m.tag
                for m in type(self).__dict__.values()
                if isinstance(m, bentoml.models.BentoModel)
            ]
        out = {}
        for tag in tags:
            found = packaged_model(tag)
            if found is not None:
                ion, pkg = found
                out[ion] = pkg
        return out

    @bentoml.on_startup
    async def start_serving(self) -> None:
        """Load models (registry or packaged), start watcher, batcher and the gRPC server."""
        from prometheus_client import CollectorRegistry

        from serving.runtime import ServingRuntime

        runtime = ServingRuntime(self.config, CollectorRegistry(), self._packaged())
        await asyncio.to_thread(runtime.start)
        self.runtime = runtime
        if self.config.grpc_enabled:
            from serving.grpc_server import GrpcServer

            self.grpc = GrpcServer(runtime.predictor, self.config.grpc_host, self.config.grpc_port)
            await self.grpc.start()

    @bentoml.on_shutdown
    async def stop_serving(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
            self.grpc = None
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.stop)

    def __is_ready__(self) -> bool:
        return self.runtime is not None and self.runtime.predictor.ready()

    def __metrics__(self, content: str) -> str:
        """BentoML's scrape hook: add the drift gauges of all workers' windows together
        (serving.metrics.aggregate_drift; the workers export only counts)."""
        runtime = self.runtime
        if runtime is None or not runtime.metrics.aggregate_drift_at_scrape:
            return content
        from serving.metrics import aggregate_drift

        try:
            return aggregate_drift(content, runtime.drift)
        except Exception:  # a scrape must never fail because of the drift block
            logger.exception("aggregating drift gauges failed")
            return content

    @bentoml.api(route="/predict")
    async def predict(
        self,
        ion: IonField = None,
        structure: StructureField = None,
        format: FormatField = None,
        material_id: MaterialField = None,
        explain: Annotated[bool, Field(description="also return per-site local voltages")] = False,
        discharged_structure: DischargedField = None,
        discharged_format: DischargedFormatField = None,
        *,
        ctx: bentoml.Context,
    ) -> PredictionOut:
        """Predict the average voltage (V) and its uncertainty for one structure (and, given
        its discharged end, the step's CHGNet physics voltage as a cross-check)."""
        with _request(ctx):
            return await self._predict_one(
                ctx, ion, structure, format, material_id, explain, discharged_structure,
                discharged_format,
            )  # fmt: skip

    async def _predict_one(
        self, ctx: bentoml.Context, ion: Any, structure: Any, format: Any, material_id: Any,
        explain: bool, discharged_structure: Any, discharged_format: Any,
    ) -> Any:  # fmt: skip
        try:
            req = PredictRequest.from_mapping(
                {
                    "ion": ion,
                    "structure": structure,
                    "format": format,
                    "material_id": material_id,
                    "explain": explain,
                    "discharged_structure": discharged_structure,
                    "discharged_format": discharged_format,
                }
            )
        except ServingError as e:
            self.runtime.metrics.record_request("predict", PROTOCOL, None, e.status_label, e.kind)
            note = note_of(ctx.request.state)
            if note is not None:
                note.note_error(e.kind)
            return _error_response(e, ctx)
        try:
            result = await self.runtime.predictor.predict(req, "predict", PROTOCOL)
        except ServingError as e:
            return _error_response(e, ctx)
        return _prediction(result)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(
        self, items: list[BatchItem], /, *, ctx: bentoml.Context
    ) -> list[BatchItemOut]:
        """Predict a list of items (ions may differ), answered in order; a bad item gets its
        own error entry and never fails the others. A batch the service has no room for is
        refused whole (503 + Retry-After)."""
        with _request(ctx) as note:
            if note is not None:
                note.items = len(items)
            reqs: list[PredictRequest | ServingError] = []
            for item in items:
                try:
                    reqs.append(PredictRequest.from_mapping(item))
                except ServingError as e:
                    reqs.append(e)
            try:
                outcomes = await self.runtime.predictor.predict_many(
                    reqs, "predict_batch", PROTOCOL
                )
            except ServingError as e:
                return _error_response(e, ctx)
        out = []
        for i, o in enumerate(outcomes):
            if isinstance(o, ServingError):
                out.append(
                    BatchItemOut(
                        index=i, ok=False, error=o.message, kind=o.kind, status=o.http_status
                    )
                )
            else:
                out.append(BatchItemOut(index=i, ok=True, prediction=_prediction(o)))
        return out

    @bentoml.api(route="/models")
    async def models(self, *, ctx: bentoml.Context) -> ModelsOut:
        """Per configured ion: the served registered model and version, its test MAE, when it
        was loaded (also ``GET /models``)."""
        with _request(ctx):
            self.runtime.metrics.record_request("models", PROTOCOL, "all", "ok")
            return _models_out(self.runtime)


# ------------------------------------------------------------------------------ extras
def _runtime() -> Any:
    """The running worker's ServingRuntime (None before start-up finished)."""
    try:
        instance = bentoml.get_current_service()
    except Exception:
        return None
    return getattr(instance, "runtime", None)


async def _get_models(request: Request) -> Response:
    runtime = _runtime()
    if runtime is None:
        return JSONResponse({"error": "starting"}, status_code=503)
    runtime.metrics.record_request("models", PROTOCOL, "all", "ok")
    return JSONResponse(_models_out(runtime).model_dump())


@lru_cache(maxsize=1)
def _openapi_document() -> bytes:
    """BentoML's document for this service, completed (serving.openapi); built once per
    worker: it depends only on the code."""
    from serving.openapi import complete

    return json.dumps(complete(VoltageService.openapi_spec.asdict())).encode()


async def _openapi(request: Request) -> Response:
    """``GET /docs.json``: the OpenAPI document Swagger UI (``/docs``) and client generators
    read."""
    return Response(_openapi_document(), media_type="application/json")


async def _docs(request: Request) -> Response:
    """Swagger UI over BentoML's OpenAPI document (``/docs.json``)."""
    from _bentoml_impl import server as bentoml_server

    return FileResponse(Path(bentoml_server.__file__).parent / "main-openapi.html")


# ------------------------------------------------------------------------------ web page
#: The page for researchers (docs/serving.md, "Web page"): plain files that call the public API.
WEB_DIR = Path(__file__).resolve().parent / "web"
#: The only files served under /web/ (name -> content type): nothing else of serving/ leaks out.
WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
#: The page may load and call only this origin: the browser itself enforces "no CDN, offline".
WEB_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' blob:; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)


def _not_found(message: str) -> Response:
    """The API's error shape for a page file that is not served (the guard adds the request
    id)."""
    body = json.dumps({"error": message, "kind": "not_found", "status": 404}).encode()
    return Response(body, status_code=404, media_type="application/json")


def _web_response(request: Request, name: str) -> Response:
    """One page file, revalidated on every load (``no-cache`` + ETag -> 304): the files are not
    fingerprinted, so a redeployed page must never be mixed with a stale cached script."""
    try:
        body = (WEB_DIR / name).read_bytes()
    except OSError:
        return _not_found(f"page file {name!r} is missing from this deployment")
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "Cache-Control": "no-cache",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": WEB_CSP,
        "Referrer-Policy": "no-referrer",
    }
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=WEB_FILES[name], headers=headers)


async def _page(request: Request) -> Response:
    """``GET /``: the web page (BentoML's own index page stays reachable as ``/docs``)."""
    return _web_response(request, "index.html")


async def _web_file(request: Request) -> Response:
    """``GET /web/<name>`` for the allow-listed page files only."""
    name = request.path_params["name"]
    if name not in WEB_FILES:
        return _not_found(f"no page file {name!r}")
    return _web_response(request, name)


#: Routes served beside the API (mounted below, in front of BentoML's own index page).
EXTRAS = Starlette(
    routes=[
        Route("/", _page),
        Route("/web/{name}", _web_file),
        Route("/models", _get_models),
        Route("/docs", _docs),
        Route("/docs.json", _openapi),
    ]
)

install_traffic_answers(_runtime)
VoltageService.add_asgi_middleware(RequestGuard, runtime_of=_runtime)
VoltageService.mount_asgi_app(EXTRAS, path="/")
