"""One error type for every answer that is not a prediction, and its HTTP / gRPC / metric forms.

Why one type: the HTTP API, the gRPC server, the batch endpoints and the command line must agree
on what is the client's fault (400 / INVALID_ARGUMENT), what is "no model for that ion"
(503 / UNAVAILABLE) and what is a bug (500 / INTERNAL), and the ``kind`` is the label of
``voltage_errors_total`` (docs/CONTRACTS.md). The transports only translate.
"""

from __future__ import annotations

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
KINDS = CLIENT_KINDS | UNAVAILABLE_KINDS | {"internal"}


@dataclass(frozen=True)
class ServingError(Exception):
    """A request that cannot be answered with a prediction; ``message`` names the problem."""

    kind: str
    message: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown error kind {self.kind!r}")

    def __str__(self) -> str:
        return self.message

    @property
    def http_status(self) -> int:
        if self.kind in CLIENT_KINDS:
            return 400
        if self.kind in UNAVAILABLE_KINDS:
            return 503
        return 500

    @property
    def status_label(self) -> str:
        """The ``status`` label of ``voltage_requests_total``."""
        return {400: "client_error", 503: "unavailable"}.get(self.http_status, "server_error")

    @property
    def grpc_code_name(self) -> str:
        """Name of the ``grpc.StatusCode`` member (kept as a string: no gRPC import here)."""
        return {400: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}.get(self.http_status, "INTERNAL")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "status": self.http_status}


def internal(exc: BaseException) -> ServingError:
    """A bug: the client gets a generic message, the log gets the traceback (caller logs)."""
    return ServingError("internal", f"internal error ({type(exc).__name__}); see the server log")
