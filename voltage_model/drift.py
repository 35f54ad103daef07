"""Drift statistics shared by the reference builder and the service: one binning rule, one PSI,
one element rule.

``training/stages/drift_reference.py`` bins each ion's training inputs with these functions into
``data/drift_reference.json``; ``serving/drift.py`` bins its sliding windows of live requests with
the same functions and compares the two with :func:`psi_from_fractions`. Both sides import this
module, so the reference and the window cannot disagree on a bin edge or an element.

Binning rule: bin ``i`` is ``[edges[i], edges[i+1])``; values below ``edges[0]`` count in the first
bin and values at or above ``edges[-1]`` in the last, so the end bins are open-ended and no value
is ever dropped from the comparison. Non-finite values are dropped (a NaN prediction is a service
bug reported elsewhere, not evidence of drift). No finite value gives zero counts and zero
fractions: an empty window is normal for the service; the reference builder refuses to build a
reference from no values itself.

Pure numpy; pymatgen is imported only to read a structure *dict* (:func:`element_symbols`), so the
service's request path pays for neither torch nor pymatgen here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Floor applied to every bin fraction before the log ratio: an empty bin on either side would
#: otherwise make PSI infinite. 1e-4 is the customary choice; it caps one bin's contribution at
#: roughly (a - e) * ln(a / 1e-4), large enough to alert, finite enough to plot.
PSI_EPSILON = 1e-4


def check_edges(edges: Sequence[float] | np.ndarray, name: str = "edges") -> np.ndarray:
    """``edges`` as a float array; ``ValueError`` unless finite, strictly increasing, >= 2."""
    e = np.asarray(edges, dtype=float)
    if e.ndim != 1 or e.size < 2 or not np.isfinite(e).all() or not np.all(np.diff(e) > 0):
        raise ValueError(f"{name} must be a finite, strictly increasing sequence of >= 2 numbers")
    return e


def finite_values(values: Iterable[float]) -> np.ndarray:
    """The finite ``values`` as a 1-d float array (what the binning counts)."""
    v = np.asarray(list(values) if not isinstance(values, np.ndarray) else values, dtype=float)
    v = v.reshape(-1)
    return v[np.isfinite(v)]


def bin_counts(edges: Sequence[float] | np.ndarray, values: Iterable[float]) -> np.ndarray:
    """Number of finite ``values`` in each bin of ``edges`` (open-ended end bins; all zero when
    there is no finite value)."""
    e = check_edges(edges)
    v = finite_values(values)
    k = e.size - 1
    if v.size == 0:
        return np.zeros(k, dtype=np.int64)
    idx = np.clip(np.searchsorted(e, v, side="right") - 1, 0, k - 1)
    return np.bincount(idx, minlength=k)


def bin_fractions(edges: Sequence[float] | np.ndarray, values: Iterable[float]) -> np.ndarray:
    """Fraction of the finite ``values`` in each bin of ``edges`` (all zero when there is none)."""
    counts = bin_counts(edges, values)
    total = counts.sum()
    return counts / total if total else np.zeros(counts.size)


def psi_from_fractions(
    expected: Sequence[float] | np.ndarray,
    actual: Sequence[float] | np.ndarray,
    epsilon: float = PSI_EPSILON,
) -> float:
    """PSI = sum_i (a_i - e_i) * ln(a_i / e_i), with both sides floored at ``epsilon``.

    After flooring, each side is renormalised to sum to 1 so the smoothing never creates mass
    out of nothing (PSI stays exactly 0 for identical distributions).
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError(f"fraction vectors must be 1-d and equal length, got {e.shape}, {a.shape}")
    if epsilon <= 0:
        raise ValueError("epsilon must be positive")
    e = np.maximum(e, epsilon)
    a = np.maximum(a, epsilon)
    e = e / e.sum()
    a = a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def psi(
    reference_fractions: Sequence[float] | np.ndarray,
    edges: Sequence[float] | np.ndarray,
    values: Iterable[float],
    epsilon: float = PSI_EPSILON,
) -> float:
    """Population stability index of ``values`` against a binned reference distribution.

    Returns NaN when there is no (finite) value: the index is undefined, and NaN makes a
    Prometheus comparison false, so an idle ion never alerts.
    """
    ref = np.asarray(reference_fractions, dtype=float)
    if ref.size != len(edges) - 1:
        raise ValueError(f"{ref.size} reference fractions for {len(edges) - 1} bins")
    v = finite_values(values)
    if v.size == 0:
        return math.nan
    return psi_from_fractions(ref, bin_fractions(edges, v), epsilon)


def element_symbols(structure: Any) -> frozenset[str]:
    """Element symbols of a structure, oxidation states dropped.

    ``structure`` is a pymatgen ``Structure`` or ``Composition`` (duck-typed: anything with
    ``.composition`` or ``.element_composition``) or a structure dict as stored in the records
    (read with ``Structure.from_dict``). Either way pymatgen's composition decides, so disordered
    sites and decorated species count the same in the reference and on a request.
    """
    comp = getattr(structure, "composition", structure)
    if not hasattr(comp, "element_composition") and isinstance(comp, Mapping):
        from pymatgen.core import Structure  # a structure dict (a Composition is a Mapping too)

        comp = Structure.from_dict(dict(comp)).composition
    return frozenset(el.symbol for el in comp.element_composition.elements)


def known_elements(reference_ion: Mapping[str, Any]) -> frozenset[str]:
    """Elements present in at least one training structure of the ion (its reference entry)."""
    return frozenset(el for el, frac in reference_ion["elements"].items() if frac > 0)
