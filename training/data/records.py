"""The electrode record: one row of the versioned dataset, whatever the source (snapshot or MP API).

Records are stored as gzip-compressed JSON lines: text, diffable, streamable, and never unpickled.
The charged structure travels as a pymatgen ``Structure.as_dict()`` so any stage can rebuild it.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pymatgen.core import Structure

OPTIONAL_FLOAT_FIELDS = (
    "capacity_grav",
    "capacity_vol",
    "energy_grav",
    "energy_vol",
    "max_delta_volume",
)


@dataclass(frozen=True)
class Record:
    """One insertion electrode; ``battery_avg_voltage`` (V vs. the metal) is the target."""

    battery_id: str
    working_ion: str
    charged_id: str
    charged_formula: str
    discharged_id: str
    discharged_formula: str
    battery_avg_voltage: float
    pair_voltage: float | None
    charged_spacegroup: int | None
    charged_nsites: int
    charged_structure: dict[str, Any]
    source: str
    capacity_grav: float | None = None
    capacity_vol: float | None = None
    energy_grav: float | None = None
    energy_vol: float | None = None
    max_delta_volume: float | None = None
    in_npj2022_clean_set: bool | None = None

    def structure(self) -> Structure:
        return Structure.from_dict(self.charged_structure)

    def to_json(self) -> str:
        return json.dumps(asdict(self), allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> Record:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"record has unknown fields: {sorted(unknown)}")
        return cls(**raw)


def optional_float(value: Any) -> float | None:
    """Parse an optional numeric column: empty/None -> None, NaN -> None, else float."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def write_records(path: Path, records: Iterable[Record]) -> int:
    """Write records as gzip JSON lines (deterministic: mtime 0 so the DVC hash is stable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with (
        path.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
    ):
        for rec in records:
            gz.write(rec.to_json().encode() + b"\n")
            n += 1
    return n


def iter_records(path: Path) -> Iterator[Record]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"records file not found: {path}")
    with gzip.open(path, "rt") as fh:
        for line in fh:
            if line.strip():
                yield Record.from_mapping(json.loads(line))


def read_records(path: Path) -> list[Record]:
    return list(iter_records(path))
