"""Composition-baseline costs: permutation importances and the grouped-CV grid search.

Usage::

    python bench/baseline_search.py                 # Li-sized: 1780 rows x 146 columns
    python bench/baseline_search.py --rows 600 --trees 100

Two ratios against a baseline timed in the same run, on synthetic data shaped like an ion's
composition descriptors (the baselines stage's inputs; no snapshot needed):

* permutation importances of a fitted forest on the validation rows: scikit-learn's
  ``permutation_importance`` (one prediction per column and repeat) against
  ``training.baselines.models.rf_permutation_importances`` (stacked predictions; the figures are
  checked equal here, as in tests/training/test_plots.py);
* ``fit_tuned`` (SVR, KRR, forest grids by grouped 5-fold CV) with its folds side by side against
  the same search on one usable core (``usable_cores`` patched to 1), results checked equal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/baseline_search.py` without installing
    sys.path.insert(0, str(ROOT))

import voltage_model.models.gp_fit as gp_fit  # noqa: E402
from training.baselines.models import (  # noqa: E402
    BaselineConfig,
    PermutationSettings,
    RFParams,
    make_rf,
    rf_permutation_importances,
)
from training.baselines.tuning import TuningRows, fit_tuned  # noqa: E402


def data(rows: int, cols: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Descriptor-like rows (a few informative columns, correlated twins), targets in volts
    and host groups of 3 crystals."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(rows, cols // 6 + 1))
    X = np.repeat(base, 6, axis=1)[:, :cols] + 0.1 * rng.normal(size=(rows, cols))
    y = 3.0 + 0.5 * np.tanh(X[:, 0]) + 0.3 * X[:, 7] * X[:, 13] + 0.2 * rng.normal(size=rows)
    groups = np.array([f"h{i // 3}" for i in range(rows)])
    return X, y, groups


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_permutation(X: np.ndarray, y: np.ndarray, n_val: int, trees: int) -> None:
    from sklearn.inspection import permutation_importance

    fit, val = slice(n_val, None), slice(0, n_val)
    model = make_rf(RFParams(n_estimators=trees, seed=0, n_jobs=-1)).fit(X[fit], y[fit])
    model.named_steps["model"].set_params(n_jobs=1)  # as the stage scores them
    ref, t_ref = timed(lambda: permutation_importance(
        model, X[val], y[val], scoring="neg_mean_absolute_error", n_repeats=5, random_state=0))
    model.named_steps["model"].set_params(n_jobs=-1)
    names = [f"c{j}" for j in range(X.shape[1])]
    got, t_new = timed(lambda: rf_permutation_importances(
        model, X[val], y[val], names, PermutationSettings(seed=0, repeats=5)))
    expected = dict(zip(names, ref.importances_mean.tolist(), strict=True))
    same = all(expected[n] == m for n, m, _ in got)
    print(f"permutation importances ({trees} trees, {n_val} rows x {X.shape[1]} columns x 5): "
          f"scikit-learn {t_ref:.1f} s, stacked {t_new:.1f} s, ratio {t_ref / t_new:.1f}x, "
          f"equal: {same}")


def bench_search(X: np.ndarray, y: np.ndarray, groups: np.ndarray) -> None:
    cfg = BaselineConfig(rf=RFParams(n_jobs=-1))
    rows = TuningRows(X, y, groups)
    cores = gp_fit.usable_cores
    for name in ("svr", "krr", "rf"):
        side, t_side = timed(lambda name=name: fit_tuned(name, rows, cfg))
        gp_fit.usable_cores = lambda: 1
        try:
            one, t_one = timed(lambda name=name: fit_tuned(name, rows, cfg))
        finally:
            gp_fit.usable_cores = cores
        tol = 1e-9 if name == "rf" else 0.0  # threaded forests sum their trees in any order
        same = one.choice == side.choice and abs(one.cv_mae - side.cv_mae) <= tol
        print(f"{name} grouped-CV search ({len(side.search)} points x 5 folds): one core "
              f"{t_one:.1f} s, folds side by side {t_side:.1f} s, ratio {t_one / t_side:.2f}x, "
              f"same choice and CV MAE: {same}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1780)
    ap.add_argument("--cols", type=int, default=146)
    ap.add_argument("--val", type=int, default=202)
    ap.add_argument("--trees", type=int, default=300)
    args = ap.parse_args()
    from voltage_model.numerics import flush_subnormals

    flush_subnormals()
    X, y, groups = data(args.rows, args.cols)
    bench_permutation(X, y, args.val, args.trees)
    bench_search(X, y, groups)


if __name__ == "__main__":
    main()
