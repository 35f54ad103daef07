"""A loaded artifact's predictions as served, on one split's cached graphs and CHGNet features:
shared by the stages that evaluate a checkpoint (``ion_model``: source uncertainty, served
variant, uncleaned test; ``drift_reference``: the training split's served predictions).
"""

from __future__ import annotations

import numpy as np
import torch

from training.chgnet_store import ChgnetFeatures
from training.datasets import IonData
from training.graphs.store import GraphStore
from training.train.loaders import split_loader
from voltage_model.artifact import LoadedModel


def served_mean_std(
    model: LoadedModel, store: GraphStore, data: IonData, split: str,
    chg: ChgnetFeatures | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(mean, std) in volts of a loaded artifact as served (CGCNN, CHGNet head or both), on a
    split's cached graphs and CHGNet features; std before the artifact's ``std_scale``."""
    feats = None
    if model.needs_chgnet:
        if chg is None:
            raise ValueError(f"{data.ion}: the artifact serves a CHGNet head; pass its features")
        feats = torch.from_numpy(chg.rows(data.host_ids(split)))
    means, stds, start = [], [], 0
    with torch.no_grad():
        for b in split_loader(store, data, split):
            f = None if feats is None else feats[start : start + b.n_crystals]
            start += b.n_crystals
            m, sd = model.predict_served(b, f)
            means.append(m.double().numpy())
            stds.append(sd.double().numpy())
    return np.concatenate(means), np.concatenate(stds)
