"""The Gaussian-process transfer head: same posterior as scikit-learn, safe checkpoints, and an
uncertainty that grows away from the training data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

from voltage_model.artifact import (
    CheckpointError,
    ensemble_volts,
    load_checkpoint,
    save_checkpoint,
)
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig
from voltage_model.models.gp_head import GPConfig, GPHead, fit_gp_head
from voltage_model.normalizer import Normalizer


def _data(n: int = 60, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] + 0.05 * rng.normal(size=n)
    return torch.tensor(x, dtype=torch.float32), y


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_posterior_matches_sklearn(nu):
    x, y = _data()
    head = fit_gp_head(x, y, GPConfig(nu=nu))
    c, length, noise, _ = head.kernel.tolist()
    kernel = ConstantKernel(c, "fixed") * Matern(length, "fixed", nu=nu) + WhiteKernel(
        noise, "fixed"
    )
    z = (x.double().numpy() - head.x_mean.numpy()) / head.x_scale.numpy()
    ref = GaussianProcessRegressor(kernel, optimizer=None).fit(z, y)
    x_new, _ = _data(n=25, seed=1)
    mean, std = ref.predict((x_new.double().numpy() - head.x_mean.numpy()) / head.x_scale.numpy(),
                            return_std=True)  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(head(x_new.double()).numpy(), mean, atol=1e-6)
        np.testing.assert_allclose(head.variance(x_new.double()).sqrt().numpy(), std, atol=1e-6)


def test_learns_and_is_less_sure_far_from_data():
    x, y = _data(n=120)
    head = fit_gp_head(x[:100], y[:100], GPConfig())
    with torch.no_grad():
        pred = head(x[100:]).double().numpy()
        near = head.variance(x[:100]).mean()
        far = head.variance(x[:20] + 8.0).mean()
    assert np.mean(np.abs(pred - y[100:])) < 0.6 * np.mean(np.abs(y[100:] - y[:100].mean()))
    assert far > 3 * near


def test_checkpoint_round_trip_with_gp_heads(tmp_path):
    torch.manual_seed(0)
    cfg = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1)
    model = CGCNN(cfg).eval()
    x, y = _data(n=40, d=8)
    heads = [fit_gp_head(x, y, GPConfig()), fit_gp_head(x[:30], y[:30], GPConfig(nu=1.5))]
    norm = Normalizer(mean=2.0, std=0.5)
    path = save_checkpoint(tmp_path / "gp.pt", model, cfg, {"radius": 8.0}, norm, heads=heads)
    loaded = load_checkpoint(path)
    back = loaded.backbones()[0][1]
    assert all(isinstance(h, GPHead) for h in back)
    pooled = x[:5]
    with torch.no_grad():
        for a, b in zip(heads, back, strict=True):
            assert torch.equal(a(pooled), b(pooled))
        means = [h(pooled) for h in back]
        mean, std = ensemble_volts(norm, means, [h.variance(pooled) for h in back])
    spread = torch.stack(means).var(dim=0, unbiased=False)
    own = torch.stack([h.variance(pooled) for h in back]).mean(dim=0)
    assert torch.allclose(std, (spread + own).sqrt() * 0.5)
    assert torch.allclose(mean, torch.stack(means).mean(dim=0) * 0.5 + 2.0)


def test_corrupt_gp_state_is_refused(tmp_path):
    cfg = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1)
    x, y = _data(n=20, d=8)
    state = fit_gp_head(x, y, GPConfig()).state_dict()
    state["alpha"] = state["alpha"][:-1]  # inconsistent with x_train
    path = save_checkpoint(tmp_path / "bad.pt", CGCNN(cfg), cfg, {}, Normalizer(0.0, 1.0),
                           heads=[state])  # fmt: skip
    with pytest.raises(CheckpointError, match="alpha"):
        load_checkpoint(path)


def test_gp_config_rejects_unsupported_smoothness():
    with pytest.raises(ValueError, match="nu"):
        GPConfig(nu=1.0)
    with pytest.raises(ValueError, match="select"):
        GPConfig(select="test")
    cands = GPConfig(descriptor_weights=[0, 2], select="validation").candidates()
    assert [c.descriptor_weights for c in cands] == [(0.0,), (2.0,)]


# ------------------------------------------------------------- composition descriptors
def _with_descriptors(n: int = 80, seed: int = 0) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Pooled vectors that carry no signal, descriptors that do (with a missing value and a
    constant column, as matminer rows have)."""
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.normal(size=(n, 5)), dtype=torch.float32)
    d = rng.normal(size=(n, 4))
    y = np.sin(1.5 * d[:, 0]) + 0.7 * d[:, 1] + 0.05 * rng.normal(size=n)
    d = np.concatenate([d, np.full((n, 1), 3.0)], axis=1)
    d[0, 2] = np.nan
    return x, d, y


def test_marginal_likelihood_picks_descriptors_when_they_carry_the_signal():
    x, d, y = _with_descriptors(n=120)
    cfg = GPConfig(descriptor_weights=(0.0, 0.5, 1.0, 2.0))
    with_desc = fit_gp_head(x[:100], y[:100], cfg, d[:100])
    plain = fit_gp_head(x[:100], y[:100], cfg)  # no descriptors given: pooled vector only
    assert float(with_desc.desc_weight) > 0 and with_desc.n_descriptors == 4  # constant dropped
    assert plain.n_descriptors == 0
    test_d = torch.from_numpy(d[100:])
    with torch.no_grad():
        err = np.abs(with_desc(x[100:], test_d).double().numpy() - y[100:]).mean()
        err_plain = np.abs(plain(x[100:]).double().numpy() - y[100:]).mean()
    assert err < 0.5 * err_plain


def test_descriptor_head_matches_sklearn_on_its_input_and_fills_missing_values():
    x, d, y = _with_descriptors()
    head = fit_gp_head(x, y, GPConfig(descriptor_weights=(1.0,)), d)
    c, length, noise, nu = head.kernel.tolist()
    kernel = ConstantKernel(c, "fixed") * Matern(length, "fixed", nu=nu) + WhiteKernel(
        noise, "fixed"
    )
    d_new = d[:10].copy()
    d_new[3, 0] = np.nan  # filled with the training median of that column (row 0 has one too)
    filled = np.where(np.isnan(d_new), np.nanmedian(d, axis=0), d_new)
    manual = np.concatenate([x[:10].double().numpy(), filled[:, :4]], axis=1)  # constant dropped
    ref = GaussianProcessRegressor(kernel, optimizer=None).fit(head.x_train.numpy(), y)
    mean, std = ref.predict((manual - head.x_mean.numpy()) / head.x_scale.numpy(), return_std=True)
    with torch.no_grad():
        got = head(x[:10], torch.from_numpy(d_new)).numpy()
        got_std = head.variance(x[:10], torch.from_numpy(d_new)).sqrt().numpy()
    np.testing.assert_allclose(got, mean, atol=1e-6)
    np.testing.assert_allclose(got_std, std, atol=1e-6)


def test_descriptor_head_refuses_to_guess_missing_descriptors():
    x, d, y = _with_descriptors(n=30)
    head = fit_gp_head(x, y, GPConfig(descriptor_weights=(1.0,)), d)
    with pytest.raises(ValueError, match="descriptors"):
        head(x[:2])
    with pytest.raises(ValueError, match="do not fit"):
        head(x[:2], torch.from_numpy(d[:2, :2]))


def test_descriptor_heads_round_trip_and_check_the_featuriser_version(tmp_path):
    torch.manual_seed(0)
    cfg = CGCNNConfig(atom_fea_len=5, h_fea_len=8, n_conv=1)
    x, d, y = _with_descriptors(n=40)
    head = fit_gp_head(x, y, GPConfig(descriptor_weights=(1.0,)), d)
    norm = Normalizer(mean=1.0, std=0.5)
    path = save_checkpoint(tmp_path / "d.pt", CGCNN(cfg), cfg, {}, norm, heads=[head])
    loaded = load_checkpoint(path)
    assert loaded.needs_descriptors and loaded.extra["descriptor_version"]
    back = loaded.backbones()[0][1][0]
    dt = torch.from_numpy(d[:7])
    with torch.no_grad():
        assert torch.equal(back(x[:7], dt), head(x[:7], dt))
        assert float(back.desc_weight) == 1.0
    payload = torch.load(path, weights_only=True)
    payload["extra"]["descriptor_version"] = "someone-else/v9"
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="descriptors"):
        load_checkpoint(tmp_path / "other.pt")


def _two_ions(n_own: int, n_other: int, seed: int = 0):
    """One smooth voltage-like function of the inputs seen by two ions on different scales: the
    scarce ion (column 0) and a partner, each normalised by its own statistics as the caller
    does before pooling."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_own + n_other, 4))
    f = np.sin(1.5 * x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    y = np.where(np.arange(len(x)) < n_own, 1.0 + 0.6 * f, 3.0 + 1.2 * f)
    y = y + 0.02 * rng.normal(size=len(x))
    own = np.arange(len(x)) < n_own
    z = np.empty_like(y)
    for mask in (own, ~own):
        z[mask] = (y[mask] - y[mask].mean()) / y[mask].std()
    tasks = np.stack([own, ~own], axis=1).astype(float)
    return torch.tensor(x, dtype=torch.float32), y, z, tasks, own


def test_pooled_head_serves_its_own_ion_like_sklearn():
    """A head fitted on two ions' rows answers every query as a crystal of its own ion: the
    scaled one-hot row it stores is appended after standardisation, as in training."""
    x, _, z, tasks, _ = _two_ions(30, 60)
    head = fit_gp_head(x, z, GPConfig(task_weights=(1.0, 2.0)), tasks=tasks)
    assert head.n_tasks == 2 and float(head.task[1]) == 0.0
    u = float(head.task[0])
    assert u in (1.0, 2.0)
    c, length, noise, _ = head.kernel.tolist()
    kernel = ConstantKernel(c, "fixed") * Matern(length, "fixed", nu=0.5) + WhiteKernel(
        noise, "fixed"
    )
    std_x = (x.double().numpy() - head.x_mean.numpy()) / head.x_scale.numpy()
    ref = GaussianProcessRegressor(kernel, optimizer=None).fit(
        np.concatenate([std_x, u * tasks], axis=1), z
    )
    x_new = torch.randn(12, 4, dtype=torch.float64)
    z_new = (x_new.numpy() - head.x_mean.numpy()) / head.x_scale.numpy()
    mean, std = ref.predict(np.concatenate([z_new, np.tile([u, 0.0], (12, 1))], axis=1),
                            return_std=True)  # fmt: skip
    with torch.no_grad():
        np.testing.assert_allclose(head(x_new).numpy(), mean, atol=1e-6)
        np.testing.assert_allclose(head.variance(x_new).sqrt().numpy(), std, atol=1e-6)
        again = GPHead.from_state(head.state_dict())
        assert again.n_tasks == 2
        np.testing.assert_allclose(again(x_new).numpy(), mean, atol=1e-6)


def test_pooling_a_partner_ion_helps_a_scarce_one():
    """15 crystals of an ion and 200 of a partner whose voltages follow the same chemistry on
    another scale: the pooled head predicts new crystals of the scarce ion better than a head
    fitted on its 15 alone."""
    x, y, z, tasks, own = _two_ions(15 + 100, 200, seed=3)
    fit_rows = np.flatnonzero(own)[:15]
    new = np.flatnonzero(own)[15:]
    partner = np.flatnonzero(~own)
    mu, sd = y[fit_rows].mean(), y[fit_rows].std()
    alone = fit_gp_head(x[fit_rows], (y[fit_rows] - mu) / sd, GPConfig())
    rows = np.concatenate([fit_rows, partner])
    pooled = fit_gp_head(x[rows], np.concatenate([(y[fit_rows] - mu) / sd, z[partner]]),
                         GPConfig(), tasks=tasks[rows])  # fmt: skip
    with torch.no_grad():
        mae_alone = np.mean(np.abs(alone(x[new]).double().numpy() * sd + mu - y[new]))
        mae_pooled = np.mean(np.abs(pooled(x[new]).double().numpy() * sd + mu - y[new]))
    assert mae_pooled < 0.7 * mae_alone, (mae_pooled, mae_alone)


def test_pooled_head_state_must_fit_its_ion_row():
    x, _, z, tasks, _ = _two_ions(20, 20)
    state = fit_gp_head(x, z, GPConfig(), tasks=tasks).state_dict()
    state["task"] = torch.ones(3, dtype=torch.float64)  # a third ion column nobody trained on
    with pytest.raises(ValueError, match="x_mean"):
        GPHead.from_state(state)
    with pytest.raises(ValueError, match="task_weights"):
        GPConfig(task_weights=(0.0,))
