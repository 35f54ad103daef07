"""Request fields -> a checked pymatgen Structure (no BentoML, no gRPC here).

JSON input is sanitised by ``voltage_model.structures.safe_structure_dict`` (lattice, species and
fractional coordinates only: pymatgen would otherwise import modules named in site properties),
here before the site limit and NaN checks so oversized or broken input is refused cheaply.

CIF input first tries :mod:`voltage_model.cif` (the P1 case, built directly; identical result),
then pymatgen's general parser; both go through the same ``check_structure``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pymatgen.core import Structure

from serving.errors import ServingError
from voltage_model.cif import parse_p1_cif
from voltage_model.structures import (
    FORMATS,
    StructureInputError,
    check_structure,
    parse_structure,
    safe_structure_dict,
)

DEFAULT_FORMAT = "cif"


def to_structure(
    structure: str | dict[str, Any] | None, fmt: str | None, max_sites: int
) -> Structure:
    """Parse and check one structure; every problem is a ``ServingError`` naming it."""
    fmt_name = (fmt or DEFAULT_FORMAT).strip().lower()
    if fmt_name not in FORMATS:
        raise ServingError("format", f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if structure is None or (isinstance(structure, str) and not structure.strip()):
        raise ServingError("empty", "structure is empty (give 'structure' or 'material_id')")
    if isinstance(structure, dict) and fmt_name != "json":
        raise ServingError("format", f"structure is a JSON object but format is {fmt_name!r}")
    payload: str | dict[str, Any] = structure
    if fmt_name == "json":
        if isinstance(structure, str):
            try:
                structure = json.loads(structure)
            except (ValueError, RecursionError) as exc:
                raise ServingError("parse", f"structure is not valid JSON: {exc}") from None
        try:
            payload = safe_structure_dict(structure)
        except StructureInputError as exc:
            raise ServingError(exc.kind, str(exc)) from None
        if len(payload["sites"]) > max_sites:
            n = len(payload["sites"])
            raise ServingError(
                "too_many_sites", f"structure has {n} sites; the limit is {max_sites}"
            )
        coords = [v for s in payload["sites"] for v in s["abc"]]
        coords += [v for row in payload["lattice"]["matrix"] for v in row]
        if not all(math.isfinite(v) for v in coords):
            raise ServingError("nan_coordinates", "structure has NaN or infinite coordinates")
    try:
        if fmt_name == "cif" and isinstance(payload, str):
            fast = parse_p1_cif(payload)  # same Structure as pymatgen, ~4x cheaper, or None
            if fast is not None:
                check_structure(fast, max_sites)
                return fast
        return parse_structure(payload, fmt_name, max_sites=max_sites)
    except StructureInputError as exc:
        raise ServingError(exc.kind, str(exc)) from None
