"""Batching crystal graphs (``collate``) into the layout the model reads (``GraphBatch``).

Serving and tests batch a list of graphs with ``collate``; training iterates the faster
``GraphLoader`` of ``training/graphs/store.py`` (the on-disk graph cache), which builds the same
``GraphBatch`` from dataset-wide tensors with the same encoding and distance expansion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from voltage_model.graphs.converter import CrystalGraph, GraphConverter
from voltage_model.graphs.encoding import encoding_table


@dataclass
class GraphBatch:
    """A batch of crystals in the layout the model reads (see docs/CONTRACTS.md)."""

    atom_fea: torch.Tensor  # float32 (N, 92)
    nbr_idx: torch.Tensor  # int64 (N, M), batch-global atom indices
    nbr_fea: torch.Tensor  # float32 (N, M, K) Gaussian-expanded; zero in padded slots
    nbr_mask: torch.Tensor  # float32 (N, M), 1 = real neighbour
    crystal_idx: torch.Tensor  # int64 (N,)
    n_crystals: int
    target: torch.Tensor | None  # float32 (n_crystals,)
    ids: list[str]
    # int64 (N,): what composition descriptors are computed from
    # (``voltage_model.models.descriptors``)
    atomic_numbers: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> GraphBatch:
        """Copy every tensor to ``device`` (a no-op view when already there)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return GraphBatch(
            atom_fea=move(self.atom_fea),  # type: ignore[arg-type]
            nbr_idx=move(self.nbr_idx),  # type: ignore[arg-type]
            nbr_fea=move(self.nbr_fea),  # type: ignore[arg-type]
            nbr_mask=move(self.nbr_mask),  # type: ignore[arg-type]
            crystal_idx=move(self.crystal_idx),  # type: ignore[arg-type]
            n_crystals=self.n_crystals,
            target=move(self.target),
            ids=list(self.ids),
            atomic_numbers=move(self.atomic_numbers),
        )

    @property
    def n_atoms(self) -> int:
        return int(self.atom_fea.shape[0])


def as_encoding(encoding: torch.Tensor | np.ndarray | None) -> torch.Tensor:
    if encoding is None:
        return torch.from_numpy(encoding_table().copy())
    if isinstance(encoding, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(encoding, dtype=np.float32))
    return encoding.to(torch.float32)


def _targets(
    targets: Sequence[float] | np.ndarray | torch.Tensor | None, n: int
) -> torch.Tensor | None:
    if targets is None:
        return None
    t = torch.as_tensor(np.asarray(targets, dtype=np.float32)).reshape(-1)
    if t.numel() != n:
        raise ValueError(f"got {t.numel()} targets for {n} crystals")
    return t


def expand_masked(
    converter: GraphConverter, dist: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Gaussian features with padded slots zeroed, so a mask-unaware consumer sees nothing."""
    fea = converter.expand_distances(dist)
    if fea.requires_grad:
        return fea * mask.unsqueeze(-1).to(fea.dtype)
    return fea.mul_(mask.unsqueeze(-1).to(fea.dtype))  # in place: ~100 MB for a whole dataset


def collate(
    graphs: Sequence[CrystalGraph],
    converter: GraphConverter,
    encoding: torch.Tensor | np.ndarray | None = None,
    targets: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    ids: Sequence[str] | None = None,
) -> GraphBatch:
    """Batch a list of graphs (serving and tests; training uses the faster ``GraphLoader``).

    Neighbour indices become batch-global by adding each crystal's first-atom offset, computed
    with one ``repeat`` of the cumulative sizes (no per-atom Python loop).
    """
    if not graphs:
        raise ValueError("cannot collate an empty list of graphs")
    enc = as_encoding(encoding)
    sizes = np.fromiter((g.n_atoms for g in graphs), dtype=np.int64, count=len(graphs))
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    z = torch.from_numpy(np.concatenate([g.atomic_numbers for g in graphs]).astype(np.int64))
    local = np.concatenate([g.nbr_idx for g in graphs]).astype(np.int64)
    nbr_idx = torch.from_numpy(local + np.repeat(offsets, sizes)[:, None])
    dist = torch.from_numpy(np.concatenate([g.nbr_dist for g in graphs]))
    mask = torch.from_numpy(np.concatenate([g.nbr_mask for g in graphs])).to(torch.float32)
    ids_list = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(graphs))]
    if len(ids_list) != len(graphs):
        raise ValueError(f"got {len(ids_list)} ids for {len(graphs)} graphs")
    return GraphBatch(
        atom_fea=enc.index_select(0, z),
        nbr_idx=nbr_idx,
        nbr_fea=expand_masked(converter, dist, mask),
        nbr_mask=mask,
        crystal_idx=torch.from_numpy(np.repeat(np.arange(len(graphs), dtype=np.int64), sizes)),
        n_crystals=len(graphs),
        target=_targets(targets, len(graphs)),
        ids=ids_list,
        atomic_numbers=z,
    )
