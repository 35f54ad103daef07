"""The prediction log: one JSON line per answered prediction, for offline drift / error analysis.

Why a file and not the metrics: drift gauges summarise a sliding window; an analyst needs the
individual predictions (which crystal, which model version, what voltage and uncertainty) to
compare with DFT later, to recompute drift over any period, or to find the requests behind an
alert. Off by default (``VOLTAGE_PREDICTION_LOG`` unset): it costs disk, and structure hashes
are still data about what users sent.

Several workers: each process writes its **own file**, ``<stem>.w<worker index><suffix>`` under
BentoML (``<stem>.p<pid><suffix>`` outside it), e.g. ``predictions.w1.jsonl``, rotated by size
(``VOLTAGE_PREDICTION_LOG_MAX_BYTES``) with ``VOLTAGE_PREDICTION_LOG_BACKUPS`` old files
(``predictions.w1.jsonl.1`` ...). One file per writer makes rotation safe without a lock
(``RotatingFileHandler`` renames files, which two processes sharing one file would race on);
read them all with a glob, ``predictions.*.jsonl*``. Two services on one host need two paths.

The write happens on a background thread (``QueueHandler`` -> ``QueueListener``), so a slow
disk never stalls the event loop that answers requests; the queue is unbounded but a line is
~300 bytes and the listener drains it far faster than predictions are made.

A line::

    {"ts": "2026-...Z", "request_id": "...", "protocol": "http", "endpoint": "predict",
     "ion": "Li", "model": "electrode-voltage-Li", "version": 3, "source": "registry",
     "structure_sha256": "...", "formula": "CoO2", "n_sites": 9, "voltage": 3.9,
     "uncertainty": 0.2, "unseen_elements": [], "material_id": null}

``structure_sha256`` is computed from the parsed structure (lattice and fractional coordinates
rounded to 1e-4, species, sites sorted), so one crystal sent as CIF, POSCAR or JSON hashes the
same; the structure itself is not stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import queue
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def worker_tag() -> str:
    """``w<index>`` inside a BentoML worker, else ``p<pid>``."""
    try:
        import bentoml

        index = bentoml.server_context.worker_index
    except Exception:  # BentoML absent or not initialised: a plain process
        index = None
    return f"w{index}" if index is not None else f"p{os.getpid()}"


def worker_path(path: Path, tag: str | None = None) -> Path:
    """This process's file for the configured ``path`` (``predictions.jsonl`` ->
    ``predictions.w1.jsonl``)."""
    tag = tag or worker_tag()
    suffix = path.suffix or ".jsonl"
    return path.with_name(f"{path.stem if path.suffix else path.name}.{tag}{suffix}")


def structure_hash(structure: Any) -> str:
    """sha256 of a pymatgen Structure's lattice, species and fractional coordinates (rounded to
    1e-4, sites sorted): the same crystal in any input format gives the same hash."""
    lattice = [[round(float(v), 4) + 0.0 for v in row] for row in structure.lattice.matrix]
    sites = sorted(
        (site.species_string, *(round(float(c) % 1.0, 4) % 1.0 + 0.0 for c in site.frac_coords))
        for site in structure
    )
    text = json.dumps({"lattice": lattice, "sites": sites}, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class _Line(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class PredictionLog:
    """Appends prediction lines to this process's rotated JSONL file (see the module doc)."""

    def __init__(self, path: Path, max_bytes: int = 50 * 1024 * 1024, backups: int = 5) -> None:
        self.path = worker_path(Path(path))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        handler.setFormatter(_Line())
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._handler = handler
        # A private logger object (not in the logging tree): nothing else writes to the file.
        self._logger = logging.Logger(f"serving.predictions.{id(self)}", logging.INFO)
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._listener.start()
        logger.info("prediction log: %s", self.path)

    def write(self, record: dict[str, Any]) -> None:
        line = {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **record}
        self._logger.info(json.dumps(line, default=str, ensure_ascii=False))

    def close(self) -> None:
        """Flush what is queued and close the file (idempotent)."""
        if self._listener is not None:
            self._listener.stop()
            self._listener = None  # type: ignore[assignment]
            self._handler.close()
