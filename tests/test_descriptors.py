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
