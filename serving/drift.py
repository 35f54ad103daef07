"""Service-side drift: the reference file, and a bounded per-ion sliding window of requests.

Why here and why pure: the service exports each window as counts (:meth:`DriftWindow.counts`,
which add up across BentoML workers) and the gauges ``voltage_drift_psi``,
``voltage_drift_sites_psi`` and ``voltage_drift_unseen_element_share`` (docs/CONTRACTS.md,
"Service metrics") are :func:`stats_from_counts` of one window or of the workers' summed windows
(``serving.metrics.aggregate_drift``). Keeping this module free of Prometheus, torch
and pymatgen imports makes the maths unit-testable in isolation and cheap to call on the request
path; the service owns the metric objects.

The reference is the JSON written by ``training/stages/drift_reference.py`` (CONTRACTS.md,
"Drift reference")::

    {"<ion>": {"elements": {"O": 0.97, ...},
               "sites":   {"edges": [...], "fractions": [...]},
               "voltage": {"edges": [...], "fractions": [...]},
               "n": 1234}}

The statistics themselves (binning, PSI, the element rule) live in ``voltage_model/drift.py``,
shared with the reference builder so the window and the reference bin and count alike; this module
holds what only the service needs: the reference file's validation, the windows and their counts.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voltage_model.drift import (
    PSI_EPSILON,
    bin_counts,
    known_elements,
    psi_from_fractions,
)
from voltage_model.drift import element_symbols as element_symbols  # re-exported for the predictor

#: Conventional PSI reading: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift.
PSI_ALERT_THRESHOLD = 0.25
#: Share of windowed requests with an element never seen in the ion's training structures.
UNSEEN_ALERT_THRESHOLD = 0.2

#: Default window: the last 1000 predictions per ion. Memory is O(ions x window), a few hundred
#: kB at most, whatever the traffic.
DEFAULT_WINDOW = 1000
#: Below this many windowed predictions PSI is too noisy to mean anything: ``stats`` reports NaN
#: (the gauge then shows "no data" rather than a scary number), and the alert rules also require
#: ``voltage_drift_window_requests >= 100``.
DEFAULT_MIN_SAMPLES = 100


def unseen_element_share(
    element_sets: Iterable[Iterable[str]], known_elements: Iterable[str]
) -> float:
    """Share of structures containing at least one element outside ``known_elements``.

    A model has never learned an embedding context for such an element in this ion's chemistry,
    so its predictions there are extrapolation even when the voltage histogram looks normal.
    Returns NaN for no structures (undefined, and never alerts).
    """
    known = frozenset(known_elements)
    n = unseen = 0
    for elements in element_sets:
        n += 1
        if not known.issuperset(elements):
            unseen += 1
    return unseen / n if n else math.nan


def validate_reference(reference: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first problem if ``reference`` breaks the contract shape.

    Checked once at load so that a malformed file fails at service start, not on a request.
    """
    if not isinstance(reference, Mapping) or not reference:
        raise ValueError("drift reference must be a non-empty object keyed by ion")
    for ion, entry in reference.items():
        for key in ("elements", "sites", "voltage", "n"):
            if key not in entry:
                raise ValueError(f"drift reference for {ion}: missing {key!r}")
        if not isinstance(entry["elements"], Mapping):
            raise ValueError(f"drift reference for {ion}: 'elements' must be an object")
        for key in ("sites", "voltage"):
            edges, fracs = entry[key].get("edges"), entry[key].get("fractions")
            if not isinstance(edges, list) or not isinstance(fracs, list):
                raise ValueError(f"drift reference for {ion}.{key}: edges/fractions lists needed")
            if len(edges) != len(fracs) + 1 or len(fracs) < 1:
                raise ValueError(f"drift reference for {ion}.{key}: need len(edges)=bins+1")
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"drift reference for {ion}.{key}: edges must increase")
            if abs(sum(fracs) - 1.0) > 1e-6:
                raise ValueError(f"drift reference for {ion}.{key}: fractions must sum to 1")


def load_reference(path: str | Path) -> dict[str, Any]:
    """Read and validate ``data/drift_reference.json``."""
    reference = json.loads(Path(path).read_text())
    validate_reference(reference)
    return reference


@dataclass(frozen=True)
class DriftStats:
    """Current drift of one ion's window; NaN fields mean "not enough data yet"."""

    ion: str
    requests: int
    psi: float
    unseen_element_share: float
    sites_psi: float


@dataclass(frozen=True)
class WindowCounts:
    """A window as numbers that add up across workers: predictions, how many had an unseen
    element, and the predictions per reference bin of voltage and of site count."""

    ion: str
    requests: int
    unseen: int
    voltage: tuple[int, ...]
    sites: tuple[int, ...]

    def __add__(self, other: WindowCounts) -> WindowCounts:
        if other.ion != self.ion:
            raise ValueError(f"cannot add windows of {self.ion} and {other.ion}")
        return WindowCounts(
            self.ion, self.requests + other.requests, self.unseen + other.unseen,
            tuple(a + b for a, b in zip(self.voltage, other.voltage, strict=True)),
            tuple(a + b for a, b in zip(self.sites, other.sites, strict=True)),
        )  # fmt: skip


def stats_from_counts(
    reference_ion: Mapping[str, Any],
    counts: WindowCounts,
    min_samples: int = DEFAULT_MIN_SAMPLES,
    epsilon: float = PSI_EPSILON,
) -> DriftStats:
    """Drift of a window given as bin counts (NaN below ``min_samples``, as ``psi`` does)."""
    n = counts.requests
    if n < min_samples:
        return DriftStats(counts.ion, n, math.nan, math.nan, math.nan)

    def from_counts(key: str, binned: Sequence[int]) -> float:
        total = sum(binned)
        if total == 0:
            return math.nan
        actual = np.asarray(binned, dtype=float) / total
        return psi_from_fractions(reference_ion[key]["fractions"], actual, epsilon)

    return DriftStats(
        ion=counts.ion,
        requests=n,
        psi=from_counts("voltage", counts.voltage),
        unseen_element_share=counts.unseen / n,
        sites_psi=from_counts("sites", counts.sites),
    )


@dataclass(frozen=True)
class _Observation:
    volts: float
    unseen: bool
    nsites: float


class DriftWindow:
    """The last ``size`` predictions of each reference ion, and their drift from the reference.

    Thread-safe (BentoML workers and the gRPC server observe concurrently): one lock guards the
    deques; ``stats`` copies under the lock and computes outside it. Memory is bounded: one
    ``deque(maxlen=size)`` per ion *of the reference*; observations for other ions are ignored
    (returns False), so an attacker cannot grow it with made-up ion labels.
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        size: int = DEFAULT_WINDOW,
        min_samples: int = DEFAULT_MIN_SAMPLES,
        epsilon: float = PSI_EPSILON,
    ) -> None:
        if size < 1:
            raise ValueError("window size must be >= 1")
        if min_samples < 1:
            raise ValueError("min_samples must be >= 1")
        validate_reference(reference)
        self.size = size
        self.min_samples = min_samples
        self.epsilon = epsilon
        self._reference = {ion: dict(entry) for ion, entry in reference.items()}
        self._known = {ion: known_elements(entry) for ion, entry in reference.items()}
        self._windows: dict[str, deque[_Observation]] = {
            ion: deque(maxlen=size) for ion in reference
        }
        self._lock = threading.Lock()

    @property
    def ions(self) -> list[str]:
        return sorted(self._windows)

    def observe(
        self, ion: str, volts: float, elements: Iterable[str], nsites: int | None = None
    ) -> bool:
        """Record one served prediction; False (and nothing stored) for an ion with no reference.

        The unseen-element flag is computed here, once per request, so the window stores three
        scalars per prediction and never the structure itself.
        """
        window = self._windows.get(ion)
        if window is None:
            return False
        obs = _Observation(
            volts=float(volts),
            unseen=not self._known[ion].issuperset(elements),
            nsites=math.nan if nsites is None else float(nsites),
        )
        with self._lock:
            window.append(obs)
        return True

    def reference(self, ion: str) -> dict[str, Any]:
        """The ion's reference entry (edges and fractions of each feature)."""
        return self._reference[ion]

    def count(self, ion: str) -> int:
        with self._lock:
            window = self._windows.get(ion)
            return len(window) if window is not None else 0

    def clear(self, ion: str | None = None) -> None:
        """Forget observations, e.g. after a new champion is loaded for ``ion``."""
        with self._lock:
            for name, window in self._windows.items():
                if ion is None or name == ion:
                    window.clear()

    def counts(self, ion: str) -> WindowCounts:
        """The ion's window as bin counts (what each worker exports, and what adds up exactly
        across workers: the PSI of several workers' windows is the PSI of their summed counts)."""
        if ion not in self._windows:
            raise KeyError(f"no drift reference for ion {ion!r}")
        with self._lock:
            observations = list(self._windows[ion])
        ref = self._reference[ion]
        n = len(observations)
        volts = np.fromiter((o.volts for o in observations), dtype=float, count=n)
        sites = np.fromiter((o.nsites for o in observations), dtype=float, count=n)
        return WindowCounts(
            ion=ion,
            requests=n,
            unseen=sum(o.unseen for o in observations),
            voltage=tuple(int(c) for c in bin_counts(ref["voltage"]["edges"], volts)),
            sites=tuple(int(c) for c in bin_counts(ref["sites"]["edges"], sites)),
        )

    def stats_of(self, counts: WindowCounts) -> DriftStats:
        """Drift of a window given as counts (one worker's, or several workers' summed)."""
        return stats_from_counts(self._reference[counts.ion], counts, self.min_samples,
                                 self.epsilon)  # fmt: skip

    def stats(self, ion: str) -> DriftStats:
        """PSI of windowed predictions and sites, and the unseen-element share, for ``ion``."""
        return self.stats_of(self.counts(ion))

    def all_stats(self) -> dict[str, DriftStats]:
        """Stats for every reference ion (what a periodic gauge refresh needs)."""
        return {ion: self.stats(ion) for ion in self.ions}
