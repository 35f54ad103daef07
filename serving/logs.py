"""Structured logs: one JSON object per line, and a request id that follows each request.

Why: an operator must match the error a user reports (its body and the ``X-Request-ID`` header
carry ``request_id``) to the service's log line for that request, and feed the lines to a log
store without regex parsing. Everything here is the standard library (``logging`` + ``json``).

* :class:`RequestContext` lives in a :class:`contextvars.ContextVar` for the duration of one
  request (HTTP: :mod:`serving.http_guard`; gRPC: :mod:`serving.grpc_server`). The predictor
  fills in what it learns (ion, model version, error kind) and every log record emitted while
  the request runs, including tracebacks from worker threads started with ``asyncio.to_thread``
  (which copies the context), carries its ``request_id``.
* :func:`access_line` writes the one ``"event": "request"`` line per request on the
  ``serving.access`` logger.
* :func:`configure` gives the ``serving`` loggers a JSON handler on stderr (``VOLTAGE_LOG_FORMAT``
  ``json``, the default, or ``text``); BentoML's own loggers keep BentoML's format.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: The header (HTTP) and metadata key (gRPC, lower case) that carry the request id both ways.
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_KEY = "x-request-id"
#: An incoming id is kept only if it looks like an id: no spaces, quotes or control characters
#: can reach a log line or a header through it.
_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
ACCESS_LOGGER = "serving.access"
_HANDLER_TAG = "_voltage_handler"


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(value: str | bytes | None) -> str:
    """The client's id when it is a sane one, else a new one."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and _ID_OK.match(value):
        return value
    return new_request_id()


@dataclass
class RequestContext:
    """What is known about the request being answered (filled in as it goes)."""

    request_id: str
    protocol: str
    endpoint: str | None = None
    ions: list[str] = field(default_factory=list)
    model_versions: list[int] = field(default_factory=list)
    error_kind: str | None = None
    items: int | None = None
    #: Set when the API method counted the request itself (the guard then does not).
    recorded: bool = False
    started: float = field(default_factory=time.perf_counter)

    def note_prediction(self, ion: str, version: int) -> None:
        if ion not in self.ions:
            self.ions.append(ion)
        if version not in self.model_versions:
            self.model_versions.append(version)

    def note_ion(self, ion: str | None) -> None:
        if ion and ion not in self.ions:
            self.ions.append(ion)

    def note_error(self, kind: str) -> None:
        if self.error_kind is None:
            self.error_kind = kind

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "voltage_request", default=None
)


def current() -> RequestContext | None:
    """The request being answered in this task / thread, if any."""
    return _CURRENT.get()


def current_request_id() -> str | None:
    ctx = _CURRENT.get()
    return ctx.request_id if ctx is not None else None


class bound:  # lower case: used like a function, ``with logs.bound(ctx):``
    """Make ``ctx`` the current request for the code inside (and tasks/threads it starts).

    A class, not ``@contextmanager``: a generator-based manager re-raises the exception of the
    block by assigning its ``__traceback__``, which the frozen ``ServingError`` refuses.
    """

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self._token: contextvars.Token[RequestContext | None] | None = None

    def __enter__(self) -> RequestContext:
        self._token = _CURRENT.set(self.ctx)
        return self.ctx

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) to every record, from the current request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


#: LogRecord attributes that are not user fields (everything else given as ``extra`` is).
_RESERVED = frozenset(
    vars(logging.LogRecord("x", 0, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "request_id", "taskName"}
)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "request_id", ...extra}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain alternative (``VOLTAGE_LOG_FORMAT=text``), request id included."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {k: v for k, v in vars(record).items()
                  if k not in _RESERVED and not k.startswith("_")}  # fmt: skip
        return f"{line} {json.dumps(fields, default=str)}" if fields else line


def configure(level: str = "INFO", fmt: str = "json", stream: Any = None) -> logging.Logger:
    """Give the ``serving`` logger tree one handler of the chosen format (idempotent).

    ``propagate`` is turned off so BentoML's root handlers do not print the same record again
    in their plain format.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"VOLTAGE_LOG_FORMAT must be json or text, got {fmt!r}")
    root = logging.getLogger("serving")
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_TAG, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    setattr(handler, _HANDLER_TAG, True)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.propagate = False
    return root


def access_line(ctx: RequestContext, status: int | str, **fields: Any) -> None:
    """The one ``request`` line of a request: id, protocol, endpoint, ion(s), model version(s),
    status, latency and error kind (None when answered). Extra ``fields`` are added as given."""
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.isEnabledFor(logging.INFO):
        return
    ions = ctx.ions
    versions = ctx.model_versions
    record: dict[str, Any] = {
        "event": "request",
        "protocol": ctx.protocol,
        "endpoint": ctx.endpoint,
        "status": status,
        "latency_ms": round(ctx.elapsed_ms(), 3),
        "ion": ions[0] if len(ions) == 1 else (ions or None),
        "model_version": versions[0] if len(versions) == 1 else (versions or None),
        "error_kind": ctx.error_kind,
    }
    if ctx.items is not None:
        record["items"] = ctx.items
    record.update(fields)
    logger.info("request", extra={**record, "request_id": ctx.request_id})
