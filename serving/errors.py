"""One error type for every answer that is not a prediction, and its HTTP / gRPC / metric forms.

Why one type: the HTTP API, the gRPC server, the batch endpoints and the command line must agree
on what is the client's fault (400 / INVALID_ARGUMENT), what is "no model for that ion"
(503 / UNAVAILABLE), what is "too busy, retry later" (503 or 429 / RESOURCE_EXHAUSTED, with a
retry delay) and what is a bug (500 / INTERNAL), and the ``kind`` is the label of
``voltage_errors_total`` (docs/CONTRACTS.md). The transports only translate.

Every error body on the HTTP API is :func:`error_dict`'s shape, ``{"error", "kind", "status",
"request_id"}``, whoever produced it (the API method, the request guard, or BentoML's own traffic
limits, reshaped in :mod:`serving.http_guard`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Client errors: the request is wrong and retrying it unchanged will fail again.
CLIENT_KINDS = frozenset(
    {
        "parse",
        "format",
        "unknown_ion",
        "too_many_sites",
        "too_large",
        "unknown_element",
        "nan_coordinates",
        "overlapping_atoms",
        "empty",
        "physics",
    }
)
UNAVAILABLE_KINDS = frozenset({"no_champion"})
#: Load shedding: the request was fine but the service refused it at once to stay responsive;
#: the same request succeeds later (the answer says when: ``Retry-After``).
SHED_KINDS = frozenset({"overloaded", "too_many_requests"})
KINDS = CLIENT_KINDS | UNAVAILABLE_KINDS | SHED_KINDS | {"timeout", "internal"}

#: HTTP status per kind where it is not the plain 400 of a client error.
_HTTP = {
    "too_large": 413,  # the body (or a structure / batch in it) is over a size limit
    "no_champion": 503,
    "overloaded": 503,  # the prediction queue is full
    "too_many_requests": 429,  # more HTTP requests open at once than BentoML's max_concurrency
    "timeout": 504,  # not answered within BentoML's traffic timeout
    "internal": 500,
}
_GRPC = {
    "no_champion": "UNAVAILABLE",
    "overloaded": "RESOURCE_EXHAUSTED",
    "too_many_requests": "RESOURCE_EXHAUSTED",
    "timeout": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
}


@dataclass(frozen=True)
class ServingError(Exception):
    """A request that cannot be answered with a prediction; ``message`` names the problem.

    ``retry_after`` (seconds) is set on shed requests: HTTP sends it as ``Retry-After``, gRPC as
    trailing metadata ``retry-after`` (seconds) and ``grpc-retry-pushback-ms``.
    """

    kind: str
    message: str
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown error kind {self.kind!r}")

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        return _HTTP.get(self.kind, 400)

    @property
    def status_label(self) -> str:
        """The ``status`` label of ``voltage_requests_total``: shed and timed-out requests are
        ``unavailable`` (the client did nothing wrong; VoltageHighErrorRatio counts them)."""
        status = self.http_status
        if status < 500 and self.kind not in SHED_KINDS:
            return "client_error"
        if status == 500:
            return "server_error"
        return "unavailable"

    @property
    def grpc_code_name(self) -> str:
        """Name of the ``grpc.StatusCode`` member (kept as a string: no gRPC import here)."""
        return _GRPC.get(self.kind, "INVALID_ARGUMENT")

    @property
    def retry_after_header(self) -> str | None:
        """``Retry-After`` value (whole seconds, at least 1), or None when not shed."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "status": self.http_status}


def error_dict(
    message: str, kind: str, status: int, request_id: str | None, **extra: Any
) -> dict[str, Any]:
    """The one error body of the HTTP API (``components.schemas.Error`` in ``/docs.json``)."""
    return {"error": message, "kind": kind, "status": status, "request_id": request_id, **extra}


def internal(exc: BaseException) -> ServingError:
    """A bug: the client gets a generic message, the log gets the traceback (caller logs)."""
    return ServingError("internal", f"internal error ({type(exc).__name__}); see the server log")
