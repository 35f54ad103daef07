"""On-disk graph cache and a fast epoch loader (``GraphLoader``); batching a list of graphs
(``collate``, ``GraphBatch``) is ``voltage_model.graphs.batch``, shared with serving.

The cache is one ``torch.save`` file of plain tensors, strings and dicts (so it loads with
``torch.load(weights_only=True)``, which cannot execute code): all crystals' arrays concatenated
along the atom axis plus an ``atom_offsets`` vector, the id list and the converter dict that built
it.  Concatenation keeps the file small and the load to a handful of tensor reads, whatever the
number of crystals.

``GraphLoader`` is what training iterates every epoch.  It resolves its dataset once (atom
features looked up, distances Gaussian-expanded, padded slots zeroed) into dataset-wide tensors;
an epoch is then one permutation and one gather per tensor, and every batch is a contiguous slice.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from voltage_model.graphs.batch import GraphBatch, as_encoding, expand_masked
from voltage_model.graphs.converter import CrystalGraph, GraphConverter, validate_structure

if TYPE_CHECKING:
    from pymatgen.core import Structure

STORE_FORMAT = "graph-store-v1"
_ARRAYS = ("atomic_numbers", "nbr_idx", "nbr_dist", "nbr_mask")


# =============================================================================== store
def _convert_job(job: tuple[GraphConverter, np.ndarray, np.ndarray, np.ndarray, tuple]) -> Any:
    """Worker body: plain arrays in, graph out (arrays pickle far cheaper than Structures)."""
    converter, numbers, cart, lattice, pbc = job
    return converter.convert_arrays(numbers, cart, lattice, pbc)


class GraphStore:
    """Many graphs keyed by string id, held as concatenated arrays (see module docstring)."""

    def __init__(
        self,
        ids: Sequence[str],
        atom_offsets: np.ndarray,
        arrays: dict[str, np.ndarray],
        converter: GraphConverter,
        skipped: dict[str, str] | None = None,
    ) -> None:
        self._ids = [str(i) for i in ids]
        self._index = {k: i for i, k in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            raise ValueError("GraphStore ids must be unique")
        self.atom_offsets = np.asarray(atom_offsets, dtype=np.int64)
        self.arrays = arrays
        self.converter = converter
        self.skipped = dict(skipped or {})
        if self.atom_offsets.shape != (len(self._ids) + 1,):
            raise ValueError("atom_offsets must have len(ids) + 1 entries")
        n_atoms = int(self.atom_offsets[-1])
        for name in _ARRAYS:
            if arrays[name].shape[0] != n_atoms:
                raise ValueError(f"{name} has {arrays[name].shape[0]} rows, expected {n_atoms}")

    # ------------------------------------------------------------------ build
    @classmethod
    def from_graphs(
        cls,
        items: Iterable[tuple[str, CrystalGraph]],
        converter: GraphConverter,
        skipped: dict[str, str] | None = None,
    ) -> GraphStore:
        """Concatenate already-built graphs (ids must be unique)."""
        ids: list[str] = []
        graphs: list[CrystalGraph] = []
        for key, graph in items:
            ids.append(str(key))
            graphs.append(graph)
        m = converter.max_neighbors
        sizes = np.fromiter((g.n_atoms for g in graphs), dtype=np.int64, count=len(graphs))
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        empty = {
            "atomic_numbers": np.zeros(0, np.int16),
            "nbr_idx": np.zeros((0, m), np.int32),
            "nbr_dist": np.zeros((0, m), np.float32),
            "nbr_mask": np.zeros((0, m), bool),
        }
        arrays = {
            name: np.concatenate([getattr(g, name) for g in graphs]) if graphs else empty[name]
            for name in _ARRAYS
        }
        return cls(ids, offsets, arrays, converter, skipped)

    @classmethod
    def build(
        cls,
        items: Iterable[tuple[str, Structure]],
        converter: GraphConverter,
        workers: int = 1,
        on_error: Literal["raise", "skip"] = "raise",
    ) -> GraphStore:
        """Convert (id, structure) pairs; a repeated id is converted once (first one wins).

        ``workers > 1`` converts in a process pool (neighbour search is CPU-bound and holds the
        GIL).  ``on_error="skip"`` records unconvertible structures in ``.skipped`` (id -> reason)
        instead of raising, for pipelines that report them rather than stop.
        """
        keys: list[str] = []
        jobs = []
        skipped: dict[str, str] = {}
        seen: set[str] = set()
        for key, structure in items:
            key = str(key)
            if key in seen:
                continue
            seen.add(key)
            try:  # validated here, in the parent, so the error can name the id
                numbers = validate_structure(structure)
            except ValueError as exc:
                if on_error == "raise":
                    raise ValueError(f"cannot convert {key}: {exc}") from None
                skipped[key] = str(exc)
                continue
            keys.append(key)
            lattice = structure.lattice
            jobs.append((converter, numbers, structure.cart_coords, lattice.matrix, lattice.pbc))
        if workers > 1 and len(jobs) > 1:
            with mp.get_context().Pool(workers) as pool:
                chunk = max(1, len(jobs) // (8 * workers))
                graphs = pool.map(_convert_job, jobs, chunksize=chunk)
        else:
            graphs = [_convert_job(job) for job in jobs]
        good = list(zip(keys, graphs, strict=True))
        return cls.from_graphs(good, converter, skipped)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the cache (parents created); atomic via a temp file + rename."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": STORE_FORMAT,
            "converter": self.converter.to_dict(),
            "ids": list(self._ids),
            "atom_offsets": torch.from_numpy(self.atom_offsets),
            "skipped": dict(self.skipped),
            **{name: torch.from_numpy(np.ascontiguousarray(self.arrays[name])) for name in _ARRAYS},
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> GraphStore:
        """Read a cache written by ``save`` (``weights_only=True``: no code runs on load)."""
        payload = torch.load(Path(path), weights_only=True)
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt != STORE_FORMAT:
            raise ValueError(f"{path} is not a {STORE_FORMAT} graph cache (format={fmt!r})")
        converter = GraphConverter.from_dict(payload["converter"])
        arrays = {name: payload[name].numpy() for name in _ARRAYS}
        return cls(
            payload["ids"],
            payload["atom_offsets"].numpy(),
            arrays,
            converter,
            payload.get("skipped"),
        )

    # ------------------------------------------------------------------ access
    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def position(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyError(f"id {key!r} is not in the graph store") from None

    def get(self, key: str) -> CrystalGraph:
        """One crystal's graph (views into the concatenated arrays, local indices)."""
        i = self.position(key)
        lo, hi = int(self.atom_offsets[i]), int(self.atom_offsets[i + 1])
        return CrystalGraph(*(self.arrays[name][lo:hi] for name in _ARRAYS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GraphStore):
            return NotImplemented
        return (
            self._ids == other._ids
            and self.converter == other.converter
            and np.array_equal(self.atom_offsets, other.atom_offsets)
            and all(np.array_equal(self.arrays[n], other.arrays[n]) for n in _ARRAYS)
        )

    __hash__ = None  # type: ignore[assignment]


# =============================================================================== loader
def _ragged_arange(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, sizes)) without a Python loop."""
    total = int(sizes.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    out_starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return np.arange(total, dtype=np.int64) + np.repeat(starts - out_starts, sizes)


def _parse_items(
    items: Iterable[tuple[str, float] | str],
) -> tuple[list[str], np.ndarray | None]:
    ids: list[str] = []
    targets: list[float] = []
    has_target: bool | None = None
    for item in items:
        pair = not isinstance(item, str)
        if has_target is None:
            has_target = pair
        elif has_target != pair:
            raise ValueError("items must be all (id, target) pairs or all bare ids")
        if pair:
            key, target = item  # type: ignore[misc]
            ids.append(str(key))
            targets.append(float(target))
        else:
            ids.append(item)  # type: ignore[arg-type]
    return ids, (np.asarray(targets, dtype=np.float32) if has_target else None)


class GraphLoader:
    """Epoch iterator over a fixed dataset of stored graphs, yielding ``GraphBatch``.

    Everything per crystal is resolved once in ``__init__`` into dataset-wide tensors (atom
    features, Gaussian features, masks, local neighbour indices).  A shuffled epoch then costs one
    permutation + one ``index_select`` per tensor into a preallocated buffer, after which each
    batch is a contiguous slice; only the batch-global neighbour offset is recomputed per batch.
    Without shuffling the batches are built once and reused.

    Buffer lifetime: shuffled batches are views into two loader-owned buffers used in turn, so a
    batch stays valid during its own epoch and the next one and is overwritten when the epoch
    after that starts (``.clone()`` anything kept longer).  Reusing buffers matters: allocating
    ~100 MB of fresh pages per epoch costs more than the gather itself.

    ``items`` are (id, target) pairs, or bare ids (then ``target`` is None).  An id may appear
    more than once (e.g. one charged structure in two battery entries with different targets).
    """

    def __init__(
        self,
        store: GraphStore,
        items: Iterable[tuple[str, float] | str],
        batch_size: int = 256,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        encoding: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.ids, targets = _parse_items(items)
        missing = [k for k in self.ids if k not in store]
        if missing:
            raise KeyError(f"{len(missing)} ids not in the graph store, e.g. {missing[:5]}")
        self.converter = store.converter
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._seed = int(seed)
        self._targets = None if targets is None else torch.from_numpy(targets)
        self._prepare(store, as_encoding(encoding))
        self._fixed: list[GraphBatch] | None = None
        self._buffers: list[tuple[torch.Tensor, ...] | None] = [None, None]
        self._n_gathers = 0

    @classmethod
    def from_files(
        cls, path: str | Path, items: Iterable[tuple[str, float] | str], **kwargs: Any
    ) -> GraphLoader:
        """Load a cache and build a loader over ``items`` in one call."""
        return cls(GraphStore.load(path), items, **kwargs)

    def _prepare(self, store: GraphStore, enc: torch.Tensor) -> None:
        """Resolve the dataset into contiguous per-atom tensors (run once)."""
        pos = np.fromiter((store.position(k) for k in self.ids), np.int64, count=len(self.ids))
        starts = store.atom_offsets[pos]
        self._sizes = store.atom_offsets[pos + 1] - starts
        atoms = _ragged_arange(starts, self._sizes)
        z = torch.from_numpy(store.arrays["atomic_numbers"][atoms].astype(np.int64))
        mask = torch.from_numpy(store.arrays["nbr_mask"][atoms]).to(torch.float32)
        dist = torch.from_numpy(store.arrays["nbr_dist"][atoms])
        self._atom_fea = enc.index_select(0, z)
        self._z = z
        self._nbr_fea = expand_masked(self.converter, dist, mask)
        self._nbr_mask = mask
        self._nbr_local = torch.from_numpy(store.arrays["nbr_idx"][atoms].astype(np.int64))
        self._starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1])).astype(np.int64)

    def __len__(self) -> int:
        n = len(self.ids)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def n_crystals(self) -> int:
        return len(self.ids)

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.ids))
        rng = np.random.default_rng([self._seed, self.epoch])
        return rng.permutation(len(self.ids))

    def _gather(self, atoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows ``atoms`` of each dataset tensor, written into the next of two reused buffers."""
        sources = (self._atom_fea, self._nbr_fea, self._nbr_mask, self._nbr_local, self._z)
        slot = self._n_gathers % 2
        self._n_gathers += 1
        if self._buffers[slot] is None:
            self._buffers[slot] = tuple(torch.empty_like(t) for t in sources)
        out = self._buffers[slot]
        for src, buf in zip(sources, out, strict=True):  # type: ignore[arg-type]
            torch.index_select(src, 0, atoms, out=buf)
        return out  # type: ignore[return-value]

    def _epoch_batches(self) -> list[GraphBatch]:
        order = self._order()
        sizes = self._sizes[order]
        if self.shuffle:
            atoms = torch.from_numpy(_ragged_arange(self._starts[order], sizes))
            atom_fea, nbr_fea, nbr_mask, nbr_local, z = self._gather(atoms)
        else:  # dataset order: the prepared tensors are already laid out batch by batch
            atom_fea, nbr_fea, nbr_mask, nbr_local, z = (
                self._atom_fea,
                self._nbr_fea,
                self._nbr_mask,
                self._nbr_local,
                self._z,
            )
        targets = None if self._targets is None else self._targets[torch.from_numpy(order)]
        cum = np.concatenate(([0], np.cumsum(sizes)))
        batches = []
        for b0 in range(0, len(order), self.batch_size):
            b1 = min(b0 + self.batch_size, len(order))
            if self.drop_last and b1 - b0 < self.batch_size:
                break
            a0, a1 = int(cum[b0]), int(cum[b1])
            bsizes = sizes[b0:b1]
            local_off = torch.from_numpy(np.repeat(cum[b0:b1] - a0, bsizes))
            batches.append(
                GraphBatch(
                    atom_fea=atom_fea[a0:a1],
                    nbr_idx=nbr_local[a0:a1] + local_off.unsqueeze(1),
                    nbr_fea=nbr_fea[a0:a1],
                    nbr_mask=nbr_mask[a0:a1],
                    crystal_idx=torch.from_numpy(np.repeat(np.arange(b1 - b0), bsizes)),
                    n_crystals=b1 - b0,
                    target=None if targets is None else targets[b0:b1],
                    ids=[self.ids[i] for i in order[b0:b1]],
                    atomic_numbers=z[a0:a1],
                )
            )
        return batches

    def __iter__(self) -> Iterator[GraphBatch]:
        """One epoch; with ``shuffle`` every epoch gets a new permutation (seeded by epoch)."""
        if self.shuffle:
            batches = self._epoch_batches()
            self.epoch += 1
        else:
            if self._fixed is None:
                self._fixed = self._epoch_batches()
            batches = self._fixed
        yield from batches

    def set_epoch(self, epoch: int) -> None:
        """Pin the next epoch's permutation (e.g. when resuming training)."""
        self.epoch = int(epoch)
