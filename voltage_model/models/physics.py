"""A physics cross-check of a voltage: CHGNet energies of both ends of one insertion step.

Why: the CGCNN learns voltages from the charged structure alone; when the caller also has the
discharged structure, the textbook average voltage of that step,

    V = -[E(discharged) - E(charged) - dx * E(metal)] / (z * dx),

computed from a universal potential's energies, is an independent estimate to set beside the
learned one. Energies are per formula unit of the host framework (the composition without the
working ion), ``dx`` is the change in working ions per framework formula unit, ``z`` the ion's
charge and ``E(metal)`` the energy per atom of the working ion's own metal.

Energies come from the pretrained CHGNet of :mod:`voltage_model.models.chgnet_backbone` (its
``e`` is eV per atom), on the structures as given: no relaxation of the electrodes, so a
charged structure far from its own minimum makes the voltage too high. Each metal is built here
in its ground-state prototype and relaxed once per process (cell and positions). CHGNet was
trained on MP relaxations, which very likely include the MP electrodes themselves, so agreement
with MP voltages on MP structures is not evidence for new chemistry.

Refusals (different frameworks, no insertion, no metal reference, a structure CHGNet cannot
graph) are :class:`PhysicsError` naming the problem. Nothing here imports the pipeline or the
service; nothing is computed at import.
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

from voltage_model.models import chgnet_backbone

if TYPE_CHECKING:
    from chgnet.graph import CrystalGraph

#: Largest difference of any element's atomic fraction between the two frameworks.
FRAMEWORK_ATOL = 1e-3
#: Smallest insertion (working ions per framework formula unit) that defines a voltage.
MIN_DX = 1e-6
#: Metal relaxation: force (eV/A) and step limits of CHGNet's FIRE + cell filter.
RELAX_FMAX = 0.02
RELAX_STEPS = 500


@dataclass(frozen=True)
class MetalPrototype:
    """A ground-state elemental crystal: space group, lattice and its one Wyckoff site."""

    spacegroup: str
    lattice: tuple[float, ...]  # (a,) cubic, (a, c) hexagonal; experimental, Angstrom
    site: tuple[float, float, float]


_BCC, _FCC, _HCP = "Im-3m", "Fm-3m", "P6_3/mmc"
_ORIGIN, _HCP_SITE = (0.0, 0.0, 0.0), (1 / 3, 2 / 3, 0.25)
#: The working-ion metals, keyed by element (the ion list itself lives in params.yaml).
METALS: dict[str, MetalPrototype] = {
    "Li": MetalPrototype(_BCC, (3.51,), _ORIGIN),
    "Na": MetalPrototype(_BCC, (4.29,), _ORIGIN),
    "K": MetalPrototype(_BCC, (5.33,), _ORIGIN),
    "Rb": MetalPrototype(_BCC, (5.70,), _ORIGIN),
    "Cs": MetalPrototype(_BCC, (6.14,), _ORIGIN),
    "Mg": MetalPrototype(_HCP, (3.21, 5.21), _HCP_SITE),
    "Zn": MetalPrototype(_HCP, (2.66, 4.95), _HCP_SITE),
    "Y": MetalPrototype(_HCP, (3.65, 5.73), _HCP_SITE),
    "Ca": MetalPrototype(_FCC, (5.58,), _ORIGIN),
    "Al": MetalPrototype(_FCC, (4.05,), _ORIGIN),
}
_METAL_LOCK = threading.Lock()


class PhysicsError(ValueError):
    """A pair the physics check refuses; ``reason`` is a short class for counting refusals."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Framework:
    """One cell seen as host framework plus working ions."""

    formula: str  # reduced formula of the framework (the composition without the ion)
    composition: Composition  # the framework's reduced composition
    n_fu: float  # framework formula units in the cell
    x: float  # working ions per framework formula unit


@dataclass(frozen=True)
class PhysicsVoltage:
    """The physics voltage of one insertion step and what it was computed from."""

    ion: str
    voltage: float  # V vs. the metal
    valence: int
    framework: str
    x_charged: float  # working ions per framework formula unit
    x_discharged: float
    dx: float
    energy_charged: float  # eV per framework formula unit
    energy_discharged: float
    metal_energy: float  # eV per metal atom

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def valence(ion: str) -> int:
    """The working ion's charge: its one common positive oxidation state (pymatgen)."""
    try:
        states = Element(ion).common_oxidation_states
    except ValueError:
        raise PhysicsError("no_metal", f"{ion!r} is not an element") from None
    positive = [s for s in states if s > 0]
    if len(positive) != 1:
        raise PhysicsError("no_metal", f"{ion} has no single common charge ({states})")
    return positive[0]


def framework_of(
    composition: Composition, ion: str, reference: Composition | None = None
) -> Framework:
    """``composition`` as framework + ions; formula units counted in ``reference`` units
    (default: the framework's own reduced formula), so two cells of one host compare."""
    composition = composition.element_composition  # oxidation states do not matter here
    host = Composition({el: n for el, n in composition.items() if el.symbol != ion})
    if host.num_atoms == 0:
        raise PhysicsError(
            "no_framework", f"{composition.reduced_formula} has no host besides {ion}"
        )
    reduced = host.reduced_composition if reference is None else reference
    n_fu = host.num_atoms / reduced.num_atoms
    return Framework(reduced.reduced_formula, reduced, n_fu, composition[ion] / n_fu)


def match_frameworks(
    charged: Composition, discharged: Composition, ion: str
) -> tuple[Framework, Framework]:
    """Both cells per formula unit of the charged cell's framework; refuse different hosts or
    a discharged end without more ions than the charged one."""
    valence(ion)  # an unknown ion is refused before any composition arithmetic
    fc = framework_of(charged, ion)
    own = framework_of(discharged, ion)
    a, b = fc.composition.fractional_composition, own.composition.fractional_composition
    elements = {*a.elements, *b.elements}
    if any(abs(a[el] - b[el]) > FRAMEWORK_ATOL for el in elements):
        raise PhysicsError(
            "mismatch",
            f"frameworks differ: charged {charged.reduced_formula} has host {fc.formula}, "
            f"discharged {discharged.reduced_formula} has host {own.formula}; both ends must be "
            f"the same host with and without {ion}",
        )
    fd = framework_of(discharged, ion, reference=fc.composition)
    if fd.x - fc.x <= MIN_DX:
        raise PhysicsError(
            "no_insertion",
            f"the discharged structure must hold more {ion} per {fc.formula} than the charged "
            f"one (charged {fc.x:.4g}, discharged {fd.x:.4g})",
        )
    return fc, fd


def voltage_from_energies(
    charged: Composition, e_charged: float, discharged: Composition, e_discharged: float,
    ion: str, metal_energy: float,
) -> PhysicsVoltage:  # fmt: skip
    """The voltage from CHGNet energies per atom of both cells (pure arithmetic, checked)."""
    fc, fd = match_frameworks(charged, discharged, ion)
    if not all(np.isfinite([e_charged, e_discharged, metal_energy])):
        raise PhysicsError("energy", "CHGNet returned a non-finite energy")
    z = valence(ion)
    per_fu_c = e_charged * charged.num_atoms / fc.n_fu  # CHGNet's e is per atom
    per_fu_d = e_discharged * discharged.num_atoms / fd.n_fu
    dx = fd.x - fc.x
    volts = -(per_fu_d - per_fu_c - dx * metal_energy) / (z * dx)
    return PhysicsVoltage(ion, float(volts), z, fc.formula, float(fc.x), float(fd.x), float(dx),
                          float(per_fu_c), float(per_fu_d), float(metal_energy))  # fmt: skip


def graph_energies(graphs: Sequence[CrystalGraph]) -> np.ndarray:
    """CHGNet energy (eV/atom) of prepared graphs, energy head only, one forward per batch."""
    import torch

    model = chgnet_backbone.load_model()
    out: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(graphs), chgnet_backbone.BATCH_SIZE):
            pred = model.forward(list(graphs[i : i + chgnet_backbone.BATCH_SIZE]), task="e")
            out.extend(float(v) for v in pred["e"].reshape(-1))
    return np.asarray(out, dtype=np.float64)


def to_graph(structure: Structure, what: str = "structure") -> CrystalGraph:
    """CHGNet's graph, its refusals (e.g. an atom with no neighbour within 6 A) as PhysicsError."""
    try:
        return chgnet_backbone.to_graph(structure)
    except (ValueError, RuntimeError, IndexError) as exc:
        raise PhysicsError("graph", f"CHGNet cannot take the {what}: {exc}") from None


def energies_per_atom(structures: Sequence[Structure]) -> np.ndarray:
    """CHGNet energy (eV/atom) of each structure, batched."""
    return graph_energies([to_graph(s) for s in structures])


def metal_structure(ion: str) -> Structure:
    """The metal's primitive ground-state cell at the experimental lattice constants."""
    proto = METALS.get(ion)
    if proto is None:
        known = ", ".join(sorted(METALS))
        raise PhysicsError("no_metal", f"no metal reference for {ion} (known: {known})")
    if proto.spacegroup == _HCP:
        lattice = Lattice.hexagonal(*proto.lattice)
    else:
        lattice = Lattice.cubic(proto.lattice[0])
    cell = Structure.from_spacegroup(proto.spacegroup, lattice, [ion], [list(proto.site)])
    return cell.get_primitive_structure()


@lru_cache(maxsize=16)
def _relaxed_metal_energy(ion: str) -> float:
    model = chgnet_backbone.load_model()  # first: it imports CHGNet's model module alone
    from chgnet.model import StructOptimizer

    # The calculator sets the shared model's isolated-atom response: keep the one it has.
    keep = model.graph_converter.on_isolated_atoms
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = StructOptimizer(model=model, use_device="cpu", on_isolated_atoms=keep)
        final = opt.relax(metal_structure(ion), fmax=RELAX_FMAX, steps=RELAX_STEPS,
                          relax_cell=True, verbose=False)["final_structure"]  # fmt: skip
    return float(energies_per_atom([final])[0])


def metal_energy(ion: str) -> float:
    """CHGNet energy per atom (eV) of the relaxed metal, computed once per process."""
    metal_structure(ion)  # refuse an unknown metal before taking the lock
    with _METAL_LOCK:  # concurrent first callers wait for one relaxation, then hit the cache
        return _relaxed_metal_energy(ion)


def metal_energies(ions: Sequence[str]) -> dict[str, float]:
    """Each ion's metal energy per atom (eV); an ion without a metal reference is left out."""
    out = {}
    for ion in ions:
        with contextlib.suppress(PhysicsError):
            out[ion] = metal_energy(ion)
    return out


def physics_voltage(charged: Structure, discharged: Structure, ion: str) -> PhysicsVoltage:
    """The physics voltage of the step charged -> discharged (refusals before any energy)."""
    match_frameworks(charged.composition, discharged.composition, ion)
    mu = metal_energy(ion)
    e_c, e_d = graph_energies([to_graph(charged, "charged structure"),
                               to_graph(discharged, "discharged structure")])  # fmt: skip
    return voltage_from_energies(charged.composition, e_c, discharged.composition, e_d, ion, mu)
