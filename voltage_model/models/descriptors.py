"""Composition descriptors of a crystal graph, for heads that read them beside the pooled vector.

Why: with 100-400 crystals per ion, a GP head on the frozen Li backbone's pooled vector alone
misses chemistry the Li backbone never had to tell apart, which the composition baselines see
directly (Magpie statistics). Appending the descriptors to the head's input lets the marginal
likelihood weigh both (see ``gp_head.fit_gp_head``).

The descriptors are computed from the graph's own atomic numbers, never from a table's formula,
so training (graphs from the store) and serving (graphs from a request) describe a crystal the
same way. The featuriser is the baselines' one (matminer, ``FEATURE_VERSION``); a checkpoint
records that version and loading refuses a different installed featuriser.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from pymatgen.core import Composition, Element

from voltage_model.composition import FEATURE_VERSION, composition_features, feature_names

if TYPE_CHECKING:
    from voltage_model.graphs.converter import CrystalGraph


class GraphSource(Protocol):
    """Anything that hands out cached graphs by id (``training.graphs.store.GraphStore``)."""

    def get(self, key: str) -> CrystalGraph: ...

DESCRIPTOR_VERSION = FEATURE_VERSION


def formula_of(atomic_numbers: Iterable[int]) -> str:
    """The reduced formula of a set of atoms (what the descriptors depend on: fractions only)."""
    counts: dict[Element, float] = {}
    for z in atomic_numbers:
        el = Element.from_Z(int(z))
        counts[el] = counts.get(el, 0.0) + 1.0
    if not counts:
        raise ValueError("a crystal without atoms has no composition")
    return Composition(counts).reduced_formula


@lru_cache(maxsize=65536)
def _row(formula: str) -> tuple[float, ...]:
    return tuple(composition_features([formula])[0][0])


def formula_descriptors(formulas: Sequence[str]) -> np.ndarray:
    """(n, n_descriptors) float64, NaN where an element lacks tabulated data (cached by formula)."""
    n = len(feature_names())
    return np.array([_row(f) for f in formulas], dtype=np.float64).reshape(len(formulas), n)


def graph_descriptors(atomic_numbers: Sequence[np.ndarray]) -> np.ndarray:
    """Descriptors of crystals given each crystal's atomic numbers."""
    return formula_descriptors([formula_of(z) for z in atomic_numbers])


def store_descriptors(store: GraphSource, ids: Sequence[str]) -> np.ndarray:
    """Descriptors of cached graphs, from their atomic numbers."""
    return graph_descriptors([store.get(i).atomic_numbers for i in ids])


def batch_descriptors(atomic_numbers: torch.Tensor, crystal_idx: torch.Tensor,
                      n_crystals: int) -> torch.Tensor:  # fmt: skip
    """Descriptors (n_crystals, n_descriptors) float64 of a collated batch's crystals."""
    z = atomic_numbers.cpu().numpy()
    owner = crystal_idx.cpu().numpy()
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(n_crystals + 1))
    per = [z[order[bounds[i] : bounds[i + 1]]] for i in range(n_crystals)]
    return torch.from_numpy(graph_descriptors(per))
