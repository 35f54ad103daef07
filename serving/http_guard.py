"""ASGI middleware in front of the BentoML API: request ids, body limits, uploads, shedding, logs.

Why a middleware: BentoML parses the body before the API method runs, so an oversized, empty or
non-JSON body must be refused before that, with the same error shape and metrics as every other
bad input (HTTP 400 / 413, ``voltage_errors_total``). The body is read at most
``VOLTAGE_MAX_BODY_BYTES`` (+1) bytes, then replayed to the application.

What it does for every HTTP request except probes and scrapes (``/metrics``, ``/healthz``,
``/livez``, ``/readyz``):

* **Request id**: the client's ``X-Request-ID`` when it looks like an id, else a new one; sent
  back as the ``X-Request-ID`` response header, put in every error body (``request_id``), bound
  to the request's log records (:mod:`serving.logs`) and its prediction-log lines.
* **One error shape**: any error answer (status >= 400), whoever wrote it (the API method, this
  guard, BentoML's input validation, Starlette's 404), is rewritten to
  ``{"error", "kind", "status", "request_id"}`` (plus BentoML's ``detail`` when it gave one).
* **One JSON access line** (``serving.access``): request id, method, path, endpoint, ion(s),
  model version(s), status, latency, error kind.

And for the API (``POST /predict``, ``/predict_batch``, ``/models``):

* **Load shedding pre-check**: when the worker's prediction queue is already full the request is
  answered 503 ``overloaded`` with ``Retry-After`` before its body is even read (the predictor's
  own admission is the exact check; this one only saves the work).
* **multipart/form-data uploads** on ``/predict`` (``curl -F file=@cell.cif -F ion=Li``) are
  turned into the same JSON body BentoML expects: ``file`` (the structure file; ``format`` from
  its name unless given), ``ion``, ``format``, ``explain``, ``material_id``, ``structure`` (text
  instead of a file), ``discharged_file`` / ``discharged_format``. The size limit is the body's.
* It records ``voltage_request_duration_seconds{protocol="http"}`` for every API call (including
  refused ones), counts requests the API method never saw (BentoML's own validation errors), and
  answers ``GET /readyz`` with the list of ions that have no model.

BentoML's own traffic limits sit *outside* this middleware (``traffic.max_concurrency`` answers
429, ``traffic.timeout`` 504, in BentoML's ``{"error"}`` shape without ``Retry-After``).
:func:`install_traffic_answers` replaces those two BentoML middleware classes (looked up by
BentoML when it builds the app, after the service module is imported) with subclasses that answer
in the service's shape, with ``Retry-After`` on 429, counted in ``voltage_requests_shed_total``
and logged; tests/serving/test_overload.py fails if a BentoML upgrade stops using them.

The runtime (config, metrics, predictor) is looked up per request through ``runtime_of``: the
middleware is created by BentoML before the service instance exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from serving import logs
from serving.errors import ServingError, error_dict
from serving.formats import guess_format

logger = logging.getLogger(__name__)

#: API routes -> endpoint label. GET /models is served by the mounted app (serving.service).
API_PATHS = {"/predict": "predict", "/predict_batch": "predict_batch", "/models": "models"}
#: Never logged, never reshaped: probes and scrapes (as BentoML's own access log skips them).
PROBE_PATHS = frozenset({"/metrics", "/healthz", "/livez", "/readyz"})
NOTE_KEY = "voltage_note"
#: Where the request id is kept in the ASGI scope, so BentoML's outer traffic middlewares (which
#: may answer before this guard runs) and this guard use the same id.
SCOPE_REQUEST_ID = "voltage.request_id"
JSON_TYPES = ("application/json", "")
MULTIPART = "multipart/form-data"
#: Form fields of a multipart /predict: text fields and file fields (-> JSON key).
FORM_TEXT = ("ion", "format", "explain", "material_id", "structure", "discharged_format")
FORM_FILES = {"file": "structure", "discharged_file": "discharged_structure"}
#: Error ``kind`` for answers that carry none (Starlette / BentoML bodies), by status.
DEFAULT_KINDS = {400: "parse", 404: "not_found", 405: "method_not_allowed", 413: "too_large",
                 415: "format", 429: "too_many_requests", 500: "internal", 503: "unavailable",
                 504: "timeout"}  # fmt: skip

#: Set by :func:`install_traffic_answers`: how the shims find the worker's runtime.
_runtime_of: Callable[[], Any] | None = None


def note_of(state: Any) -> logs.RequestContext | None:
    """The request's context from a Starlette ``request.state`` (None outside the guard)."""
    return getattr(state, NOTE_KEY, None)


def _headers(scope: dict[str, Any]) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def ensure_request_id(scope: dict[str, Any]) -> str:
    """The request's id: already chosen for this scope, else the client's, else a new one."""
    rid = scope.get(SCOPE_REQUEST_ID)
    if rid is None:
        rid = logs.request_id_from(_headers(scope).get(logs.REQUEST_ID_KEY))
        scope[SCOPE_REQUEST_ID] = rid
    return rid


def error_body(e: ServingError, request_id: str | None = None) -> bytes:
    return json.dumps(error_dict(e.message, e.kind, e.http_status, request_id)).encode()


def _error_message(data: dict[str, Any], status: int) -> str:
    message = data.get("error")
    if not isinstance(message, str) or not message:
        message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        # pydantic's errors (BentoML's input validation): name each field and the problem.
        parts = []
        for d in detail[:5]:
            loc = ".".join(str(x) for x in d.get("loc", ()) if x not in ("body",))
            parts.append(f"{loc}: {d.get('msg', '')}" if loc else str(d.get("msg", "")))
        message = f"{message}: {'; '.join(parts)}"
    return message


def shape_error(body: bytes, status: int, request_id: str | None) -> bytes:
    """Any error body -> the service's ``{"error", "kind", "status", "request_id"}``."""
    try:
        data: Any = json.loads(body) if body.strip() else None
    except (ValueError, RecursionError):
        data = None
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]  # BentoML answers some errors as a one-element list
    if isinstance(data, dict) and {"error", "kind", "status", "request_id"} <= set(data):
        if data["request_id"] is None:  # the API method's own body: add the id only
            data["request_id"] = request_id
        return json.dumps(data).encode()
    if isinstance(data, dict):
        kind = data.get("kind") if isinstance(data.get("kind"), str) else None
        out = error_dict(
            _error_message(data, status), kind or DEFAULT_KINDS.get(status, "error"), status,
            request_id,
        )  # fmt: skip
        if "detail" in data:
            out["detail"] = data["detail"]
    else:
        text = body.decode("utf-8", errors="replace").strip()[:500]
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        out = error_dict(text or phrase or "error", DEFAULT_KINDS.get(status, "error"), status,
                         request_id)  # fmt: skip
    return json.dumps(out).encode()


def _start(status: int, body: bytes, request_id: str, extra: tuple = ()) -> dict[str, Any]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-request-id", request_id.encode("latin-1")),
            *extra,
        ],
    }


async def _respond(
    send: Callable[..., Any], status: int, body: bytes, request_id: str, extra: tuple = ()
) -> None:
    await send(_start(status, body, request_id, extra))
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Callable[..., Any], e: ServingError, request_id: str) -> None:
    """Answer ``e`` in the service's shape (``Retry-After`` when it is a shed request)."""
    extra = ()
    if e.retry_after_header is not None:
        extra = ((b"retry-after", e.retry_after_header.encode()),)
    await _respond(send, e.http_status, error_body(e, request_id), request_id, extra)


class _Answer:
    """Wraps ``send``: adds ``X-Request-ID`` to the response and reshapes error bodies."""

    def __init__(
        self, send: Callable[..., Any], request_id: str, reshape: bool,
        only: frozenset[int] | None = None,
    ) -> None:  # fmt: skip
        self.send = send
        self.request_id = request_id
        self.reshape = reshape
        self.only = only
        self.status: int | None = None
        self._held: dict[str, Any] | None = None
        self._chunks: list[bytes] = []

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            self.status = int(message.get("status", 500))
            headers = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]  # fmt: skip
            headers.append((b"x-request-id", self.request_id.encode("latin-1")))
            message = {**message, "headers": headers}
            if self.status >= 400 and self.reshape and (self.only is None
                                                          or self.status in self.only):
                self._held = message
                return
            await self.send(message)
            return
        if kind == "http.response.body" and self._held is not None:
            self._chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            held, self._held = self._held, None
            body = shape_error(b"".join(self._chunks), self.status or 500, self.request_id)
            headers = [(k, v) for k, v in held["headers"]
                       if k.lower() not in (b"content-length", b"content-type")]  # fmt: skip
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]  # fmt: skip
            await self.send({**held, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        await self.send(message)


class RequestGuard:
    """See the module docstring. ``runtime_of()`` returns the ServingRuntime or None."""

    def __init__(self, app: Any, runtime_of: Callable[[], Any]) -> None:
        self.app = app
        self.runtime_of = runtime_of

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        runtime = self.runtime_of()
        path, method = scope.get("path", ""), scope.get("method", "")
        if path in PROBE_PATHS:
            if runtime is not None and method == "GET" and path == "/readyz":
                return await self._readyz(runtime, send)
            return await self.app(scope, receive, send)
        rid = ensure_request_id(scope)
        endpoint = API_PATHS.get(path) if method == "POST" else None
        ctx = logs.RequestContext(rid, "http", endpoint)
        answer = _Answer(send, rid, reshape=method != "HEAD")
        status: int | None = None
        try:
            with logs.bound(ctx):
                if runtime is None or endpoint is None:
                    await self.app(scope, receive, answer)
                else:
                    await self._api(runtime, endpoint, ctx, scope, receive, answer)
            status = answer.status or 500
        except asyncio.CancelledError:
            # BentoML's traffic timeout cancelled the request (it answers 504 itself).
            status = 504
            ctx.note_error("timeout")
            if runtime is not None and endpoint is not None:
                runtime.metrics.record_request(endpoint, "http", None, "unavailable", "timeout")
            raise
        except Exception:
            status = 500
            raise
        finally:
            if status is not None and status >= 500 and ctx.error_kind is None:
                ctx.note_error(DEFAULT_KINDS.get(status, "internal"))
            logs.access_line(ctx, status or 500, method=method, path=path)

    async def _readyz(self, runtime: Any, send: Any) -> None:
        missing = runtime.predictor.missing()
        rid = logs.new_request_id()
        if not missing:
            return await _respond(send, 200, b'{"ready": true}', rid)
        msg = f"no champion model loaded for: {', '.join(missing)}"
        body = json.dumps({"ready": False, "missing": missing, "error": msg}).encode()
        await _respond(send, 503, body, rid)

    async def _api(
        self, runtime: Any, endpoint: str, ctx: logs.RequestContext, scope: dict[str, Any],
        receive: Any, send: _Answer,
    ) -> None:  # fmt: skip
        metrics = runtime.metrics
        scope.setdefault("state", {})[NOTE_KEY] = ctx
        try:
            if endpoint != "models" and runtime.predictor.admission.full:
                metrics.record_shed("http", "queue")
                raise runtime.predictor.overloaded()
            scope, body = await self._read_body(runtime, endpoint, scope, receive)
        except ServingError as e:
            ctx.note_error(e.kind)
            metrics.record_request(endpoint, "http", None, e.status_label, e.kind)
            await respond_error(send, e, ctx.request_id)
            metrics.observe_duration(endpoint, "http", ctx.elapsed_ms() / 1000.0)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            status = send.status or 500
            if not ctx.recorded and status >= 400:
                # Refused by BentoML before the API method ran (input validation).
                kind = "parse" if status < 500 else "internal"
                label = "client_error" if status < 500 else "server_error"
                metrics.record_request(endpoint, "http", None, label, kind)
                ctx.note_error(kind)
            metrics.observe_duration(endpoint, "http", ctx.elapsed_ms() / 1000.0)

    async def _read_body(
        self, runtime: Any, endpoint: str, scope: dict[str, Any], receive: Any
    ) -> tuple[dict[str, Any], bytes]:
        """(scope, body) to hand on: the JSON body checked, or a form upload turned into one."""
        limit = runtime.config.max_body_bytes
        headers = _headers(scope)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        multipart = ctype == MULTIPART and endpoint == "predict"
        if ctype not in JSON_TYPES and endpoint != "models" and not multipart:
            raise ServingError(
                "format",
                f"content type {ctype!r} not accepted; send JSON (application/json)"
                + (" or a multipart/form-data upload" if endpoint == "predict" else ""),
            )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServingError(
                "too_large", f"request body is {declared} bytes; the limit is {limit}"
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ServingError("too_large", f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if endpoint == "models":
            return scope, body
        if multipart:
            return await self._form_to_json(scope, body)
        if not body.strip():
            raise ServingError("empty", "request body is empty; send a JSON request")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ServingError("parse", f"request body is not valid JSON: {exc}") from None
        if endpoint == "predict" and not isinstance(data, dict):
            raise ServingError("parse", "request body must be a JSON object")
        if endpoint == "predict_batch":
            if not isinstance(data, list):
                raise ServingError("parse", "request body must be a JSON list of items")
            if len(data) > runtime.config.max_batch_items:
                raise ServingError(
                    "too_large",
                    f"batch has {len(data)} items; the limit is {runtime.config.max_batch_items}",
                )
        return scope, body

    async def _form_to_json(
        self, scope: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        """A ``multipart/form-data`` /predict -> the equivalent JSON body (and a scope that says
        JSON), so BentoML and the API method see exactly what a JSON client sends."""
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream() -> Any:
            yield body

        parser = MultiPartParser(
            Headers(scope=scope), stream(), max_files=len(FORM_FILES),
            max_fields=len(FORM_TEXT), max_part_size=len(body) + 1,
        )  # fmt: skip
        try:
            form = await parser.parse()
        except (MultiPartException, ValueError, KeyError) as exc:
            message = getattr(exc, "message", None) or str(exc)
            raise ServingError("parse", f"multipart body not readable: {message}") from None
        data: dict[str, Any] = {}
        try:
            for key, value in form.multi_items():
                if key in FORM_FILES:
                    if not isinstance(value, UploadFile):
                        raise ServingError("parse", f"form field {key!r} must be a file upload")
                    raw = await value.read()
                    try:
                        data[FORM_FILES[key]] = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ServingError("parse", f"{key} {value.filename!r} is not UTF-8 "
                                           "text (CIF, POSCAR or JSON)") from None  # fmt: skip
                    fmt_key = "format" if key == "file" else "discharged_format"
                    guessed = guess_format(value.filename or "")
                    data.setdefault(f"_{fmt_key}", guessed)
                elif key in FORM_TEXT:
                    if not isinstance(value, str):
                        raise ServingError("parse", f"form field {key!r} must be text")
                    data[key] = value
                else:
                    allowed = ", ".join((*FORM_FILES, *FORM_TEXT))
                    raise ServingError("parse", f"unknown form field {key!r}; use {allowed}")
        finally:
            await form.close()
        for fmt_key in ("format", "discharged_format"):
            guessed = data.pop(f"_{fmt_key}", None)
            if not data.get(fmt_key) and guessed:
                data[fmt_key] = guessed
        if not data.get("format") and data.get("structure", "").lstrip().startswith("{"):
            data["format"] = "json"  # pasted pymatgen JSON text
        if "explain" in data:
            flag = data["explain"].strip().lower()
            if flag not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
                raise ServingError("parse", "'explain' must be true or false")
            data["explain"] = flag in ("true", "1", "yes", "on")
        out = json.dumps(data).encode()
        headers = [(k, v) for k, v in scope.get("headers", [])
                   if k.lower() not in (b"content-type", b"content-length")]  # fmt: skip
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(out)).encode())]  # fmt: skip
        return {**scope, "headers": headers}, out


# ------------------------------------------------------------------------------ BentoML traffic
def _traffic_classes() -> tuple[type, type] | None:
    try:
        from bentoml._internal.server.http import traffic
    except ImportError:  # BentoML moved its middlewares: the guard still works, BentoML's
        return None  # own 429/504 then keep BentoML's shape (the overload test says so)
    return traffic.MaxConcurrencyMiddleware, traffic.TimeoutMiddleware


def _retry_after() -> float:
    runtime = _runtime_of() if _runtime_of is not None else None
    return runtime.config.retry_after_s if runtime is not None else 1.0


async def answer_concurrency_shed(scope: dict[str, Any], send: Any) -> None:
    """BentoML's ``max_concurrency`` is reached: 429 in the service's shape, with
    ``Retry-After``, counted (``voltage_requests_shed_total{reason="concurrency"}``) and logged."""
    rid = ensure_request_id(scope)
    path, method = scope.get("path", ""), scope.get("method", "")
    endpoint = API_PATHS.get(path) if method == "POST" else None
    ctx = logs.RequestContext(rid, "http", endpoint, error_kind="too_many_requests")
    e = ServingError(
        "too_many_requests",
        "too many requests open at once on this service; retry after the delay given",
        retry_after=_retry_after(),
    )
    runtime = _runtime_of() if _runtime_of is not None else None
    if runtime is not None:
        runtime.metrics.record_shed("http", "concurrency")
        if endpoint is not None:
            runtime.metrics.record_request(endpoint, "http", None, e.status_label, e.kind)
    await respond_error(send, e, rid)
    logs.access_line(ctx, e.http_status, method=method, path=path)


_SHIMS: dict[str, type] = {}


def install_traffic_answers(runtime_of: Callable[[], Any]) -> bool:
    """Make BentoML's 429 (``max_concurrency``) and 504 (``timeout``) answers use the service's
    error shape, request id and ``Retry-After`` (see the module doc). Idempotent; False when
    BentoML's middleware classes are not where 1.4 keeps them."""
    global _runtime_of
    _runtime_of = runtime_of
    found = _traffic_classes()
    if found is None:
        return False
    from bentoml._internal.server.http import traffic

    concurrency, timeout = found
    if "concurrency" not in _SHIMS:

        class ConcurrencyLimit(concurrency):  # type: ignore[misc, valid-type]
            """BentoML's limit, answering a refused request in the service's shape."""

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if (scope["type"] == "http" and scope["path"] not in self.skip_paths
                        and self._semaphore.locked()):  # fmt: skip
                    return await answer_concurrency_shed(scope, send)
                return await super().__call__(scope, receive, send)

        class TimeLimit(timeout):  # type: ignore[misc, valid-type]
            """BentoML's timeout; its 504 body is reshaped and carries the request id."""

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                if scope["type"] != "http" or scope.get("path") in PROBE_PATHS:
                    return await super().__call__(scope, receive, send)
                rid = ensure_request_id(scope)
                shaped = _Answer(send, rid, reshape=True, only=frozenset({504}))
                return await super().__call__(scope, receive, shaped)

        _SHIMS["concurrency"], _SHIMS["timeout"] = ConcurrencyLimit, TimeLimit
    traffic.MaxConcurrencyMiddleware = _SHIMS["concurrency"]
    traffic.TimeoutMiddleware = _SHIMS["timeout"]
    return True
