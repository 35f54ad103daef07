"""CGCNN model: fast form == literal form, masking, custom backward, API shapes, checkpoints.

Batches are built with the real converter and ``collate`` from small hand-made crystals, plus
sparse crystals whose atoms have padded neighbour slots, so the masked code paths are exercised.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from voltage_model.artifact import (
    SCHEMA_VERSION,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from voltage_model.graphs.batch import GraphBatch, collate
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.cgcnn import (
    CGCNN,
    CGCNNConfig,
    Edges,
    Head,
    _BNMode,
    _GatedEdges,
    _mean_pool_loop,
    mean_pool,
)
from voltage_model.normalizer import Normalizer

CONV = GraphConverter()
METALS = ["Li", "Na", "Mg", "Al", "Ti", "V", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"]
ANIONS = ["O", "S", "F", "Cl"]


def small_crystals(n: int, seed: int = 0) -> list[Structure]:
    """CsCl (2 atoms), perovskite (5) and rocksalt (8 atoms) cells with random chemistry."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        m, m2, x = rng.choice(METALS), rng.choice(METALS), rng.choice(ANIONS)
        if i % 3 == 0:
            a = rng.uniform(2.8, 3.6)
            out.append(Structure(Lattice.cubic(a), [m, x], [[0, 0, 0], [0.5, 0.5, 0.5]]))
        elif i % 3 == 1:
            a = rng.uniform(3.7, 4.2)
            coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
            out.append(Structure(Lattice.cubic(a), [m2, m, x, x, x], coords))
        else:
            a = rng.uniform(4.1, 5.0)
            out.append(
                Structure.from_spacegroup(
                    "Fm-3m", Lattice.cubic(a), [m, x], [[0, 0, 0], [0.5, 0.5, 0.5]]
                )
            )
    return out


def sparse_crystals() -> list[Structure]:
    """Atoms with padded slots: 6 real neighbours in a 7 A cell; none at all in a 30 A box."""
    return [
        Structure(Lattice.cubic(7.0), ["Li"], [[0, 0, 0]]),
        Structure(Lattice.cubic(30.0), ["Na"], [[0.5, 0.5, 0.5]]),
        Structure(Lattice.cubic(7.5), ["Mn", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]]),
    ]


def make_batch(structures: list[Structure], dtype: torch.dtype = torch.float32) -> GraphBatch:
    graphs = [CONV.convert(s) for s in structures]
    targets = np.linspace(1.0, 4.0, len(graphs))
    batch = collate(graphs, CONV, targets=targets, ids=[f"c{i}" for i in range(len(graphs))])
    if dtype != torch.float32:
        batch.atom_fea, batch.nbr_fea = batch.atom_fea.to(dtype), batch.nbr_fea.to(dtype)
        batch.nbr_mask = batch.nbr_mask.to(dtype)
    return batch


@pytest.fixture(scope="module")
def dense_batch() -> GraphBatch:
    batch = make_batch(small_crystals(12))
    assert bool((batch.nbr_mask == 1).all())
    return batch


@pytest.fixture(scope="module")
def padded_batch() -> GraphBatch:
    batch = make_batch(small_crystals(6, seed=1) + sparse_crystals())
    assert bool((batch.nbr_mask == 0).any())
    return batch


def model_pair(seed: int = 0, **cfg: int) -> tuple[CGCNN, CGCNN]:
    torch.manual_seed(seed)
    model = CGCNN(CGCNNConfig(**cfg))
    return model, copy.deepcopy(model)


def grad_vector(model: CGCNN) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# ----------------------------------------------------------------------------- fast == plain
@pytest.mark.parametrize("which", ["dense", "padded"])
@pytest.mark.parametrize("train", [True, False])
def test_fast_form_equals_plain_concat_form(which: str, train: bool, request) -> None:
    batch = request.getfixturevalue(f"{which}_batch")
    fast, plain = model_pair()
    fast.train(train)
    plain.train(train)
    y_fast, y_plain = fast(batch), plain(batch, plain=True)
    assert y_fast.shape == (batch.n_crystals,)
    torch.testing.assert_close(y_fast, y_plain, atol=1e-5, rtol=1e-5)
    (y_fast**2).sum().backward()
    (y_plain**2).sum().backward()
    g_fast, g_plain = grad_vector(fast), grad_vector(plain)
    torch.testing.assert_close(g_fast, g_plain, atol=1e-5 * g_plain.abs().max().item(), rtol=1e-4)
    for b_fast, b_plain in zip(fast.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b_fast, b_plain, atol=1e-5, rtol=1e-5)


def test_fast_equals_plain_after_running_stats_moved(dense_batch: GraphBatch) -> None:
    """Eval mode reads the running statistics; make them non-trivial first."""
    fast, plain = model_pair(n_conv=2, n_h=2)
    for _ in range(3):
        fast(dense_batch)
        plain(dense_batch, plain=True)
    fast.eval()
    plain.eval()
    torch.testing.assert_close(fast(dense_batch), plain(dense_batch, plain=True), atol=1e-5, rtol=0)


def test_inference_path_matches_training_path(padded_batch: GraphBatch) -> None:
    """Under no_grad the fused kernel skips saving tensors; the numbers must not change."""
    model = CGCNN()
    model.eval()
    with_grad = model(padded_batch)
    with torch.inference_mode():
        without = model(padded_batch)
    torch.testing.assert_close(with_grad.detach(), without, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- masking
def with_extra_padding(batch: GraphBatch, extra: int = 4, seed: int = 0) -> GraphBatch:
    """Append ``extra`` padded slots per atom holding garbage indices and features."""
    g = torch.Generator().manual_seed(seed)
    n, _, k = batch.nbr_fea.shape
    idx = torch.randint(0, n, (n, extra), generator=g)
    fea = torch.rand(n, extra, k, generator=g)
    return dataclasses.replace(
        batch,
        nbr_idx=torch.cat([batch.nbr_idx, idx], dim=1),
        nbr_fea=torch.cat([batch.nbr_fea, fea], dim=1),
        nbr_mask=torch.cat([batch.nbr_mask, torch.zeros(n, extra)], dim=1),
    )


@pytest.mark.parametrize("plain", [False, True])
@pytest.mark.parametrize("train", [True, False])
def test_padded_neighbours_do_not_change_the_output(
    dense_batch: GraphBatch, plain: bool, train: bool
) -> None:
    a, b = model_pair(seed=3)
    a.train(train)
    b.train(train)
    y = a(dense_batch, plain=plain)
    y_padded = b(with_extra_padding(dense_batch), plain=plain)
    torch.testing.assert_close(y, y_padded, atol=1e-5, rtol=1e-5)
    for buf_a, buf_b in zip(a.buffers(), b.buffers(), strict=True):  # BN stats: real edges only
        torch.testing.assert_close(buf_a, buf_b, atol=1e-5, rtol=1e-5)


def test_atom_without_any_neighbour_is_fine() -> None:
    batch = make_batch([Structure(Lattice.cubic(30.0), ["Na"], [[0, 0, 0]])] * 2)
    assert not bool(batch.nbr_mask.any())
    model = CGCNN()
    model.eval()
    assert torch.isfinite(model(batch)).all()


# ----------------------------------------------------------------------------- custom backward
@pytest.mark.parametrize("which", ["dense", "padded"])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_fused_edge_function_gradcheck(which: str, batch_stats: bool) -> None:
    structures = small_crystals(2, seed=5)
    if which == "padded":
        structures = structures[:1] + sparse_crystals()[:1]
    batch = make_batch(structures, dtype=torch.float64)
    edges = Edges.from_batch(batch)
    assert edges.dense == (which == "dense")
    g = torch.Generator().manual_seed(0)
    n, c, k = batch.atom_fea.shape[0], 8, batch.nbr_fea.shape[2]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    bn = _BNMode(
        batch_stats=batch_stats,
        running_mean=None if batch_stats else torch.randn(c, generator=g, dtype=torch.float64),
        running_var=None if batch_stats else torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
        momentum=0.1,
        eps=1e-5,
    )
    inputs = (rand(n, c), rand(n, c), rand(c, k) * 0.3, rand(c) + 1.0, rand(c))
    inputs = tuple(t.detach().requires_grad_() for t in inputs)

    def fn(*tensors: torch.Tensor) -> torch.Tensor:
        return _GatedEdges.apply(*tensors, edges, bn, True)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- API
def test_backbone_head_split_and_shapes(dense_batch: GraphBatch) -> None:
    model = CGCNN(CGCNNConfig(n_h=3))
    model.eval()
    emb = model.atom_embeddings(dense_batch)
    pooled = model.pooled(dense_batch)
    assert emb.shape == (dense_batch.atom_fea.shape[0], 64)
    assert pooled.shape == (dense_batch.n_crystals, 64)
    torch.testing.assert_close(model.head(pooled), model(dense_batch))
    torch.testing.assert_close(pooled, mean_pool(emb, dense_batch.crystal_idx, 12))
    assert len(model.fcs) == 2
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"embedding", "convs", "conv_to_fc", "fcs", "fc_out"}


def test_mean_pool_matches_loop_for_unsorted_crystal_index() -> None:
    g = torch.Generator().manual_seed(0)
    atom = torch.randn(50, 7, generator=g, requires_grad=True)
    idx = torch.randint(0, 6, (50,), generator=g)
    idx[:6] = torch.arange(6)  # every crystal has an atom
    fast = mean_pool(atom, idx, 6)
    loop = _mean_pool_loop(atom, idx, 6)
    torch.testing.assert_close(fast, loop)
    (ga,) = torch.autograd.grad(fast.square().sum(), atom)
    (gb,) = torch.autograd.grad(loop.square().sum(), atom)
    torch.testing.assert_close(ga, gb)


def test_config_round_trip_and_strictness() -> None:
    cfg = CGCNNConfig(atom_fea_len=32, n_conv=4, n_h=2)
    assert CGCNNConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        CGCNNConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError):
        CGCNNConfig(n_h=0)


# ----------------------------------------------------------------------------- checkpoints
def trained_like(batch: GraphBatch) -> CGCNN:
    """A model whose BN running stats moved (so eval differs from init)."""
    torch.manual_seed(1)
    model = CGCNN(CGCNNConfig(n_conv=2, n_h=2))
    for _ in range(2):
        model(batch)
    return model.eval()


def test_checkpoint_round_trip_weights_only(tmp_path: Path, padded_batch: GraphBatch) -> None:
    model = trained_like(padded_batch)
    norm = Normalizer(mean=3.2, std=0.7)
    extra = {"ion": "Li", "metrics": {"val_mae": np.float64(0.41)}, "epochs": 3, "tags": ("a",)}
    path = save_checkpoint(tmp_path / "m.pt", model, model.config, CONV.to_dict(), norm, extra)
    raw = torch.load(path, weights_only=True)
    assert raw["schema_version"] == SCHEMA_VERSION and raw["heads"] is None
    loaded = load_checkpoint(path)
    assert not loaded.model.training
    assert loaded.model_config == model.config
    assert GraphConverter.from_dict(loaded.converter_dict) == CONV
    assert loaded.normalizer == norm
    assert loaded.extra == {"ion": "Li", "metrics": {"val_mae": 0.41}, "epochs": 3, "tags": ["a"]}
    with torch.no_grad():
        expected = norm.denorm(model(padded_batch))
    assert torch.equal(loaded.predict_volts(padded_batch), expected)


def test_checkpoint_with_ensemble_heads(tmp_path: Path, dense_batch: GraphBatch) -> None:
    model = trained_like(dense_batch)
    heads = []
    for k in range(3):
        head = Head.from_model(model)
        torch.manual_seed(k)
        head.fc_out.weight.data.normal_()
        heads.append(head)
    norm = Normalizer(1.0, 2.0)
    path = save_checkpoint(tmp_path / "e.pt", model, None, CONV, norm, heads=heads)
    loaded = load_checkpoint(path)
    assert loaded.ensemble is not None and len(loaded.ensemble.heads) == 3
    mean, std = loaded.predict_with_std(dense_batch)
    with torch.no_grad():
        pooled = model.pooled(dense_batch)
        per_head = torch.stack([norm.denorm(h.eval()(pooled)) for h in heads])
    torch.testing.assert_close(mean, per_head.mean(0))
    torch.testing.assert_close(std, per_head.std(0, unbiased=False))


def test_checkpoint_rejects_unknown_schema_and_foreign_files(tmp_path: Path) -> None:
    model = CGCNN()
    path = save_checkpoint(tmp_path / "m.pt", model, None, CONV.to_dict(), Normalizer())
    payload = torch.load(path, weights_only=True)
    payload["schema_version"] = SCHEMA_VERSION + 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="schema_version"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a"):
        load_checkpoint(tmp_path / "bare.pt")
    with pytest.raises(TypeError, match=r"extra\.bad"):
        save_checkpoint(tmp_path / "x.pt", model, None, {}, Normalizer(), {"bad": object()})
    with pytest.raises(ValueError, match="does not match"):
        save_checkpoint(tmp_path / "y.pt", model, CGCNNConfig(n_conv=1), {}, Normalizer())
