"""Look up a charged structure by material id in the local snapshot (``records.jsonl.gz``).

Why lazily and as text: the cleaned records are ~20 MB of structure JSON; most deployments never
use the lookup, so the index is built on the first request that asks for a material id, and each
structure is kept as its JSON text (parsed per request through the same checks as user input).
The file is our own gzip JSON lines, read with ``json`` only: nothing is unpickled.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: Materials Project style ids ("mp-1234", "mvc-637"): a bounded, boring alphabet.
MATERIAL_ID = re.compile(r"^[a-z]{1,8}-[0-9]{1,12}$")


@dataclass
class _Index:
    structures: dict[str, str] = field(default_factory=dict)
    voltages: dict[tuple[str, str], float] = field(default_factory=dict)


class MaterialLookup:
    """Material id -> structure JSON text (and the DFT voltage per ion), loaded once on demand."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._index: _Index | None = None
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.path is not None and self.path.is_file()

    def _load(self) -> _Index:
        with self._lock:
            if self._index is not None:
                return self._index
            index = _Index()
            assert self.path is not None
            with gzip.open(self.path, "rt", encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    cid = str(row.get("charged_id", ""))
                    if cid and cid not in index.structures:
                        index.structures[cid] = json.dumps(row["charged_structure"])
                    ion, volts = row.get("working_ion"), row.get("battery_avg_voltage")
                    if cid and ion and isinstance(volts, int | float):
                        index.voltages.setdefault((cid, str(ion)), float(volts))
            logger.info("material lookup: %d structures from %s", len(index.structures), self.path)
            self._index = index
            return index

    def structure_json(self, material_id: str) -> str | None:
        """The structure as ``Structure.as_dict()`` JSON text, or None if unknown."""
        if not self.available or not MATERIAL_ID.match(material_id):
            return None
        return self._load().structures.get(material_id)

    def voltage(self, material_id: str, ion: str) -> float | None:
        if not self.available or not MATERIAL_ID.match(material_id):
            return None
        return self._load().voltages.get((material_id, ion))
