"""Parse and check user-supplied structures (CIF, POSCAR, pymatgen JSON) before prediction.

Shared by the MLflow pyfunc, the service and the ``screen``/``predict`` commands. Every problem is
a ``StructureInputError`` whose ``kind`` names the problem class (the service counts errors by
kind) and whose message names the problem for the user. JSON input goes through
``Structure.from_dict`` on parsed JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
from pymatgen.core import Structure

FORMATS = ("cif", "poscar", "json")
MAX_Z = 100
MIN_DISTANCE = 0.5  # Angstrom; closer sites are overlapping atoms, not a crystal


class StructureInputError(ValueError):
    """Bad input: ``kind`` is one of the service's error kinds (parse, format, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _parse(text: str | dict[str, Any], fmt: str) -> Structure:
    if fmt == "json":
        data = json.loads(text) if isinstance(text, str) else text
        if not isinstance(data, dict):
            raise ValueError("JSON structure must be an object (pymatgen Structure.as_dict())")
        return Structure.from_dict(data)
    if not isinstance(text, str):
        raise ValueError(f"{fmt} structure must be a string")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt=fmt)


def parse_structure(text: str | dict[str, Any] | None, fmt: str, max_sites: int = 500) -> Structure:
    """Parse ``text`` as ``fmt`` and check it is a structure the model can take."""
    fmt = (fmt or "").lower()
    if fmt not in FORMATS:
        raise StructureInputError("format", f"unknown format {fmt!r}; use one of {FORMATS}")
    if text is None or (isinstance(text, str) and not text.strip()):
        raise StructureInputError("empty", "structure is empty")
    try:
        structure = _parse(text, fmt)
    except StructureInputError:
        raise
    except Exception as exc:  # pymatgen raises many error types for malformed input
        msg = f"cannot parse {fmt} structure: {str(exc)[:200]}"
        raise StructureInputError("parse", msg) from None
    check_structure(structure, max_sites)
    return structure


def check_structure(structure: Structure, max_sites: int = 500) -> None:
    n = len(structure)
    if n == 0:
        raise StructureInputError("empty", "structure has no sites")
    if n > max_sites:
        raise StructureInputError(
            "too_many_sites", f"structure has {n} sites; the limit is {max_sites}"
        )
    if not structure.is_ordered:
        raise StructureInputError("parse", "structure is disordered (partial occupancies)")
    bad = sorted({sp.symbol for sp in structure.species if not 0 < sp.Z <= MAX_Z})
    if bad:
        raise StructureInputError(
            "unknown_element", f"elements outside the encoding (Z 1..{MAX_Z}): {', '.join(bad)}"
        )
    coords = np.asarray(structure.frac_coords, dtype=float)
    lattice = np.asarray(structure.lattice.matrix, dtype=float)
    if not (np.isfinite(coords).all() and np.isfinite(lattice).all()):
        raise StructureInputError("nan_coordinates", "structure has NaN or infinite coordinates")
    volume = abs(float(np.linalg.det(lattice)))
    if not math.isfinite(volume) or volume < 1e-3:
        raise StructureInputError("parse", "lattice is degenerate (zero volume)")
    if n > 1:
        dist = structure.distance_matrix
        np.fill_diagonal(dist, np.inf)
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        if dist[i, j] < MIN_DISTANCE:
            raise StructureInputError(
                "overlapping_atoms",
                f"sites {i} ({structure[i].specie}) and {j} ({structure[j].specie}) are "
                f"{dist[i, j]:.3f} A apart (minimum {MIN_DISTANCE} A)",
            )
