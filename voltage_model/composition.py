"""Composition descriptors of the charged formula for the conventional-ML baselines.

The baselines answer "how far does composition alone get you?", so the features come from a
maintained library (matminer) instead of hand-written tables: Magpie elemental-property
statistics (132 columns), valence-orbital occupations (8) and stoichiometric p-norms (6).
All of them are computed offline from data that ships inside matminer/pymatgen.

Featurising ~2000 formulas takes several seconds, so `featurize_cached` keeps a compressed
``.npz`` keyed by formula that every pipeline stage can share. The cache holds only plain
numeric/unicode arrays and is read with ``allow_pickle=False``: a cache file is data, never code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from matminer.featurizers.base import BaseFeaturizer
from matminer.featurizers.composition import ElementProperty, Stoichiometry, ValenceOrbital
from pymatgen.core import Composition

# Bump when the featuriser set or its settings change, so stale caches are recomputed.
FEATURE_VERSION = "magpie+valence+stoich/v1"

MAGPIE_PREFIX = "MagpieData "
MAGPIE_STATS = ("minimum", "maximum", "range", "mean", "avg_dev", "mode")


@cache
def _featurizers() -> tuple[BaseFeaturizer, ...]:
    """The matminer featurisers, built once.

    ``impute_nan=False`` keeps missing elemental data visible as NaN: imputation belongs in the
    model pipeline, where it is fitted on the training split only.
    """
    return (
        ElementProperty.from_preset("magpie", impute_nan=False),
        ValenceOrbital(impute_nan=False),
        Stoichiometry(),
    )


def feature_names() -> list[str]:
    """Column names of `composition_features`, in order (matminer's own labels)."""
    return [label for f in _featurizers() for label in f.feature_labels()]


def feature_group(name: str) -> str:
    """The underlying quantity a feature column summarises.

    Magpie columns are ``"MagpieData <stat> <Property>"`` -> ``<Property>`` (e.g.
    ``"CovalentRadius"``), so importances can be totalled per elemental property; valence-orbital
    and stoichiometry columns form one group each.
    """
    if name.startswith(MAGPIE_PREFIX):
        stat, _, prop = name[len(MAGPIE_PREFIX) :].partition(" ")
        if stat in MAGPIE_STATS and prop:
            return prop
    if "valence electrons" in name:
        return "ValenceOrbital"
    if name.endswith("-norm"):
        return "Stoichiometry"
    return name


def _featurize_one(formula: str) -> list[float]:
    """All descriptors of one formula.

    A formula that does not parse, or names an unknown element (pymatgen accepts those as
    dummy species), raises ValueError: a silent NaN row would hide a data bug.
    """
    comp = Composition(formula)
    if not comp.valid or comp.num_atoms <= 0:
        raise ValueError(f"not a composition of real elements: {formula!r}")
    return [float(v) for f in _featurizers() for v in f.featurize(comp)]


def composition_features(formulas: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Descriptor matrix (len(formulas), n_features) float64 and its column names.

    Duplicate formulas are featurised once: the electrode table repeats charged formulas.
    """
    names = feature_names()
    unique = list(dict.fromkeys(formulas))
    rows = {formula: _featurize_one(formula) for formula in unique}
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    return X, names


def _load_cache(cache_path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Formula -> feature row from an existing cache; empty when missing or stale."""
    if not cache_path.exists():
        return {}
    with np.load(cache_path, allow_pickle=False) as npz:
        if str(npz["version"]) != FEATURE_VERSION or npz["names"].tolist() != names:
            return {}
        return dict(zip(npz["formulas"].tolist(), npz["X"], strict=True))


def _save_cache(cache_path: Path, rows: dict[str, np.ndarray], names: list[str]) -> None:
    """Write the cache atomically so a concurrent or interrupted stage never sees half a file."""
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    formulas = sorted(rows)
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    fd, tmp = tempfile.mkstemp(dir=cache_path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(
                fh,
                version=np.array(FEATURE_VERSION),
                names=np.array(names, dtype=str),
                formulas=np.array(formulas, dtype=str),
                X=X,
            )
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache is shared by stages and users
        os.replace(tmp, cache_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def featurize_cached(formulas: Sequence[str], cache_path: Path) -> tuple[np.ndarray, list[str]]:
    """`composition_features` backed by an ``.npz`` cache keyed by formula.

    Only formulas absent from the cache are featurised; the cache is rewritten only when it
    grew, so a stage that finds everything cached does no featurisation and no write.
    """
    cache_path = Path(cache_path)
    names = feature_names()
    rows = _load_cache(cache_path, names)
    missing = [f for f in dict.fromkeys(formulas) if f not in rows]
    if missing:
        X_new, _ = composition_features(missing)
        rows.update(zip(missing, X_new, strict=True))
        _save_cache(cache_path, rows, names)
    X = np.array([rows[f] for f in formulas], dtype=np.float64).reshape(len(formulas), len(names))
    return X, names
