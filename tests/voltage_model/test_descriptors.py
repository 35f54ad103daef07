"""Composition descriptors come from the graph itself, identically for a served request (collate)
and for training (the graph store's loader), and equal the baselines' featuriser on the formula."""

from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Structure

from tests.conftest import host_structures
from training.graphs.store import GraphLoader, GraphStore
from voltage_model.composition import composition_features
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.descriptors import (
    batch_descriptors,
    formula_of,
    graph_descriptors,
    store_descriptors,
)


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    return host_structures(6, seed=3)


def test_formula_of_atomic_numbers_is_the_reduced_formula():
    assert formula_of([3, 8, 26, 15, 8, 8, 8]) == "LiFePO4"
    assert formula_of([25, 8, 8, 25, 8, 8]) == "MnO2"
    with pytest.raises(ValueError, match="without atoms"):
        formula_of([])


def test_batch_descriptors_equal_the_featuriser_on_each_formula(structures):
    conv = GraphConverter()
    graphs = [conv.convert(s) for s in structures]
    batch = collate(graphs, conv)
    got = batch_descriptors(batch.atomic_numbers, batch.crystal_idx, batch.n_crystals).numpy()
    want, _ = composition_features([s.composition.reduced_formula for s in structures])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(want))
    assert not np.allclose(np.nan_to_num(got[0]), np.nan_to_num(got[1]))  # really per crystal


def test_store_loader_batches_carry_the_same_descriptors(structures):
    conv = GraphConverter()
    ids = [f"h{i}" for i in range(len(structures))]
    graphs = [conv.convert(s) for s in structures]
    store = GraphStore.from_graphs(zip(ids, graphs, strict=True), conv)
    loader = GraphLoader(store, [(i, 1.0) for i in ids], batch_size=4, shuffle=True, seed=1)
    for batch in loader:
        got = batch_descriptors(batch.atomic_numbers, batch.crystal_idx, batch.n_crystals)
        want = graph_descriptors([store.get(i).atomic_numbers for i in batch.ids])
        np.testing.assert_allclose(np.nan_to_num(got.numpy()), np.nan_to_num(want))
    direct = store_descriptors(store, ids)
    assert direct.shape[0] == len(ids)


def _matminer_rows(formulas: list[str]) -> tuple[np.ndarray, list[str]]:
    """The reference: matminer's featurisers themselves, as the baselines used them."""
    from matminer.featurizers.composition import ElementProperty, Stoichiometry, ValenceOrbital
    from pymatgen.core import Composition

    featurizers = (
        ElementProperty.from_preset("magpie", impute_nan=False),
        ValenceOrbital(impute_nan=False),
        Stoichiometry(),
    )
    rows = [
        [float(v) for f in featurizers for v in f.featurize(Composition(formula))]
        for formula in formulas
    ]
    return np.array(rows), [label for f in featurizers for label in f.feature_labels()]


def _formulas(n: int, seed: int) -> list[str]:
    """Random compositions over the whole periodic table (elements with missing Magpie data,
    ties in abundance for the mode, one to five elements) plus electrode-like formulas."""
    from pymatgen.core import Element

    rng = np.random.default_rng(seed)
    symbols = [e.symbol for e in Element if e.Z <= 103]
    out = ["LiCoO2", "CoO2", "FePO4", "Mn2O4", "Na2FeP2O7", "MgMo6S8", "ZnV2O5", "AlCl3"]
    out += ["He2O", "XeF2", "CaC2", "TiS2", "Nb3O7F", "K3V2(PO4)3", "CeO2", "UO2", "Pu2O3", "Fm"]
    for _ in range(n):
        k = int(rng.integers(1, 6))
        els = rng.choice(symbols, size=k, replace=False)
        amounts = rng.choice([1, 1, 2, 3, 4, 0.5, 1.5, 7], size=k)
        out.append("".join(f"{e}{a:g}" for e, a in zip(els, amounts, strict=True)))
    return out


def test_numpy_descriptors_are_matminers_bit_for_bit():
    """The served featuriser (numpy over matminer's table) gives exactly matminer's numbers,
    NaN where matminer has NaN, on 300 random compositions and electrode formulas."""
    formulas = _formulas(300, seed=11)
    want, want_names = _matminer_rows(formulas)
    got, names = composition_features(formulas)
    assert names == want_names
    assert np.isnan(want).any()  # the set exercises missing elemental data
    np.testing.assert_array_equal(got, want)  # NaN == NaN here: exact equality


def test_shipped_table_is_what_the_installed_matminer_holds():
    """A matminer upgrade that changes its data or labels fails here: rerun
    scripts/make_composition_table.py (and bump FEATURE_VERSION if numbers change)."""
    import json
    import sys

    from voltage_model.composition import TABLE_PATH

    sys.path.insert(0, str(TABLE_PATH.parents[2] / "scripts"))
    try:
        from make_composition_table import build_table
    finally:
        sys.path.pop(0)
    shipped = json.loads(TABLE_PATH.read_text())
    assert json.dumps(shipped, sort_keys=True) == json.dumps(
        json.loads(json.dumps(build_table())), sort_keys=True
    )


def test_serving_featuriser_does_not_import_matminer():
    """The cold-start point of the table: featurising a formula imports no matminer,
    scikit-learn or pandas (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from voltage_model.composition import composition_features\n"
        "composition_features(['LiCoO2'])\n"
        "bad = [m for m in ('matminer', 'sklearn', 'pandas') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
