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
tests/serving/test_serving_units.py compares the two on real and synthetic cells.

Two fast paths live here, one per caller, under the same rule (the plain case exactly, else None):
``parse_p1_cif`` (the service: a ``Structure`` through pymatgen's tokenizer) and ``fast_p1_cif``
(the screen, ``serving/screen/prepare.py``: plain arrays through a line tokenizer, ~5x cheaper than
pymatgen, with ``served_structure`` giving the service's ``Structure`` from them). They share
CifParser's constants (``FRAC_TOLERANCE``, the 1/3 and 2/3 snapping); tests/serving/test_screen.py
and tests/serving/test_screen_tiers.py compare the second with pymatgen.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
from pymatgen.core import Element, Structure
from pymatgen.io.cif import CifFile, CifParser, str2float

from voltage_model.structures import check_structure, parse_structure

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


# =============================================================================== arrays (screening)
# The screen's variant (``serving/screen/prepare.py``): its own line tokenizer, arrays instead of a
# ``Structure`` (graphs are built from arrays in its worker processes), pymatgen's site order only
# on request (``served_structure``). Same rule as ``parse_p1_cif``: the plain case exactly, or None.
_SYMBOL = re.compile(r"[A-Z][a-z]?")
_CELL_KEYS = tuple(
    f"_cell_{k}"
    for k in ("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma")
)
_PLAIN_SYMOP_KEYS = ("_symmetry_equiv_pos_as_xyz", "_space_group_symop_operation_xyz")


_Z_OF: dict[str, int] = {}


def element_numbers() -> dict[str, int]:
    """Element symbol -> Z (filled on first use: element data costs a mendeleev read)."""
    if not _Z_OF:
        from voltage_model.graphs.encoding import element_data

        _Z_OF.update({el.symbol: el.z for el in element_data()})
    return _Z_OF


def _cif_blocks(text: str) -> tuple[dict[str, str], list[tuple[list[str], list[str]]]] | None:
    """(scalar tags, loops) of a one-block CIF, or None when the layout is not the plain one."""
    scalars: dict[str, str] = {}
    loops: list[tuple[list[str], list[str]]] = []
    lines = text.splitlines()
    n_blocks, i = 0, 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        low = line.lower()
        if low.startswith("data_"):
            n_blocks += 1
        elif low == "loop_":
            headers: list[str] = []
            while i < len(lines) and lines[i].strip().startswith("_"):
                headers.append(lines[i].strip().lower())
                i += 1
            rows: list[str] = []
            while i < len(lines):
                row = lines[i].strip()
                if row.startswith(("_", ";")) or row.lower().startswith(("loop_", "data_")):
                    break
                if row and not row.startswith("#"):
                    rows.append(row)
                i += 1
            loops.append((headers, rows))
        elif line.startswith("_"):
            parts = line.split(None, 1)
            if len(parts) != 2:  # value on the next line(s): not the plain layout
                return None
            scalars[parts[0].lower()] = parts[1].strip()
        else:  # text fields (;) or anything unexpected
            return None
    return (scalars, loops) if n_blocks == 1 else None


def _identity_only(loops: list[tuple[list[str], list[str]]]) -> bool:
    """True when the CIF's symmetry-operation loop holds the identity and nothing else."""
    for headers, rows in loops:
        if any(h in _PLAIN_SYMOP_KEYS for h in headers):
            if len(rows) != 1:
                return False
            op = re.sub(r"[\s'\"]", "", rows[0]).lower()
            return op.endswith("x,y,z") and (op[:-5] == "" or op[:-5].isdigit())
    return False


def _atom_sites(loops: list[tuple[list[str], list[str]]]) -> tuple[list[str], np.ndarray] | None:
    """(symbols, frac coords) of the atom-site loop; None unless plain and fully occupied."""
    z_of = element_numbers()
    for headers, rows in loops:
        if "_atom_site_fract_x" not in headers:
            continue
        if "_atom_site_type_symbol" not in headers:
            return None
        col = {h: k for k, h in enumerate(headers)}
        occ = col.get("_atom_site_occupancy")
        ix = [col["_atom_site_fract_x"], col["_atom_site_fract_y"], col["_atom_site_fract_z"]]
        symbols, coords = [], []
        for row in rows:
            tok = row.split()
            if len(tok) != len(headers):
                return None
            sym = tok[col["_atom_site_type_symbol"]]
            if not _SYMBOL.fullmatch(sym) or sym not in z_of:
                return None
            if occ is not None and float(tok[occ]) != 1.0:
                return None
            symbols.append(sym)
            coords.append([float(tok[k]) for k in ix])
        return symbols, np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    return None


def _ideal_fracs(frac: np.ndarray) -> np.ndarray:
    """pymatgen's rounding of coordinates within 1e-4 (relative) of 1/3 and 2/3."""
    out = frac.copy()
    for ideal in _IDEAL_FRACS:
        out[np.abs(frac / ideal - 1.0) <= FRAC_TOLERANCE] = ideal
    return out


def fast_p1_cif(text: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(symbols, frac coords in [0, 1), lattice matrix) of a plain P1 CIF, else None.

    Plain = one data block, only the identity symmetry operation, one atom-site loop with type
    symbols, full occupancies, no uncertainties or text fields: what pymatgen's ``CifWriter``
    and Materials Project produce.  The result equals pymatgen's ``Structure.from_str`` up to
    the site order (pymatgen sorts by species), which the model is invariant to.  None means
    "use pymatgen", never "invalid".
    """
    try:
        parsed = _cif_blocks(text)
        if parsed is None:
            return None
        scalars, loops = parsed
        if any(k.startswith(("_space_group_magn", "_parent_space_group")) for k in scalars):
            return None  # magnetic CIF: pymatgen has a dedicated path
        if not _identity_only(loops):
            return None
        sites = _atom_sites(loops)
        if sites is None or not sites[0]:
            return None
        cell = [float(scalars[k]) for k in _CELL_KEYS]
    except (KeyError, ValueError):
        return None
    if not all(math.isfinite(v) for v in cell) or not np.isfinite(sites[1]).all():
        return None
    from pymatgen.core import Lattice

    frac = _ideal_fracs(sites[1])
    return sites[0], frac - np.floor(frac), Lattice.from_parameters(*cell).matrix


def served_structure(text: str, fmt: str, max_sites: int) -> Any:
    """The ``parse_structure`` result, ~5x cheaper for plain P1 CIFs: ``fast_p1_cif`` in
    pymatgen's site order (``get_sorted_structure``, as its CIF parser ends), same checks.

    Identical species order, coordinates and lattice to ``parse_structure`` on every CIF of the
    snapshot (7,583, compared exactly); tier 2 (``serving/screen/tiers.py``) reads files with it
    so that its figures stay the service's answers at ~2 ms of parsing instead of ~12 ms."""
    fast = fast_p1_cif(text) if fmt == "cif" else None
    if fast is None:
        return parse_structure(text, fmt, max_sites)
    from pymatgen.core import Lattice, Structure

    symbols, frac, lattice = fast
    structure = Structure(Lattice(lattice), symbols, frac).get_sorted_structure()
    check_structure(structure, max_sites)
    return structure
