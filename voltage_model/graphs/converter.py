"""Crystal structure -> CGCNN crystal graph (fixed-width neighbour lists), fully vectorised.

Each site keeps its ``max_neighbors`` nearest neighbours within ``radius`` (periodic images
included, the site's own images too, itself at distance 0 excluded).  The neighbour search is
the compiled routine behind pymatgen's ``Structure.get_neighbor_list`` (flat arrays of pairs, no
per-pair Python objects) and the selection is one integer argsort, so a typical Materials Project
crystal converts in about a millisecond; the reference CGCNN builds one Python ``Neighbor`` object
per pair and is 20-30x slower (see bench/graph_throughput.py).

Ordering (deterministic): neighbours are sorted by distance rounded to ``TIE_DECIMALS`` (1e-5 A),
ties broken by the neighbour's atomic number, then by its site index.  Rounding makes images that
are equidistant in exact arithmetic but differ by float noise (e.g. after a rotation) genuine
ties; breaking ties by element first means that when a shell of equidistant atoms straddles the
M-th slot, *which elements* are kept does not depend on the order of the sites.

Padding rule: a site with fewer than ``max_neighbors`` neighbours inside ``radius`` gets padded
slots with ``nbr_mask = False``, ``nbr_idx`` = the site itself and ``nbr_dist = radius``.  Pointing
at the site itself (never atom 0, which belongs to some other crystal once batched) keeps every
index valid inside its own crystal; the mask is what the model must honour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from voltage_model.graphs.encoding import ENCODING_VERSION, MAX_Z

if TYPE_CHECKING:
    import torch
    from pymatgen.core import Structure

# Gaussian features below this become exact zeros. exp(-(d - mu)^2 / w^2) reaches subnormal floats
# (< 1.2e-38, ~3% of the entries at w = 0.2 A, d up to 8 A); a matmul over subnormals runs ~60x
# slower on x86 unless every torch thread flushes denormals, and torch's OpenMP workers may exist
# before any flag is set. Zeroing them where they are made keeps speed independent of thread state;
# a feature of 1e-30 changes no float32 sum of O(1) terms.
SUBNORMAL_FLOOR = 1e-30
TIE_DECIMALS = 5  # distances equal to 1e-5 Angstrom count as ties (float noise is ~1e-12)
_SELF_TOL = 1e-8  # a site's own image closer than this is the site itself (pymatgen default)


@dataclass(frozen=True)
class CrystalGraph:
    """One crystal's graph, numpy only (cheap to pickle, store and concatenate).

    ``nbr_idx`` holds indices local to this crystal; ``nbr_mask`` False marks padded slots.
    """

    atomic_numbers: np.ndarray  # int16 (n,)
    nbr_idx: np.ndarray  # int32 (n, M)
    nbr_dist: np.ndarray  # float32 (n, M)
    nbr_mask: np.ndarray  # bool (n, M)

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CrystalGraph):
            return NotImplemented
        return all(
            np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside: not hashable


@dataclass(frozen=True)
class GraphConverter:
    """Graph-construction settings; serialised into the graph cache and every checkpoint.

    A model must be served with the very converter it was trained with: ``to_dict``/``from_dict``
    round-trip it, and ``from_dict`` refuses unknown keys or an encoding version other than the
    one this code produces rather than silently building different inputs.
    """

    radius: float = 8.0
    max_neighbors: int = 12
    gaussian_dmin: float = 0.0
    gaussian_dmax: float = 8.0
    gaussian_step: float = 0.2
    gaussian_width: float = 0.2
    encoding_version: str = ENCODING_VERSION

    def __post_init__(self) -> None:
        # normalise types once (e.g. 12.0 from a YAML/JSON round trip), so dicts compare equal
        for name in ("radius", "gaussian_dmin", "gaussian_dmax", "gaussian_step", "gaussian_width"):
            object.__setattr__(self, name, float(getattr(self, name)))
        m = self.max_neighbors
        if isinstance(m, bool) or not float(m).is_integer():
            raise ValueError(f"max_neighbors must be an int, got {m!r}")
        object.__setattr__(self, "max_neighbors", int(m))
        if not self.radius > 0:
            raise ValueError(f"radius must be > 0, got {self.radius}")
        if self.max_neighbors < 1:
            raise ValueError(f"max_neighbors must be >= 1, got {self.max_neighbors}")
        if not (self.gaussian_step > 0 and self.gaussian_width > 0):
            raise ValueError("gaussian_step and gaussian_width must be > 0")
        span = (self.gaussian_dmax - self.gaussian_dmin) / self.gaussian_step
        if span < 0 or abs(span - round(span)) > 1e-6:
            raise ValueError(
                "gaussian_dmax - gaussian_dmin must be a non-negative multiple of gaussian_step"
            )
        if self.encoding_version != ENCODING_VERSION:
            raise ValueError(
                f"unknown encoding version {self.encoding_version!r}; this code produces "
                f"{ENCODING_VERSION!r} (rebuild the graphs / retrain with the current encoding)"
            )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/float dict (safe for ``torch.load(weights_only=True)`` and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphConverter:
        """Strict inverse of ``to_dict``: unknown keys or encoding version raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown GraphConverter keys: {unknown} (known: {sorted(known)})")
        return cls(**data)

    # ---------------------------------------------------------------- Gaussian basis
    @property
    def n_gaussians(self) -> int:
        """Number of centres dmin, dmin+step, ..., dmax (inclusive): 41 by default."""
        return round((self.gaussian_dmax - self.gaussian_dmin) / self.gaussian_step) + 1

    def gaussian_centres(self) -> np.ndarray:
        """Centres as dmin + k*step (not ``arange``, whose float end point is unreliable)."""
        k = np.arange(self.n_gaussians, dtype=np.float64)
        return (self.gaussian_dmin + k * self.gaussian_step).astype(np.float32)

    def expand_distances(self, dist: torch.Tensor) -> torch.Tensor:
        """Gaussian-expand distances like CGCNN: exp(-(d - mu_k)^2 / width^2), shape (..., K).

        Values under ``SUBNORMAL_FLOOR`` are exact zeros, so no subnormal float leaves here.
        """
        import torch

        mu = torch.from_numpy(self.gaussian_centres()).to(device=dist.device)
        d = dist.to(torch.float32).unsqueeze(-1)
        scale = -1.0 / (self.gaussian_width**2)
        if d.requires_grad:  # keep the graph differentiable (e.g. forces w.r.t. positions)
            fea = torch.exp((d - mu) ** 2 * scale)
            return fea.masked_fill(fea < SUBNORMAL_FLOOR, 0.0)
        out = d - mu  # one (..., K) allocation, then in place: this runs on ~10^7 elements
        out = out.square_().mul_(scale).exp_()
        return out.masked_fill_(out < SUBNORMAL_FLOOR, 0.0)

    # ---------------------------------------------------------------- conversion
    def convert(self, structure: Structure) -> CrystalGraph:
        """Build the fixed-width neighbour graph of one ordered structure."""
        numbers = validate_structure(structure)
        return self.convert_arrays(
            numbers, structure.cart_coords, structure.lattice.matrix, structure.pbc
        )

    def convert_arrays(
        self,
        numbers: np.ndarray,
        cart_coords: np.ndarray,
        lattice: np.ndarray,
        pbc: tuple[bool, bool, bool] = (True, True, True),
    ) -> CrystalGraph:
        """Same as ``convert`` from plain arrays (already validated atomic numbers).

        Lets a process pool ship a few small arrays to its workers instead of pickling whole
        pymatgen ``Structure`` objects, which costs more than the conversion itself.
        """
        numbers = np.asarray(numbers, dtype=np.int16)
        if numbers.size == 0 or numbers.min() < 1 or numbers.max() > MAX_Z:
            raise ValueError(f"atomic numbers must be in 1..{MAX_Z} (and at least one site)")
        centre, nbr, dist = neighbor_pairs(cart_coords, lattice, pbc, float(self.radius))
        return select_neighbors(
            len(numbers), numbers, centre, nbr, dist, self.max_neighbors, float(self.radius)
        )


def neighbor_pairs(
    cart_coords: np.ndarray, lattice: np.ndarray, pbc: Sequence[bool], radius: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (centre, neighbour, distance) pairs within ``radius``, periodic images included.

    This is the compiled routine behind ``Structure.get_neighbor_list`` called directly: the
    wrapper adds ~0.3 ms of pure-Python overhead per crystal (a per-site coordinate list and a
    Python list of one bool per pair), about a quarter of the whole conversion.  Falls back to the
    wrapper's pure-Python path if the extension is missing.  Self pairs (same index, distance
    ~0) are excluded exactly as the wrapper does.
    """
    coords = np.ascontiguousarray(cart_coords, dtype=float)
    try:
        from pymatgen.optimization.neighbors import find_points_in_spheres
    except ImportError:  # pragma: no cover - pymatgen wheels ship the extension
        from pymatgen.core import Lattice, Structure

        dummy = Structure(
            Lattice(lattice, pbc=tuple(pbc)), ["H"] * len(coords), coords, coords_are_cartesian=True
        )
        c, n, _, d = dummy.get_neighbor_list(radius)
        return c, n, d
    centre, nbr, _, dist = find_points_in_spheres(
        coords,
        coords,
        r=radius,
        pbc=np.ascontiguousarray(pbc, dtype=np.int64),
        lattice=np.ascontiguousarray(lattice, dtype=float),
        tol=_SELF_TOL,
    )
    keep = ~((centre == nbr) & (dist <= _SELF_TOL))
    return centre[keep], nbr[keep], dist[keep]


def validate_structure(structure: Structure) -> np.ndarray:
    """Atomic numbers (int16) of an ordered structure, or a ValueError naming the problem."""
    n = len(structure)
    if n == 0:
        raise ValueError("structure has no sites")
    if not structure.is_ordered:
        bad = next(i for i, site in enumerate(structure) if not site.is_ordered)
        raise ValueError(
            f"structure is disordered (site {bad} has partial occupancy "
            f"{structure[bad].species}); only ordered structures can be converted"
        )
    from pymatgen.core import DummySpecies

    numbers = np.empty(n, dtype=np.int64)
    for i, species in enumerate(structure.species):
        z = getattr(species, "Z", None)
        if isinstance(species, DummySpecies) or not isinstance(z, int) or z < 1:
            raise ValueError(f"site {i} has no element ({species!r}); cannot encode it")
        if z > MAX_Z:
            raise ValueError(
                f"site {i} is {species} (Z={z}); the encoding covers Z <= {MAX_Z} only"
            )
        numbers[i] = z
    if not np.isfinite(structure.frac_coords).all():
        raise ValueError("structure has non-finite coordinates")
    matrix = structure.lattice.matrix
    volume = abs(float(np.linalg.det(matrix))) if np.isfinite(matrix).all() else 0.0
    if volume < 1e-6:
        raise ValueError(f"structure has a degenerate lattice (volume {volume:.3g} A^3)")
    return numbers.astype(np.int16)


def _sort_keys(
    centre: np.ndarray, nbr: np.ndarray, dist: np.ndarray, numbers: np.ndarray, n: int
) -> np.ndarray:
    """Order of pairs by (centre, distance to 1e-5 A, neighbour Z, neighbour index).

    Packed into one int64 key when the fields fit in 63 bits (always, for crystals below ~10^5
    sites), because one integer argsort is ~5x faster than a 4-key lexsort.
    """
    coarse = np.rint(dist * 10**TIE_DECIMALS).astype(np.int64)
    z = numbers.astype(np.int64)[nbr]
    b_idx = max(int(n).bit_length(), 1)
    b_z = MAX_Z.bit_length()
    b_d = max(int(coarse.max(initial=0)).bit_length(), 1)
    if 2 * b_idx + b_z + b_d > 63:
        return np.lexsort((nbr, z, coarse, centre))
    key = centre << (b_d + b_z + b_idx)
    key |= coarse << (b_z + b_idx)
    key |= z << b_idx
    key |= nbr
    return np.argsort(key, kind="stable")


def select_neighbors(
    n: int,
    numbers: np.ndarray,
    centre: np.ndarray,
    nbr: np.ndarray,
    dist: np.ndarray,
    max_neighbors: int,
    radius: float,
) -> CrystalGraph:
    """Keep each site's ``max_neighbors`` nearest pairs (see module docstring for the order).

    One sort over all pairs, then the rank of each pair inside its centre's run gives its
    column; pairs with rank >= M are dropped and the untouched slots stay padded.
    """
    m = max_neighbors
    centre = np.asarray(centre, dtype=np.int64)
    nbr = np.asarray(nbr, dtype=np.int64)
    dist = np.asarray(dist, dtype=np.float64)
    keep = dist <= radius  # the search admits pairs up to r + tol
    if not keep.all():
        centre, nbr, dist = centre[keep], nbr[keep], dist[keep]

    order = _sort_keys(centre, nbr, dist, numbers, n)
    centre, nbr, dist = centre[order], nbr[order], dist[order]

    counts = np.bincount(centre, minlength=n)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(centre.size) - starts[centre]
    sel = rank < m
    rows, cols = centre[sel], rank[sel]

    nbr_idx = np.repeat(np.arange(n, dtype=np.int32)[:, None], m, axis=1)
    nbr_dist = np.full((n, m), radius, dtype=np.float32)
    nbr_mask = np.zeros((n, m), dtype=bool)
    nbr_idx[rows, cols] = nbr[sel]
    nbr_dist[rows, cols] = dist[sel]
    nbr_mask[rows, cols] = True
    return CrystalGraph(numbers.astype(np.int16, copy=False), nbr_idx, nbr_dist, nbr_mask)
