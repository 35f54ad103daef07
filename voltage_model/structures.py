"""Parse and check user-supplied structures (CIF, POSCAR, pymatgen JSON) before prediction.

Shared by the MLflow pyfunc, the service and the ``screen``/``predict`` commands. Every problem is
a ``StructureInputError`` whose ``kind`` names the problem class (the service counts errors by
kind) and whose message names the problem for the user.

JSON input is never handed to ``Structure.from_dict`` as given: pymatgen decodes each site's
``properties`` with monty's ``MontyDecoder``, which imports any module named by an ``"@module"``
key and calls that class's ``from_dict``. A prediction needs lattice, species and fractional
coordinates only, so ``safe_structure_dict`` rebuilds the JSON from those (plain numbers and
strings) first; properties and every ``@``-key are dropped. Nothing is unpickled or imported.
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
        return Structure.from_dict(safe_structure_dict(data))
    if not isinstance(text, str):
        raise ValueError(f"{fmt} structure must be a string")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Structure.from_str(text, fmt=fmt)


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StructureInputError("parse", f"JSON structure: {where} must be a number")
    return float(value)


def _vector(value: Any, where: str, n: int = 3) -> list[float]:
    if not isinstance(value, list) or len(value) != n:
        raise StructureInputError("parse", f"JSON structure: {where} must be a list of {n} numbers")
    return [_num(v, where) for v in value]


def _species(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise StructureInputError(
            "parse", f"JSON structure: {where}.species must be a non-empty list"
        )
    out = []
    for sp in value:
        if not isinstance(sp, dict) or not isinstance(sp.get("element"), str):
            raise StructureInputError(
                "parse", f"JSON structure: {where}.species needs 'element' names"
            )
        clean: dict[str, Any] = {"element": sp["element"], "occu": _num(sp.get("occu", 1), where)}
        for key in ("oxidation_state", "spin"):
            if sp.get(key) is not None:
                clean[key] = _num(sp[key], f"{where}.{key}")
        out.append(clean)
    return out


def safe_structure_dict(data: Any) -> dict[str, Any]:
    """The subset of ``Structure.as_dict()`` needed to rebuild the structure, as plain values."""
    if not isinstance(data, dict):
        raise StructureInputError(
            "parse", "JSON structure must be an object (pymatgen Structure.as_dict())"
        )
    lattice = data.get("lattice")
    if not isinstance(lattice, dict) or "matrix" not in lattice:
        raise StructureInputError("parse", "JSON structure: 'lattice.matrix' is missing")
    matrix = lattice["matrix"]
    if not isinstance(matrix, list) or len(matrix) != 3:
        raise StructureInputError("parse", "JSON structure: 'lattice.matrix' must be 3 x 3 numbers")
    clean_lattice: dict[str, Any] = {"matrix": [_vector(r, "lattice.matrix") for r in matrix]}
    pbc = lattice.get("pbc")
    if isinstance(pbc, list) and len(pbc) == 3 and all(isinstance(b, bool) for b in pbc):
        clean_lattice["pbc"] = pbc
    sites = data.get("sites")
    if not isinstance(sites, list):
        raise StructureInputError("parse", "JSON structure: 'sites' must be a list")
    clean_sites = []
    for i, site in enumerate(sites):
        if not isinstance(site, dict):
            raise StructureInputError("parse", f"JSON structure: sites[{i}] must be an object")
        if "abc" not in site:
            raise StructureInputError("parse", f"JSON structure: sites[{i}].abc is missing")
        clean_sites.append(
            {
                "species": _species(site.get("species"), f"sites[{i}]"),
                "abc": _vector(site["abc"], f"sites[{i}].abc"),
            }
        )
    out: dict[str, Any] = {"lattice": clean_lattice, "sites": clean_sites}
    if data.get("charge") is not None:
        out["charge"] = _num(data["charge"], "charge")
    return out


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
