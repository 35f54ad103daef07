"""Element representations: what the first layer learned about each element (paper Fig. 3a).

The ``embedding`` layer maps an element's fixed 92-d CGCNN encoding to a learned 64-d vector; it
is the only place the network sees an element in isolation, so its 2-D PCA shows which elemental
properties the model found useful. Spearman (rank) correlations are used because the encoding is
one-hot binned: only the order of a property can survive into the embedding, not its scale.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from voltage_model.graphs.encoding import element_data
from voltage_model.models.cgcnn import CGCNN

# property -> unit: the four elemental properties the embedding is compared with
PROPERTIES: dict[str, str] = {
    "covalent_radius": "pm (Pyykko single bond)",
    "electronegativity": "Pauling",
    "first_ionization_energy": "eV",
    "atomic_radius": "pm (mendeleev atomic_radius)",
}


@functools.lru_cache(maxsize=1)
def _property_table() -> dict[str, dict[int, float]]:
    """Element properties by Z from mendeleev (two table reads, cached for the process)."""
    from mendeleev.fetch import fetch_table

    elements = fetch_table("elements").set_index("atomic_number")
    ies = fetch_table("ionizationenergies")
    first_ie = ies[ies["ion_charge"] == 0].set_index("atomic_number")["ionization_energy"]
    columns = {
        "covalent_radius": elements["covalent_radius_pyykko"],
        "electronegativity": elements["en_pauling"],
        "atomic_radius": elements["atomic_radius"],
        "first_ionization_energy": first_ie,
    }
    return {
        name: {int(z): float(v) for z, v in col.items() if v is not None and np.isfinite(v)}
        for name, col in columns.items()
    }


def element_properties(zs: Sequence[int]) -> dict[str, np.ndarray]:
    """Property arrays aligned with ``zs`` (NaN where mendeleev has no value)."""
    table = _property_table()
    return {
        name: np.array([table[name].get(int(z), np.nan) for z in zs], dtype=np.float64)
        for name in PROPERTIES
    }


def symbol(z: int) -> str:
    return element_data()[int(z) - 1].symbol


def group_of(z: int) -> int:
    """IUPAC group 1..18, or 0 for the f-block (the encoding's convention)."""
    group = element_data()[int(z) - 1].group
    return int(group) if group is not None else 0


@torch.inference_mode()
def element_embeddings(model: CGCNN, encoding: torch.Tensor, zs: Sequence[int]) -> np.ndarray:
    """``model.embedding`` applied to each element's 92-d encoding row, (len(zs), F)."""
    model.eval()
    rows = encoding.index_select(0, torch.as_tensor(list(zs), dtype=torch.int64))
    return model.embedding(rows).double().numpy()


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First two principal components (m, 2) and their explained-variance ratios (2,).

    sklearn's PCA fixes each component's sign (largest loading positive), so reruns and reports
    agree; the sign itself carries no meaning, only |rho| does.
    """
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, svd_solver="full")
    coords = pca.fit_transform(np.asarray(x, dtype=np.float64))
    return coords, pca.explained_variance_ratio_


def spearman(a: np.ndarray, b: np.ndarray) -> dict[str, float | int]:
    """Spearman rho, two-sided p and n over the pairs where both values are finite."""
    from scipy.stats import spearmanr

    keep = np.isfinite(a) & np.isfinite(b)
    n = int(keep.sum())
    if n < 3:
        return {"rho": float("nan"), "p": float("nan"), "n": n}
    res = spearmanr(a[keep], b[keep])
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": n}


def correlation_table(coords: np.ndarray, props: dict[str, np.ndarray]) -> dict[str, Any]:
    """``{"PC1": {prop: {rho, p, n}}, "PC2": {...}}``."""
    return {
        f"PC{k + 1}": {name: spearman(coords[:, k], values) for name, values in props.items()}
        for k in range(coords.shape[1])
    }


def embedding_analysis(model: CGCNN, encoding: torch.Tensor, zs: Sequence[int]) -> dict[str, Any]:
    """Embeddings -> PCA -> correlations for the elements ``zs`` of one backbone."""
    zs = sorted({int(z) for z in zs})
    coords, ratio = pca_2d(element_embeddings(model, encoding, zs))
    props = element_properties(zs)
    return {
        "elements": [symbol(z) for z in zs],
        "z": zs,
        "groups": [group_of(z) for z in zs],
        "pc": coords.tolist(),
        "explained_variance_ratio": [float(r) for r in ratio],
        "spearman": correlation_table(coords, props),
    }
