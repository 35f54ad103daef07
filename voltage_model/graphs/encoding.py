"""CGCNN's 92-dimensional one-hot atom encoding, regenerated from ``mendeleev`` element data.

Why regenerate instead of shipping CGCNN's ``atom_init.json``: the table is then reproducible,
its provenance is a package version rather than an opaque file, and its conventions are written
down (here and in docs/encoding.md).  The conventions below were reverse-engineered from the
reference table so that ours agrees with it wherever the element data agrees; the remaining
differences come from the data source and are listed in docs/encoding.md and asserted, element by
element, in tests/voltage_model/test_encoding.py.

Layout (offsets into the 92-vector)::

    block          slots  offset  rule
    group            19      0    slot = IUPAC group 1..18; slot 0 = lanthanide/actinide (f-block)
    period            7     19    slot = period - 1
    electroneg.      10     26    Pauling, 10 bins over [0.5, 4.0]
    covalent rad.    10     36    Pyykko single-bond radius, pm, 10 bins over [25, 250]
    valence e-       12     46    slot = n_valence - 1 (1..12)
    ln(1st IE/eV)    10     58    10 bins over [1.3, 3.3]
    electron aff.    10     68    eV, 10 bins over [-3.0, 3.7]
    block             4     78    s, p, d, f
    ln(atomic vol)   10     82    cm^3/mol, 10 bins over [1.5, 4.3]

Conventions (all reproduce the reference table):

* Binned features use edges ``np.linspace(lo, hi, 11)`` and right-closed bins ``(e_k, e_k+1]``
  (the first bin also holds ``lo``): a value on an inner edge falls into the lower bin.
* A value that is missing, or outside ``[lo, hi]``, leaves its whole block zero (no clipping).
* f-block = La..Yb and Ac..No (group slot 0); Lu and Lr are group 3, d-block.  This is the older
  table layout the reference uses; mendeleev itself places La/Ac in group 3 and Lu/Lr in the
  f-block.
* Valence electrons: s/p-block = electrons in the outermost shell; d-block = outermost ``ns`` plus
  ``(n-1)d`` electrons, with n the highest occupied shell (hence Pd [Kr]4d10 -> 4s2+3d10 = 12,
  as in the reference); f-block = the outer ``ns`` electrons (2).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

ENCODING_VERSION = "cgcnn92-mendeleev-v1"
N_FEATURES = 92
MAX_Z = 100

# f-block under the reference layout (La..Yb, Ac..No).
_F_BLOCK = frozenset(range(57, 71)) | frozenset(range(89, 103))
_BLOCK_SLOT = {"s": 0, "p": 1, "d": 2, "f": 3}


@dataclass(frozen=True)
class FeatureBlock:
    """One contiguous one-hot block of the 92-vector."""

    name: str
    offset: int
    size: int
    lo: float | None = None  # binned blocks only
    hi: float | None = None


BLOCKS: tuple[FeatureBlock, ...] = (
    FeatureBlock("group", 0, 19),
    FeatureBlock("period", 19, 7),
    FeatureBlock("electronegativity", 26, 10, 0.5, 4.0),
    FeatureBlock("covalent_radius", 36, 10, 25.0, 250.0),
    FeatureBlock("valence_electrons", 46, 12),
    FeatureBlock("first_ionization_energy", 58, 10, 1.3, 3.3),
    FeatureBlock("electron_affinity", 68, 10, -3.0, 3.7),
    FeatureBlock("block", 78, 4),
    FeatureBlock("atomic_volume", 82, 10, 1.5, 4.3),
)
BLOCK_BY_NAME = {b.name: b for b in BLOCKS}


def bin_index(value: float | None, lo: float, hi: float, n_bins: int = 10) -> int | None:
    """Bin of ``value`` among ``n_bins`` right-closed bins over [lo, hi]; None if missing/out.

    Right-closed with float64 ``linspace`` edges is the convention that reproduces every binned
    entry of the reference table whose underlying value mendeleev agrees on (e.g. Si, EN 1.9,
    sits exactly on an edge and is in the lower bin there).
    """
    if value is None or not math.isfinite(value) or value < lo or value > hi:
        return None
    edges = np.linspace(lo, hi, n_bins + 1)
    idx = int(np.searchsorted(edges, value, side="left")) - 1
    return min(max(idx, 0), n_bins - 1)


def _log(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return math.log(value)


def _finite(value: object) -> float | None:
    """mendeleev reports missing data as NaN/None; normalise to None."""
    if value is None:
        return None
    value = float(value)  # type: ignore[arg-type]
    return value if math.isfinite(value) else None


def _group_block(z: int, group_id: float | None, block: str) -> tuple[int | None, str]:
    """(group slot, block) under the reference layout (see module docstring)."""
    if z in _F_BLOCK:
        return 0, "f"
    if z in (71, 103):  # Lu, Lr: group 3 of the d-block in the reference layout
        return 3, "d"
    return (int(group_id) if group_id is not None else None), block


def _valence_electrons(conf: dict[tuple[int, str], int], block: str) -> int:
    """Valence electron count under the reference convention (see module docstring)."""
    n_max = max(n for n, _ in conf)
    if block in ("s", "p"):
        return sum(v for (n, _), v in conf.items() if n == n_max)
    if block == "d":
        return conf.get((n_max, "s"), 0) + conf.get((n_max - 1, "d"), 0)
    return conf.get((n_max, "s"), 0)


@dataclass(frozen=True)
class ElementData:
    """The raw (pre-binning) quantities for one element, kept for docs and debugging."""

    z: int
    symbol: str
    group: int | None
    period: int
    electronegativity: float | None
    covalent_radius: float | None
    valence_electrons: int
    ln_first_ionization_energy: float | None
    electron_affinity: float | None
    block: str
    ln_atomic_volume: float | None


@functools.lru_cache(maxsize=1)
def element_data(max_z: int = MAX_Z) -> tuple[ElementData, ...]:
    """Read every element 1..max_z from mendeleev in two table queries (per-element is slow)."""
    from mendeleev.econf import ElectronicConfiguration
    from mendeleev.fetch import fetch_table

    elements = fetch_table("elements").set_index("atomic_number")
    ies = fetch_table("ionizationenergies")
    first_ie = ies[ies["ion_charge"] == 0].set_index("atomic_number")["ionization_energy"]
    out = []
    for z in range(1, max_z + 1):
        row = elements.loc[z]
        group, block = _group_block(z, _finite(row["group_id"]), str(row["block"]))
        conf = ElectronicConfiguration(row["electronic_configuration"]).conf
        weight, density = _finite(row["atomic_weight"]), _finite(row["density"])
        volume = weight / density if weight and density else None
        out.append(
            ElementData(
                z=z,
                symbol=str(row["symbol"]),
                group=group,
                period=int(row["period"]),
                electronegativity=_finite(row["en_pauling"]),
                covalent_radius=_finite(row["covalent_radius_pyykko"]),
                valence_electrons=_valence_electrons(conf, block),
                ln_first_ionization_energy=_log(_finite(first_ie.get(z))),
                electron_affinity=_finite(row["electron_affinity"]),
                block=block,
                ln_atomic_volume=_log(volume),
            )
        )
    return tuple(out)


def _slots(el: ElementData) -> dict[str, int | None]:
    """Slot within each block for one element (None = block left zero)."""

    def binned(name: str, value: float | None) -> int | None:
        b = BLOCK_BY_NAME[name]
        return bin_index(value, b.lo, b.hi, b.size)  # type: ignore[arg-type]

    def categorical(value: int | None, size: int) -> int | None:
        return value if value is not None and 0 <= value < size else None

    return {
        "group": categorical(el.group, 19),
        "period": categorical(el.period - 1, 7),
        "electronegativity": binned("electronegativity", el.electronegativity),
        "covalent_radius": binned("covalent_radius", el.covalent_radius),
        "valence_electrons": categorical(el.valence_electrons - 1, 12),
        "first_ionization_energy": binned("first_ionization_energy", el.ln_first_ionization_energy),
        "electron_affinity": binned("electron_affinity", el.electron_affinity),
        "block": _BLOCK_SLOT.get(el.block),
        "atomic_volume": binned("atomic_volume", el.ln_atomic_volume),
    }


@functools.lru_cache(maxsize=4)
def _table(max_z: int) -> np.ndarray:
    table = np.zeros((max_z + 1, N_FEATURES), dtype=np.float32)
    for el in element_data(MAX_Z)[:max_z]:
        for name, slot in _slots(el).items():
            if slot is not None:
                table[el.z, BLOCK_BY_NAME[name].offset + slot] = 1.0
    table.setflags(write=False)
    return table


def encoding_table(max_z: int = MAX_Z) -> np.ndarray:
    """(max_z + 1, 92) float32 one-hot table; row 0 is zeros, row z encodes element z.

    Cached (mendeleev queries take about a second) and returned read-only so that no caller can
    corrupt the shared copy; use ``.copy()`` to get a writable one.
    """
    if not 1 <= max_z <= MAX_Z:
        raise ValueError(f"max_z must be in 1..{MAX_Z}, got {max_z}")
    return _table(max_z)


def encoding_fingerprint(max_z: int = MAX_Z) -> str:
    """Short sha256 of the table: lets a checkpoint detect that element data changed underneath."""
    return hashlib.sha256(encoding_table(max_z).tobytes()).hexdigest()[:16]


def decode(vector: np.ndarray) -> dict[str, int | None]:
    """Inverse of the encoding for one row: slot per block (None if the block is all zero)."""
    out: dict[str, int | None] = {}
    for b in BLOCKS:
        hot = np.flatnonzero(np.asarray(vector)[b.offset : b.offset + b.size])
        out[b.name] = int(hot[0]) if hot.size else None
    return out
