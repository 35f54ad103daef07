"""ASGI middleware in front of the BentoML API: body limits, JSON checks, readiness, metrics.

Why a middleware: BentoML parses the body before the API method runs, so an oversized, empty or
non-JSON body must be refused before that, with the same error shape and metrics as every other
bad input (``{"error": <message>, "kind": <kind>}``, HTTP 400, ``voltage_errors_total``). The
body is read at most ``VOLTAGE_MAX_BODY_BYTES`` (+1) bytes, then replayed to the application.

It also records ``voltage_request_duration_seconds{protocol="http"}`` for every API call
(including refused ones), counts requests the API method never saw (BentoML's own validation
errors), and answers ``GET /readyz`` with the list of ions that have no model.

The runtime (config, metrics, predictor) is looked up per request through ``runtime_of``: the
middleware is created by BentoML before the service instance exists.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.errors import ServingError

logger = logging.getLogger(__name__)

#: API routes -> endpoint label. GET /models is served by the mounted app (serving.service).
API_PATHS = {"/predict": "predict", "/predict_batch": "predict_batch", "/models": "models"}
NOTE_KEY = "voltage_note"
JSON_TYPES = ("application/json", "")


@dataclass
class RequestNote:
    """Shared between middleware and API method through ``scope["state"]``."""

    recorded: bool = False


def note_of(state: Any) -> RequestNote | None:
    """The note of a Starlette ``request.state`` (None outside the middleware)."""
    return getattr(state, NOTE_KEY, None)


def error_body(e: ServingError) -> bytes:
    return json.dumps({"error": e.message, "kind": e.kind}).encode()


async def _respond(send: Callable[..., Any], status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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
        if runtime is not None and method == "GET" and path == "/readyz":
            return await self._readyz(runtime, send)
        if runtime is None or method != "POST" or path not in API_PATHS:
            return await self.app(scope, receive, send)
        await self._api(runtime, API_PATHS[path], scope, receive, send)

    async def _readyz(self, runtime: Any, send: Any) -> None:
        missing = runtime.predictor.missing()
        if not missing:
            return await _respond(send, 200, b'{"ready": true}')
        msg = f"no champion model loaded for: {', '.join(missing)}"
        body = json.dumps({"ready": False, "missing": missing, "error": msg}).encode()
        await _respond(send, 503, body)

    async def _api(
        self, runtime: Any, endpoint: str, scope: dict[str, Any], receive: Any, send: Any
    ) -> None:
        t0 = time.perf_counter()
        metrics = runtime.metrics
        status_box = [500]
        try:
            body = await self._read_body(runtime, endpoint, scope, receive)
        except ServingError as e:
            metrics.record_request(endpoint, "http", None, e.status_label, e.kind)
            await _respond(send, e.http_status, error_body(e))
            metrics.observe_duration(endpoint, "http", time.perf_counter() - t0)
            return
        note = RequestNote()
        scope.setdefault("state", {})[NOTE_KEY] = note
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def capture(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start":
                status_box[0] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, replay, capture)
        finally:
            if not note.recorded and status_box[0] >= 400:
                # Refused by BentoML before the API method ran (input validation).
                kind = "parse" if status_box[0] < 500 else "internal"
                status = "client_error" if status_box[0] < 500 else "server_error"
                metrics.record_request(endpoint, "http", None, status, kind)
            metrics.observe_duration(endpoint, "http", time.perf_counter() - t0)

    async def _read_body(
        self, runtime: Any, endpoint: str, scope: dict[str, Any], receive: Any
    ) -> bytes:
        limit = runtime.config.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in JSON_TYPES and endpoint != "models":
            raise ServingError("format", f"content type {ctype!r} not accepted; send JSON")
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
            return body
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
        return body
