"""Training loop, normaliser and metrics on a few dozen small real crystal graphs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from training.graphs.store import GraphLoader, GraphStore
from training.train.loop import (
    SCHEDULERS,
    FitLoaders,
    FitResult,
    TrainConfig,
    fit,
    predict,
    set_seed,
)
from training.train.metrics import mae, r2, regression_metrics, rmse
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig
from voltage_model.normalizer import Normalizer

CONV = GraphConverter()
METALS = ["Li", "Na", "Mg", "Al", "Ti", "V", "Mn", "Fe", "Co", "Ni", "Cu", "Zn"]
ANIONS = ["O", "S", "F", "Cl"]
SMALL = CGCNNConfig(atom_fea_len=32, h_fea_len=32, n_conv=2)


def dataset(n: int = 36, seed: int = 0) -> tuple[GraphStore, list[tuple[str, float]]]:
    """Small cubic crystals; the target depends on chemistry and lattice constant (learnable)."""
    rng = np.random.default_rng(seed)
    value = {el: float(v) for el, v in zip(METALS + ANIONS, rng.uniform(0, 3, 16), strict=True)}
    graphs, items = [], []
    for i in range(n):
        m, x = str(rng.choice(METALS)), str(rng.choice(ANIONS))
        if i % 2:
            a = float(rng.uniform(2.8, 3.6))
            s = Structure(Lattice.cubic(a), [m, x], [[0, 0, 0], [0.5, 0.5, 0.5]])
        else:
            a = float(rng.uniform(4.1, 5.0))
            s = Structure.from_spacegroup(
                "Fm-3m", Lattice.cubic(a), [m, x], [[0, 0, 0], [0.5, 0.5, 0.5]]
            )
        key = f"mp-{i}"
        graphs.append((key, CONV.convert(s)))
        items.append((key, value[m] + 0.5 * value[x] + 0.8 * (a - 4.0)))
    return GraphStore.from_graphs(graphs, CONV), items


@pytest.fixture(scope="module")
def data() -> tuple[GraphStore, list[tuple[str, float]]]:
    return dataset()


def loaders(data, batch_size: int = 12) -> tuple[GraphLoader, GraphLoader]:
    store, items = data
    train = GraphLoader(store, items, batch_size=batch_size, shuffle=True, seed=0)
    val = GraphLoader(store, items[:12], batch_size=batch_size)
    return train, val


def fresh_model(seed: int = 0) -> CGCNN:
    set_seed(seed)
    return CGCNN(SMALL)


def run(data, cfg: TrainConfig, **kwargs) -> tuple[CGCNN, FitResult, Normalizer]:
    train, val = loaders(data)
    norm = Normalizer.fit([t for _, t in data[1]])
    model = fresh_model(cfg.seed)
    return model, fit(model, FitLoaders(train, val), cfg, norm, **kwargs), norm


# ----------------------------------------------------------------------------- fit
def test_training_loss_falls_and_beats_the_mean_predictor(data, caplog) -> None:
    cfg = TrainConfig(epochs=30, optimizer="adam", lr=3e-3, scheduler="cosine", seed=0)
    with caplog.at_level(logging.INFO, logger="training.train.loop"):
        model, result, norm = run(data, cfg)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert any("val_mae" in r.getMessage() for r in caplog.records)
    store, items = data
    ids, y_true, y_pred = predict(model, GraphLoader(store, items, batch_size=10), norm)
    assert ids == [k for k, _ in items]
    baseline = mae(y_true, np.full_like(y_true, y_true.mean()))
    assert mae(y_true, y_pred) < 0.6 * baseline
    best = min(range(30), key=lambda i: result.history[i]["val_mae"])
    assert result.best_epoch == best + 1
    assert result.best_val_mae == pytest.approx(result.history[best]["val_mae"])
    # the model holds the best epoch's weights
    for k, v in model.state_dict().items():
        assert torch.equal(v, result.best_state[k])


def test_same_seed_gives_identical_weights(data) -> None:
    cfg = TrainConfig(epochs=2, lr=0.01, seed=7)
    m1, r1, _ = run(data, cfg)
    m2, r2_, _ = run(data, cfg)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2_.history]
    m3, _, _ = run(data, TrainConfig(epochs=2, lr=0.01, seed=8))
    assert not torch.equal(m1.fc_out.weight, m3.fc_out.weight)


class Pruned(Exception):
    pass


def test_on_epoch_callback_sees_metrics_and_its_exception_propagates(data) -> None:
    seen: list[tuple[int, dict]] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        seen.append((epoch, metrics))
        if epoch == 3:
            raise Pruned

    cfg = TrainConfig(epochs=10, optimizer="adamw", lr=1e-3, scheduler="none")
    train, val = loaders(data)
    model = fresh_model()
    with pytest.raises(Pruned):
        fit(model, FitLoaders(train, val), cfg, Normalizer(2.0, 1.0), on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert {"train_loss", "val_mae", "val_rmse", "val_r2", "lr"} <= set(seen[0][1])
    assert not model.training


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_runs(data, scheduler: str) -> None:
    cfg = TrainConfig(epochs=2, scheduler=scheduler, milestones=[1], step_size=1, lr=0.01)
    _, result, _ = run(data, cfg)
    lrs = [h["lr"] for h in result.history]
    assert len(lrs) == 2 and all(np.isfinite(lrs))
    if scheduler in ("step", "multistep"):
        assert lrs[1] == pytest.approx(0.001)


def test_transfer_learning_trains_only_the_head(data) -> None:
    train, val = loaders(data)
    model = fresh_model()
    for _ in range(2):  # give BatchNorm non-trivial running statistics
        for batch in train:
            model(batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    head = model.head_parameters()
    assert len(head) + len(model.backbone_parameters()) == len(list(model.parameters()))
    cfg = TrainConfig(epochs=3, optimizer="adam", lr=1e-2, scheduler="none")
    fit(model, FitLoaders(train, val), cfg, Normalizer(2.0, 1.0), trainable_params=head)
    after = model.state_dict()
    for k, v in before.items():
        changed = not torch.equal(v, after[k])
        assert changed == k.startswith(("conv_to_fc", "fc_out")), k
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_fit_accepts_a_plain_list_of_batches_and_no_validation(data) -> None:
    store, items = data
    norm = Normalizer.fit([t for _, t in items])
    batches = [
        collate([store.get(k) for k, _ in chunk], CONV, targets=[t for _, t in chunk])
        for chunk in (items[:18], items[18:])
    ]
    model = fresh_model()
    result = fit(model, FitLoaders(batches), TrainConfig(epochs=3, scheduler="onecycle"), norm)
    assert np.isnan(result.best_val_mae) and len(result.history) == 3


def test_non_finite_loss_raises(data) -> None:
    train, val = loaders(data)
    with pytest.raises(FloatingPointError):
        fit(
            fresh_model(),
            FitLoaders(train, val),
            TrainConfig(epochs=2, lr=1e12),
            Normalizer(0.0, 1e-3),
        )


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_every_loss_learns_and_is_the_one_reported(data, loss: str) -> None:
    cfg = TrainConfig(epochs=30, optimizer="adam", lr=3e-3, scheduler="cosine", loss=loss)
    model, result, norm = run(data, cfg)
    store, items = data
    _, y_true, y_pred = predict(model, GraphLoader(store, items, batch_size=10), norm)
    assert mae(y_true, y_pred) < 0.6 * mae(y_true, np.full_like(y_true, y_true.mean()))
    if loss == "l1":  # the optimised loss is the one reported: L1 in volts is the train MAE
        for h in result.history:
            assert h["train_loss"] * norm.std == pytest.approx(h["train_mae"], rel=1e-4)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.6 * losses[0]


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown"):
        TrainConfig.from_dict({"epochs": 3, "lrr": 0.1})
    cfg = TrainConfig.from_dict({"epochs": 3, "milestones": [2]})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- normaliser
def test_normalizer_round_trip() -> None:
    norm = Normalizer.fit(np.array([1.0, 2.0, 3.0, 4.0]))
    assert norm.mean == pytest.approx(2.5) and norm.std == pytest.approx(np.std([1, 2, 3, 4]))
    y = torch.tensor([0.5, 3.5])
    torch.testing.assert_close(norm.denorm(norm.norm(y)), y)
    assert Normalizer.from_dict(norm.to_dict()) == norm
    assert Normalizer.fit([2.0, 2.0]).std == 1.0  # constant targets: no division by zero
    with pytest.raises(ValueError):
        Normalizer(0.0, 0.0)


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_known_values() -> None:
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(0)
    t, p = rng.normal(size=50), rng.normal(size=50)
    assert mae(t, p) == pytest.approx(mean_absolute_error(t, p))
    assert rmse(t, p) == pytest.approx(np.sqrt(mean_squared_error(t, p)))
    assert r2(t, p) == pytest.approx(r2_score(t, p))
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    assert m == pytest.approx({"mae": 1 / 3, "rmse": np.sqrt(1 / 3), "r2": 0.5, "n": 3})
    assert np.isnan(r2([1.0, 1.0], [1.0, 2.0]))
    with pytest.raises(ValueError):
        mae([1.0], [1.0, 2.0])
