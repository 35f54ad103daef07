"""One pass of a checkpoint over a set of crystals, keeping what the interpretation needs.

Every figure reads the same numbers (atom vectors after the last convolution, their per-crystal
means, the model's own predictions), so they are computed once, batch by batch, and kept as flat
numpy arrays: a crystal is the slice ``atom_offsets[c]:atom_offsets[c + 1]`` of the atom arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from voltage_model.artifact import LoadedModel
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import CrystalGraph, GraphConverter
from voltage_model.models.cgcnn import mean_pool
from voltage_model.models.gp_head import head_mean_var


@dataclass
class Activations:
    """Atom vectors of every backbone (N, F), crystal means (n, F) and predictions (n,) volts."""

    ids: list[str]
    atom_offsets: np.ndarray  # int64 (n + 1,)
    atomic_numbers: np.ndarray  # int64 (N,)
    atom_vectors: list[np.ndarray]  # per backbone, float32 (N, F)
    pooled: list[np.ndarray]  # per backbone, float64 (n, F)
    predictions: np.ndarray  # float64 (n,), the checkpoint's ensemble mean in volts

    @property
    def n_crystals(self) -> int:
        return len(self.ids)

    def crystal_of_atom(self) -> np.ndarray:
        """Crystal index of every atom (N,)."""
        return np.repeat(np.arange(self.n_crystals), np.diff(self.atom_offsets))


@torch.inference_mode()
def _batch_outputs(
    loaded: LoadedModel,
    graphs: Sequence[CrystalGraph],
    converter: GraphConverter,
    enc: torch.Tensor,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Atom vectors, pooled vectors per backbone and the ensemble prediction for one batch.

    Mirrors ``LoadedModel.predict_with_std`` (every member's heads on its pooled vector, or its
    own head when it has none) so the predictions are exactly those the service returns.
    """
    batch = collate(list(graphs), converter, enc)
    desc = loaded.descriptors(batch)
    atoms, pooled, outs = [], [], []
    for model, heads in loaded.backbones():
        model.eval()
        atom = model.atom_embeddings(batch)
        pool = mean_pool(atom, batch.crystal_idx, batch.n_crystals)
        atoms.append(atom)
        pooled.append(pool)
        if heads:
            outs.extend(head_mean_var(head, pool, desc)[0] for head in heads)
        else:
            outs.append(model.head(pool))
    volts = loaded.normalizer.denorm(torch.stack(outs, dim=0)).mean(dim=0)
    return atoms, pooled, volts


def compute_activations(
    loaded: LoadedModel,
    graphs: Sequence[CrystalGraph],
    ids: Sequence[str],
    converter: GraphConverter,
    encoding: torch.Tensor,
    batch_size: int = 128,
) -> Activations:
    """Run every backbone over ``graphs`` in batches (eval mode, no gradients)."""
    if len(graphs) != len(ids) or not graphs:
        raise ValueError("need one id per graph and at least one graph")
    n_members = len(loaded.backbones())
    atoms: list[list[np.ndarray]] = [[] for _ in range(n_members)]
    pooled: list[list[np.ndarray]] = [[] for _ in range(n_members)]
    preds = []
    for start in range(0, len(graphs), batch_size):
        a, p, v = _batch_outputs(loaded, graphs[start : start + batch_size], converter, encoding)
        for k in range(n_members):
            atoms[k].append(a[k].numpy().astype(np.float32))
            pooled[k].append(p[k].double().numpy())
        preds.append(v.double().numpy())
    sizes = np.fromiter((g.n_atoms for g in graphs), dtype=np.int64, count=len(graphs))
    return Activations(
        ids=[str(i) for i in ids],
        atom_offsets=np.concatenate(([0], np.cumsum(sizes))).astype(np.int64),
        atomic_numbers=np.concatenate([g.atomic_numbers for g in graphs]).astype(np.int64),
        atom_vectors=[np.concatenate(x) for x in atoms],
        pooled=[np.concatenate(x) for x in pooled],
        predictions=np.concatenate(preds),
    )
