"""scikit-learn's Gaussian-process regressor with a faster marginal-likelihood gradient for the
one kernel the GP heads use: ``constant * Matern(isotropic) + white noise``.

Why: every GP head, baseline GP and CV fold fits that kernel's three hyperparameters by L-BFGS
over the log marginal likelihood, and scikit-learn's generic gradient costs, per step, a fresh
``pdist`` of the (scaled) inputs, an ``(n, n, 3)`` gradient tensor built by ``dstack``, and
``K^-1`` from a Cholesky solve against the identity. Profiled on a pooled Mg head (900 rows,
250 columns): those three were 62% of a 3.5 s fit, and GP fits were most of the ``cv`` stage.
Here the distances are computed once per fit (an isotropic length scale only divides them), the
gradient is three traces over ``alpha alpha^T - K^-1`` without the tensor, and ``K^-1`` comes
from LAPACK's ``potri`` on the factor already computed. The objective and its gradient are the
same functions of the hyperparameters as scikit-learn's (equal to rounding,
``tests/voltage_model/test_gp_fit.py``), so the optimiser, its start, bounds and restarts, and the
fitted posterior (``L_``, ``alpha_``, computed by scikit-learn after the search) are
scikit-learn's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from scipy.linalg import cho_solve, cholesky, lapack
from scipy.spatial.distance import pdist, squareform
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, Product, Sum, WhiteKernel
from threadpoolctl import threadpool_limits

from voltage_model.numerics import usable_cores

T = TypeVar("T")
R = TypeVar("R")


def parallel_fits(fit: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fit(i) for i in items]``, one item per core at a time, each on one BLAS thread.

    Why: GP fits of a few hundred to ~1600 rows are too small for two BLAS threads to share one
    factorisation (on 2 cores, a 900-row fit took 2.9 s with OpenBLAS' two threads and 1.4 s
    with one: the threads mostly wait on each other), while independent fits (candidate weights,
    ensemble members) share out perfectly: LAPACK and numpy release the GIL. Results are in
    ``items``' order and equal to a sequential run's (each fit is single-threaded either way).
    """
    todo = list(items)
    workers = min(usable_cores(), len(todo))
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            return [fit(i) for i in todo]
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(fit, todo))


def _matern_and_gradient(r: np.ndarray, nu: float) -> tuple[np.ndarray, np.ndarray]:
    """Matern correlation at scaled distances ``r`` and its derivative in log length scale."""
    if nu == 0.5:
        m = np.exp(-r)
        return m, m * r
    s = math.sqrt(3.0 if nu == 1.5 else 5.0) * r
    e = np.exp(-s)
    if nu == 1.5:
        return (1.0 + s) * e, s * s * e
    return (1.0 + s + s * s / 3.0) * e, s * s * (1.0 + s) * e / 3.0


def _matern_nu(kernel: Any) -> float | None:
    """The Matern nu when ``kernel`` is the heads' form (constant * isotropic Matern of a
    closed-form nu + white) with every hyperparameter free; None otherwise (scikit-learn's
    path)."""
    if not (isinstance(kernel, Sum) and isinstance(kernel.k1, Product)):
        return None
    c, m, w = kernel.k1.k1, kernel.k1.k2, kernel.k2
    ok = (isinstance(c, ConstantKernel) and isinstance(m, Matern) and isinstance(w, WhiteKernel)
          and np.ndim(m.length_scale) == 0 and m.nu in (0.5, 1.5, 2.5)
          and not any(h.fixed for h in kernel.hyperparameters))  # fmt: skip
    return float(m.nu) if ok else None


class HeadGPR(GaussianProcessRegressor):
    """``GaussianProcessRegressor`` whose gradient steps reuse the training inputs' distances.

    Only the optimiser's calls (``theta`` given, gradient wanted) take the fast path; everything
    else, and any other kernel, is scikit-learn's code.
    """

    def fit(self, X: Any, y: Any) -> HeadGPR:
        """scikit-learn's fit, on one BLAS thread (see ``parallel_fits``)."""
        self._distances = squareform(pdist(np.asarray(X, dtype=np.float64)))
        try:
            with threadpool_limits(limits=1, user_api="blas"):
                return super().fit(X, y)
        finally:
            del self._distances  # n x n floats: not kept with the fitted model

    def log_marginal_likelihood(
        self, theta: Any = None, eval_gradient: bool = False, clone_kernel: bool = True
    ) -> Any:
        nu = _matern_nu(self.kernel_) if theta is not None and eval_gradient else None
        dist = getattr(self, "_distances", None)
        y = np.asarray(self.y_train_)
        if nu is None or dist is None or y.ndim != 1 or dist.shape[0] != y.shape[0]:
            return super().log_marginal_likelihood(theta, eval_gradient, clone_kernel)
        if not clone_kernel:
            self.kernel_.theta = theta
        return _lml_and_gradient(dist, y, np.exp(theta), nu, self.alpha)


def _lml_and_gradient(
    dist: np.ndarray, y: np.ndarray, hyper: np.ndarray, nu: float, jitter: Any
) -> tuple[float, np.ndarray]:
    """Log marginal likelihood and its gradient in (log constant, log length scale, log noise):
    0.5 * trace((alpha alpha^T - K^-1) dK), as in Rasmussen & Williams eq. 5.9."""
    const, length, noise = (float(v) for v in hyper)
    m, dm = _matern_and_gradient(dist / length, nu)
    k = const * m
    k[np.diag_indices_from(k)] += noise + jitter
    try:
        low = cholesky(k, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return -np.inf, np.zeros(3)
    alpha = cho_solve((low, True), y, check_finite=False)
    lml = (-0.5 * float(y @ alpha) - float(np.log(np.diag(low)).sum())
           - y.shape[0] / 2 * math.log(2 * math.pi))  # fmt: skip
    k_inv, info = lapack.dpotri(low, lower=1)
    if info != 0:
        return -np.inf, np.zeros(3)
    k_inv = np.tril(k_inv) + np.tril(k_inv, -1).T

    def trace_term(dk: np.ndarray) -> float:
        return 0.5 * (float(alpha @ dk @ alpha) - float(np.vdot(k_inv, dk)))

    grad = np.array([
        const * trace_term(m),
        const * trace_term(dm),
        0.5 * noise * (float(alpha @ alpha) - float(np.trace(k_inv))),
    ])  # fmt: skip
    return lml, grad
