"""Static PNG plots (DVC's HTML plots need a CDN these machines cannot reach)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless; chosen at call time: importing this module has no effect
    import matplotlib.pyplot as plt

    return plt


def _panel(ax, y_true: np.ndarray, y_pred: np.ndarray, title: str) -> None:
    lo = float(min(y_true.min(), y_pred.min(), 0.0)) - 0.2
    hi = float(max(y_true.max(), y_pred.max())) + 0.2
    mae = float(np.mean(np.abs(y_true - y_pred)))
    ax.scatter(y_true, y_pred, s=9, alpha=0.6, edgecolors="none")
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("DFT voltage (V)")
    ax.set_ylabel("predicted voltage (V)")
    ax.set_title(f"{title}\nMAE {mae:.3f} V, n={len(y_true)}", fontsize=9)


def parity_plot(y_true, y_pred, path: Path, title: str) -> Path:
    """Predicted vs target on one split, like the paper's Fig. 2a."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    _panel(ax, np.asarray(y_true, float), np.asarray(y_pred, float), title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def parity_grid(panels: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One parity panel per ion (the paper's Fig. 2 grid)."""
    plt = _pyplot()
    n = len(panels)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), dpi=110, squeeze=False)
    for ax, (name, (t, p)) in zip(axes.flat, panels.items(), strict=False):
        _panel(ax, np.asarray(t, float), np.asarray(p, float), name)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
