"""HeadGPR's likelihood gradient is scikit-learn's, and so is what it fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from threadpoolctl import threadpool_info

from voltage_model.models.gp_fit import HeadGPR, parallel_fits


def _kernel(nu: float, d: int) -> object:
    return ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=math.sqrt(d), length_scale_bounds=(1e-1, 1e4), nu=nu
    ) + WhiteKernel(0.1, (1e-4, 1.0))


def _data(n: int = 80, d: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    return x, np.sin(x[:, 0]) + 0.5 * x[:, 1] ** 2 + 0.1 * rng.normal(size=n)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_likelihood_and_gradient_equal_scikit_learns(nu: float) -> None:
    x, y = _data()
    gp = HeadGPR(_kernel(nu, x.shape[1]), optimizer=None).fit(x, y)
    gp._distances = squareform(pdist(x))
    rng = np.random.default_rng(1)
    for _ in range(5):
        theta = np.log([rng.uniform(0.05, 20), rng.uniform(0.2, 50), rng.uniform(1e-3, 0.5)])
        fast, fast_grad = gp.log_marginal_likelihood(theta, eval_gradient=True)
        ref, ref_grad = GaussianProcessRegressor.log_marginal_likelihood(
            gp, theta, eval_gradient=True
        )
        assert fast == pytest.approx(ref, rel=1e-10)
        np.testing.assert_allclose(fast_grad, ref_grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("nu", [0.5, 2.5])
def test_the_fit_is_scikit_learns_fit(nu: float) -> None:
    x, y = _data(n=120, d=4, seed=3)
    fast = HeadGPR(_kernel(nu, 4), random_state=0).fit(x, y)
    ref = GaussianProcessRegressor(_kernel(nu, 4), random_state=0).fit(x, y)
    np.testing.assert_allclose(fast.kernel_.theta, ref.kernel_.theta, rtol=1e-5)
    assert fast.log_marginal_likelihood_value_ == pytest.approx(
        ref.log_marginal_likelihood_value_, rel=1e-9
    )
    xt = _data(n=30, d=4, seed=4)[0]
    for a, b in zip(fast.predict(xt, return_std=True), ref.predict(xt, return_std=True),
                    strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not hasattr(fast, "_distances")  # the n x n matrix is not kept


def test_other_kernels_take_scikit_learns_path() -> None:
    x, y = _data(n=40, d=3)
    kernel = ConstantKernel(1.0, "fixed") * Matern(length_scale=1.0, nu=0.5) + WhiteKernel(0.1)
    fast = HeadGPR(kernel, random_state=0).fit(x, y)
    ref = GaussianProcessRegressor(kernel, random_state=0).fit(x, y)
    np.testing.assert_array_equal(fast.kernel_.theta, ref.kernel_.theta)


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_parallel_fits_keep_order_and_blas_threads() -> None:
    before = _blas_threads()
    seen: list[list[int]] = []

    def fit(seed: int) -> float:
        seen.append(_blas_threads())
        x, y = _data(n=50, d=3, seed=seed)
        return float(HeadGPR(_kernel(0.5, 3), random_state=0).fit(x, y).kernel_.theta[1])

    seeds = [5, 6, 7, 8]
    assert parallel_fits(fit, seeds) == [fit(s) for s in seeds]
    assert all(t == [1] * len(t) for t in seen[: len(seeds)])  # one BLAS thread while fitting
    assert _blas_threads() == before  # restored afterwards
