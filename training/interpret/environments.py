"""Oxygen-coordinated local environments: who counts as bonded to O, and their 2-D maps.

A site is "oxygen-coordinated" when at least ``min_o`` of its graph neighbours are O atoms within
bonding distance, ``d <= tolerance * (r_cov(site) + r_cov(O))`` with Pyykko covalent radii.  The
graph's own neighbour list is reused (12 nearest within 8 A), so this costs one vectorised pass
instead of pymatgen's CrystalNN (~0.1 s per structure, minutes for one ion's data set on a busy
core).  A scaled covalent-radius cutoff follows each cation's size: a fixed cutoff (say 2.5 A)
would miss K-O or Ba-O bonds (~2.8 A) and count second-shell O around small cations like P.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from voltage_model.graphs.converter import CrystalGraph
from voltage_model.graphs.encoding import MAX_Z, element_data

OXYGEN_Z = 8
_FALLBACK_RADIUS_A = 1.5  # for an element without a tabulated covalent radius


@functools.lru_cache(maxsize=1)
def covalent_radii_angstrom() -> np.ndarray:
    """(MAX_Z + 1,) Pyykko single-bond covalent radius in Angstrom, indexed by Z."""
    radii = np.full(MAX_Z + 1, _FALLBACK_RADIUS_A)
    for el in element_data():
        if el.covalent_radius is not None:
            radii[el.z] = el.covalent_radius / 100.0
    radii.setflags(write=False)
    return radii


def oxygen_neighbour_counts(graph: CrystalGraph, tolerance: float = 1.3) -> np.ndarray:
    """Number of O neighbours within bonding distance of every site of one graph, (n,) int."""
    z = graph.atomic_numbers.astype(np.int64)
    radii = covalent_radii_angstrom()
    cutoff = tolerance * (radii[z] + radii[OXYGEN_Z])  # per centre atom
    is_o = z[graph.nbr_idx] == OXYGEN_Z
    bonded = graph.nbr_mask & (graph.nbr_dist <= cutoff[:, None])
    return (is_o & bonded).sum(axis=1)


def oxygen_counts_for(graphs: Sequence[CrystalGraph], tolerance: float = 1.3) -> np.ndarray:
    """``oxygen_neighbour_counts`` of every graph, concatenated in atom order (N,)."""
    if not graphs:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([oxygen_neighbour_counts(g, tolerance) for g in graphs])


def element_medians(
    atomic_numbers: np.ndarray,
    local: np.ndarray,
    crystal_of_atom: np.ndarray,
    mask: np.ndarray,
    min_sites: int = 5,
) -> dict[str, dict[str, float | int]]:
    """Median local voltage per element over the masked sites (elements with >= min_sites).

    ``n_structures`` is reported next to ``n_sites`` because one large cell can contribute dozens
    of near-identical sites: a median from 40 sites of one crystal is not 40 observations.
    """
    out: dict[str, dict[str, float | int]] = {}
    zs = atomic_numbers[mask]
    values = local[mask]
    crystals = crystal_of_atom[mask]
    for z in np.unique(zs):
        sel = zs == z
        if int(sel.sum()) < min_sites:
            continue
        v = values[sel]
        out[element_data()[int(z) - 1].symbol] = {
            "z": int(z),
            "median": float(np.median(v)),
            "q25": float(np.quantile(v, 0.25)),
            "q75": float(np.quantile(v, 0.75)),
            "n_sites": int(sel.sum()),
            "n_structures": int(np.unique(crystals[sel]).size),
        }
    return out


def subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` (seeded, so figures are reproducible)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def knn_r2(x: np.ndarray, y: np.ndarray, k: int = 10, seed: int = 0) -> float:
    """Cross-validated R^2 of predicting ``y`` from its k nearest neighbours in ``x``.

    A number for "similar environments sit together and share a local voltage": near 1 when the
    map is organised by local voltage, near 0 (or below) when it is not.
    """
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsRegressor

    if len(y) < 5 * (k + 1):
        return float("nan")
    folds = KFold(n_splits=5, shuffle=True, random_state=seed)
    pred = cross_val_predict(KNeighborsRegressor(n_neighbors=k), x, y, cv=folds)
    return float(r2_score(y, pred))


MIN_PROJECTED = 10  # fewer environments than this make no map worth drawing


def _empty_projection(idx: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Same keys as a real projection, NaN metrics: a tiny data set must not fail the stage."""
    nan = {"rho": float("nan"), "p": float("nan"), "n": len(idx)}
    return {
        "indices": idx,
        "pca": np.zeros((len(idx), 2)),
        "tsne": np.zeros((len(idx), 2)),
        "values": y,
        "metrics": {
            "n_points": len(idx),
            "perplexity": float("nan"),
            "pca_explained_variance_ratio": [float("nan"), float("nan")],
            "spearman_pc1_local_voltage": nan,
            "spearman_pc2_local_voltage": nan,
            "knn10_r2_local_voltage": {
                "tsne": float("nan"), "pca": float("nan"), "full_vectors": float("nan"),
            },
        },
    }  # fmt: skip


def project_environments(
    vectors: np.ndarray,
    values: np.ndarray,
    max_points: int = 3000,
    perplexity: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """PCA and t-SNE (2-D) of environment vectors, with how well each map orders ``values``.

    t-SNE is quadratic-ish and the busiest step here, so at most ``max_points`` environments
    (a seeded subsample) are projected.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    from training.interpret.elements import spearman

    idx = subsample(len(values), max_points, seed)
    x = np.asarray(vectors[idx], dtype=np.float64)
    y = np.asarray(values[idx], dtype=np.float64)
    if len(idx) < MIN_PROJECTED:
        return _empty_projection(idx, y)
    pca = PCA(n_components=2, svd_solver="full")
    p2 = pca.fit_transform(x)
    perplexity = float(min(perplexity, max(2.0, (len(idx) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=1)
    t2 = tsne.fit_transform(x)
    return {
        "indices": idx,
        "pca": p2,
        "tsne": t2,
        "values": y,
        "metrics": {
            "n_points": len(idx),
            "perplexity": perplexity,
            "pca_explained_variance_ratio": [float(r) for r in pca.explained_variance_ratio_],
            "spearman_pc1_local_voltage": spearman(p2[:, 0], y),
            "spearman_pc2_local_voltage": spearman(p2[:, 1], y),
            "knn10_r2_local_voltage": {
                "tsne": knn_r2(t2, y, seed=seed),
                "pca": knn_r2(p2, y, seed=seed),
                "full_vectors": knn_r2(x, y, seed=seed),
            },
        },
    }
