"""Graph loaders over one ion's train/val/test splits. Graphs are cached per host structure, so
each item is (host id, target); shared by from-scratch training, scoring and the stages that
evaluate a loaded model on one split.
"""

from __future__ import annotations

from training.data.split import SPLITS
from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore


def loaders(store: GraphStore, data: IonData, batch_size: int, seed: int) -> dict[str, GraphLoader]:
    """One loader per split; items are (charged_id, target) since graphs are keyed by host."""
    out = {}
    for split in SPLITS:
        items = list(zip(data.host_ids(split), data.targets(split).tolist(), strict=True))
        out[split] = GraphLoader(
            store, items, batch_size=batch_size, shuffle=split == "train", seed=seed
        )
    return out


def split_loader(store: GraphStore, data: IonData, split: str) -> GraphLoader:
    """An evaluation loader over one split, in split-file order (no shuffling)."""
    items = list(zip(data.host_ids(split), data.targets(split).tolist(), strict=True))
    return GraphLoader(store, items, batch_size=512, shuffle=False)
