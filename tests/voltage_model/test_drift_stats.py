"""Drift statistics (voltage_model/drift.py): the binning, PSI and element rule that the reference
builder (training/stages/drift_reference.py) and the service's windows (serving/drift.py) share.

The alert thresholds (PSI > 0.25) only mean something if the index is right, so it is checked
against a hand-computed textbook value and its basic properties (zero on identity, growing with
shift, finite on empty bins).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure

from voltage_model.drift import (
    bin_counts,
    bin_fractions,
    check_edges,
    element_symbols,
    known_elements,
    psi,
    psi_from_fractions,
)

EDGES = np.linspace(-1.0, 7.0, 17)


def test_psi_is_zero_for_identical_distribution() -> None:
    values = np.random.default_rng(0).normal(3.5, 0.8, 5000)
    ref = bin_fractions(EDGES, values)
    assert psi(ref, EDGES, values) == pytest.approx(0.0, abs=1e-12)
    # Same distribution, independent sample: small, well under the "stable" 0.1 line.
    other = np.random.default_rng(1).normal(3.5, 0.8, 5000)
    assert psi(ref, EDGES, other) < 0.02


def test_psi_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(3.5, 0.6, 20000)
    ref = bin_fractions(EDGES, base)
    sample = rng.normal(3.5, 0.6, 5000)
    values = [psi(ref, EDGES, sample + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in itertools.pairwise(values)), values
    assert values[0] < 0.1 < values[2]
    assert values[-1] > 0.25


def test_psi_textbook_value() -> None:
    """Expected 25/25/25/25 %, actual 10/20/30/40 %: sum (a-e) ln(a/e) = 0.228217 (by hand:
    0.15 ln 2.5 + 0.05 ln 1.25 + 0.05 ln 1.2 + 0.15 ln 1.6)."""
    edges = [0.0, 1.0, 2.0, 3.0, 4.0]
    values = np.repeat([0.5, 1.5, 2.5, 3.5], [10, 20, 30, 40])
    by_hand = (
        0.15 * math.log(2.5) + 0.05 * math.log(1.25) + 0.05 * math.log(1.2) + 0.15 * math.log(1.6)
    )
    assert by_hand == pytest.approx(0.228217, abs=1e-6)
    assert psi([0.25] * 4, edges, values) == pytest.approx(by_hand, rel=1e-9)
    # PSI is symmetric in (expected, actual).
    assert psi_from_fractions([0.1, 0.2, 0.3, 0.4], [0.25] * 4) == pytest.approx(by_hand, rel=1e-9)


def test_psi_epsilon_keeps_empty_bins_finite() -> None:
    edges = [0.0, 1.0, 2.0]
    value = psi([1.0, 0.0], edges, [1.5] * 50)  # all mass moved to a bin the reference never had
    assert math.isfinite(value) and value > 5
    assert math.isnan(psi([0.5, 0.5], edges, []))  # undefined without data
    assert math.isnan(psi([0.5, 0.5], edges, [math.nan]))


def test_bins_are_open_ended_and_drop_non_finite_values() -> None:
    values = np.array([-5.0, -1.0, 0.2, 3.49, 3.5, 6.99, 7.0, 42.0, np.nan, np.inf])
    counts = bin_counts(EDGES, values)
    assert counts.sum() == 8 and counts[0] == 2 and counts[-1] == 3
    assert counts[int((3.5 + 1.0) / 0.5)] == 1 and counts[int((3.49 + 1.0) / 0.5)] == 1
    fr = bin_fractions(EDGES, values)
    assert fr.sum() == pytest.approx(1.0)
    assert fr[0] == pytest.approx(2 / 8) and fr[-1] == pytest.approx(3 / 8)
    assert list(bin_fractions(EDGES, iter(values.tolist()))) == list(fr)  # any iterable


def test_no_finite_value_bins_to_zeros() -> None:
    """The one rule for empty input: zero counts and zero fractions (an empty service window);
    the reference builder refuses to build from no values itself (tests/serving/test_drift.py)."""
    for empty in ([], [math.nan, -math.inf], np.empty(0)):
        assert bin_counts(EDGES, empty).tolist() == [0] * 16
        assert bin_counts(EDGES, empty).dtype == np.int64
        assert bin_fractions(EDGES, empty).tolist() == [0.0] * 16


def test_edges_are_checked() -> None:
    assert check_edges([0, 1, 2]).tolist() == [0.0, 1.0, 2.0]
    for bad in ([1.0, 0.0], [0.0], [[0.0, 1.0]], [0.0, math.inf], [0.0, math.nan, 2.0]):
        with pytest.raises(ValueError, match="site_edges must be"):
            check_edges(bad, "site_edges")
        with pytest.raises(ValueError):
            bin_fractions(bad, [0.5])
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [0.0, 1.0, 2.0, 3.0], [1.0])


def test_element_symbols_of_a_structure_and_of_its_dict_agree() -> None:
    s = Structure(Lattice.cubic(4.2), ["Li", "Mn", "O", "O"],
                  [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0], [0, 0.5, 0]])  # fmt: skip
    s.add_oxidation_state_by_element({"Li": 1, "Mn": 3, "O": -2})
    assert element_symbols(s) == frozenset({"Li", "Mn", "O"})  # oxidation states dropped
    assert element_symbols(s.as_dict()) == element_symbols(s)
    assert element_symbols(s.composition) == element_symbols(s)
    disordered = Structure(Lattice.cubic(4.0), [{"Fe": 0.5, "Mn": 0.5}, "O"],
                           [[0, 0, 0], [0.5, 0.5, 0.5]])  # fmt: skip
    assert element_symbols(disordered.as_dict()) == frozenset({"Fe", "Mn", "O"})


def test_known_elements_are_those_with_a_positive_fraction() -> None:
    entry = {"elements": {"Li": 1.0, "O": 0.97, "Xe": 0.0}}
    assert known_elements(entry) == frozenset({"Li", "O"})
