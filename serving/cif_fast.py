"""A fast path for the commonest CIF: one block, P1 (identity symmetry only), ordered sites.

Why: CIF parsing is most of a request's CPU (about 7 ms of 10 ms for a typical Materials Project
cell; pymatgen's general ``CifParser`` applies symmetry operations, merges sites and sorts
compositions in Python loops). For the CIFs pymatgen itself writes (``CifWriter``) and Materials
Project "computed" cells, none of that changes anything, so this module builds the same
``Structure`` directly from pymatgen's own tokenizer (``CifFile``) and lattice routine.

Same result or no result: it replicates exactly what ``CifParser`` does on such files (the
rounding of coordinates near 1/3 and 2/3, wrapping into [0, 1), the final
``get_sorted_structure``), and returns None for anything else (symmetry operations, partial
occupancies, oxidation states, labels instead of element symbols, magnetic CIFs, sites closer
than pymatgen's merge tolerance, ...) so the caller falls back to ``Structure.from_str``.
tests/test_serving_units.py compares the two on real and synthetic cells.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from pymatgen.core import Element, Structure
from pymatgen.io.cif import CifFile, CifParser, str2float

#: CifParser defaults (``frac_tolerance``, ``site_tolerance``) and its thickness guard.
FRAC_TOLERANCE = 1e-4
SITE_TOLERANCE = 1e-4
MIN_THICKNESS = 0.01
_IDEAL_FRACS = (1 / 3, 2 / 3)
_SPECIAL_SYMBOLS = re.compile("Hw|Ow|Wat|wat|OH|OH2|NO3")  # CifParser._parse_symbol
_SYMOP_KEYS = (
    "_symmetry_equiv_pos_as_xyz",
    "_symmetry_equiv_pos_as_xyz_",
    "_space_group_symop_operation_xyz",
    "_space_group_symop_operation_xyz_",
)
_UNSUPPORTED = ("_space_group_magn", "_atom_site_moment", "_space_group_symop_magn",
                "_atom_type_oxidation_number", "_atom_site_attached_hydrogens",
                "_atom_site_cartn_")  # fmt: skip


def _as_list(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def _frac(text: str) -> float:
    """``str2float`` plus CifParser's snapping of near-1/3 and near-2/3 values."""
    value = str2float(text)
    for ideal in _IDEAL_FRACS:
        if math.isclose(value / ideal, 1, abs_tol=FRAC_TOLERANCE, rel_tol=0):
            value = float(str(ideal))
    return value


def _plain_symbol(symbol: str) -> bool:
    return (
        len(symbol) <= 2
        and symbol == symbol.title()
        and _SPECIAL_SYMBOLS.match(symbol) is None
        and Element.is_valid_symbol(symbol)
    )


def parse_p1_cif(text: str) -> Structure | None:
    """The structure ``Structure.from_str(text, fmt="cif")`` would give, or None when this
    file is not the simple case (then call pymatgen). Raises nothing for odd input."""
    try:
        return _parse(text)
    except Exception:  # any surprise: let pymatgen parse it and report errors its way
        return None


def _parse(text: str) -> Structure | None:
    blocks = CifFile.from_str(text).data
    if len(blocks) != 1:
        return None
    block = next(iter(blocks.values()))
    data = block.data
    if any(prefix in key for key in data for prefix in _UNSUPPORTED):
        return None
    ops = next((data[k] for k in _SYMOP_KEYS if data.get(k)), None)
    if ops is None or {o.replace(" ", "").lower() for o in _as_list(ops)} != {"x,y,z"}:
        return None
    if "_atom_site_type_symbol" not in data or "_atom_site_label" not in data:
        return None
    symbols = _as_list(data["_atom_site_type_symbol"])
    n = len(symbols)
    if n == 0 or not all(_plain_symbol(s) for s in symbols):
        return None
    if "_atom_site_occupancy" in data:
        occupancies = [str2float(o) for o in _as_list(data["_atom_site_occupancy"])]
        if len(occupancies) != n or any(o != 1.0 for o in occupancies):
            return None
    columns = [_as_list(data.get(f"_atom_site_fract_{a}", [])) for a in "xyz"]
    if any(len(c) != n for c in columns):
        return None
    coords = np.array([[_frac(v) for v in col] for col in columns], dtype=float).T
    if not np.isfinite(coords).all():
        return None
    coords = coords - np.floor(coords)  # CifParser: i - math.floor(i) per component
    if n > 1:
        delta = coords[:, None, :] - coords[None, :, :]
        delta -= np.round(delta)
        close = np.all(np.abs(delta) < 2 * SITE_TOLERANCE, axis=-1)
        np.fill_diagonal(close, False)
        if close.any():
            return None  # CifParser would merge these sites: not the simple case
    lattice = CifParser.get_lattice_no_exception(block)
    if any(lattice.d_hkl(hkl) < MIN_THICKNESS for hkl in ((1, 0, 0), (0, 1, 0), (0, 0, 1))):
        return None
    return Structure(lattice, symbols, coords).get_sorted_structure()
