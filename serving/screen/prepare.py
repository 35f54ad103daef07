"""Bytes -> checked crystal graphs, and the per-process worker state that parses, builds graphs and
predicts a chunk (``screen_chunk``): the pool's processes and the Ray actors run the same code."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from voltage_model.cif import element_numbers, fast_p1_cif
from voltage_model.graphs.converter import CrystalGraph, validate_structure
from voltage_model.graphs.encoding import MAX_Z, element_data
from voltage_model.structures import MIN_DISTANCE, StructureInputError, parse_structure

if TYPE_CHECKING:
    from serving.screen.predictor import Predictor


@dataclass(frozen=True)
class Prepared:
    """A parsed, checked structure with one graph per distinct converter of the models."""

    id: str
    formula: str
    n_sites: int
    elements: tuple[str, ...]
    graphs: tuple[CrystalGraph, ...]


@dataclass(frozen=True)
class Failed:
    """An input that cannot be screened; ``kind`` uses the service's error kinds."""

    id: str
    kind: str
    message: str


_WORKER: dict[str, Any] = {}


def init_worker(predictor: Predictor, max_sites: int) -> None:
    """Per-process state: the models and converters (inherited, not pickled, under fork)."""
    _WORKER["predictor"] = predictor
    _WORKER["converters"] = [conv for conv, _ in predictor.groups]
    _WORKER["max_sites"] = max_sites


def init_pool_worker(predictor: Predictor, max_sites: int) -> None:
    """Pool initializer: one torch thread per worker (the workers are the parallelism)."""
    torch.set_num_threads(1)
    init_worker(predictor, max_sites)


def formula_of(symbols: Sequence[str]) -> str:
    """Reduced formula of a list of site symbols (pymatgen's, as the service reports it)."""
    from pymatgen.core import Composition

    return Composition(Counter(symbols)).reduced_formula


Arrays = tuple[list[str], np.ndarray, np.ndarray, tuple[bool, bool, bool]]


def _arrays(text: str, fmt: str, max_sites: int) -> Arrays:
    """(symbols, cartesian coords, lattice, pbc) via the fast CIF path or pymatgen + checks."""
    if fmt == "cif":
        fast = _fast_checked(text, max_sites)
        if fast is not None:
            return fast
    structure = parse_structure(text, fmt, max_sites)
    numbers = validate_structure(structure)
    symbols = [element_data()[int(z) - 1].symbol for z in numbers]
    return symbols, structure.cart_coords, structure.lattice.matrix, structure.lattice.pbc


def _fast_checked(text: str, max_sites: int) -> Arrays | None:
    """The fast path plus the checks of ``check_structure`` that are cheap on arrays."""
    fast = fast_p1_cif(text)
    if fast is None:
        return None
    symbols, frac, lattice = fast
    if len(symbols) > max_sites:
        raise StructureInputError(
            "too_many_sites", f"structure has {len(symbols)} sites; the limit is {max_sites}"
        )
    if abs(float(np.linalg.det(lattice))) < 1e-3:
        return None  # let pymatgen name the degenerate lattice
    return symbols, frac @ lattice, lattice, (True, True, True)


def _check_overlap(graph: CrystalGraph) -> None:
    """Sites closer than MIN_DISTANCE are overlapping atoms (same rule as ``check_structure``)."""
    real = graph.nbr_dist[graph.nbr_mask]
    if real.size and float(real.min()) < MIN_DISTANCE:
        raise StructureInputError(
            "overlapping_atoms",
            f"two sites are {float(real.min()):.3f} A apart (minimum {MIN_DISTANCE} A)",
        )


def prepare(key: str, fmt: str, data: bytes) -> Prepared | Failed:
    """Bytes -> checked graphs, or the reason it failed (never raises: screening must go on)."""
    try:
        text = data.decode("utf-8")
        symbols, cart, lattice, pbc = _arrays(text, fmt, _WORKER["max_sites"])
        z_of = element_numbers()
        numbers = np.array([z_of[s] for s in symbols], dtype=np.int16)
        if numbers.max() > MAX_Z:
            raise StructureInputError("unknown_element", f"elements beyond Z={MAX_Z}")
        convs = _WORKER["converters"]
        graphs = tuple(c.convert_arrays(numbers, cart, lattice, pbc) for c in convs)
        _check_overlap(graphs[0])
        return Prepared(key, formula_of(symbols), len(symbols), tuple(sorted(set(symbols))), graphs)
    except UnicodeDecodeError:
        return Failed(key, "parse", "file is not UTF-8 text")
    except StructureInputError as exc:
        return Failed(key, exc.kind, str(exc))
    except Exception as exc:  # one bad file must not stop a screen of millions
        return Failed(key, "parse", f"{type(exc).__name__}: {str(exc)[:200]}")


def screen_chunk(jobs: Sequence[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    """Parse, build graphs and predict one chunk of (id, format, bytes): one record per job.

    The whole chain runs in the worker so that inference, the costliest step for ensembles and
    multi-ion screens, is parallel too; the parent only reads inputs and writes results.
    """
    prepared, out = [], {}
    for job in jobs:
        res = prepare(*job)
        if isinstance(res, Failed):
            out[res.id] = error_record(res)
        else:
            prepared.append(res)
    for rec in _WORKER["predictor"].records(prepared):
        out[rec["id"]] = rec
    return [out[key] for key, _, _ in jobs]


def error_record(f: Failed) -> dict[str, Any]:
    return {"id": f.id, "error": {"kind": f.kind, "message": f.message}}
