"""Static PNG plots (DVC's HTML plots need a CDN these machines cannot reach)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ served model, with uncertainty
# The figures of the ``plots`` stage (training/stages/plots.py), drawn from numbers it computes:
# no analysis here, so every annotated figure is also in its JSON.
def panel_note(stats: Mapping[str, float]) -> str:
    """The annotation of one parity panel: n, MAE (V) and the 90% interval's coverage."""
    lines = [f"n = {int(stats['n'])}", f"MAE = {float(stats['mae']):.3f} V"]
    if stats.get("coverage_90") is not None:
        lines.append(f"90% interval holds {100 * float(stats['coverage_90']):.0f}%")
    return "\n".join(lines)


def _limits(*arrays: np.ndarray, pad: float = 0.3) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, float).ravel() for a in arrays])
    return float(values.min()) - pad, float(values.max()) + pad


def _panel_grid(n: int, cols: int, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure of ``n`` panels, ``cols`` per row, each ``size`` inches (room for a title)."""
    plt = _pyplot()
    cols = max(1, min(cols, n))
    rows = int(np.ceil(n / cols))
    return plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows + 0.6), dpi=110,
                        squeeze=False, layout="constrained")  # fmt: skip


def _save_grid(fig: Any, axes: Any, n: int, path: Path, title: str) -> Path:
    """Blank the unused panels, title, write and close the figure of ``_panel_grid``."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def parity_uncertainty_grid(
    panels: Mapping[str, Mapping[str, Any]], path: Path, title: str, cols: int = 4
) -> Path:
    """One panel per ion: predicted voltage +- 1 calibrated std against the DFT voltage.

    ``panels``: name -> {"y", "mean", "std" (arrays, V), "stats" (``panel_note``'s numbers)}.
    """
    fig, axes = _panel_grid(len(panels), cols, (3.5, 3.6))
    for ax, (name, p) in zip(axes.flat, panels.items(), strict=False):
        y, mean, std = (np.asarray(p[k], float) for k in ("y", "mean", "std"))
        lo, hi = _limits(y, mean)
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", zorder=1)
        ax.errorbar(y, mean, yerr=std, fmt="o", ms=2.8, lw=0.6, alpha=0.55, color="tab:blue",
                    ecolor="tab:blue", elinewidth=0.6, zorder=2)  # fmt: skip
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("DFT voltage (V)")
        ax.set_ylabel("predicted voltage (V)")
        ax.text(
            0.03,
            0.97,
            panel_note(p["stats"]),
            transform=ax.transAxes,
            va="top",
            ha="left",
            fontsize=7.5,
            bbox={"boxstyle": "round", "fc": "white", "ec": "0.8", "alpha": 0.9},
        )
    return _save_grid(fig, axes, len(panels), path,
                      f"{title}\nbars: +-1 calibrated std as served; dashed: predicted = DFT")


def reliability_grid(
    panels: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str, cols: int = 4
) -> Path:
    """Reliability diagrams, one panel per ion: observed against nominal coverage of central
    Gaussian intervals, in %, one curve per prediction set, with the diagonal.

    ``panels``: name -> curves {"label", "n", "nominal", "observed" (fractions), and optionally
    "band": (low, high) per nominal level, drawn shaded: where a calibrated curve of that n
    falls (+-2 binomial standard errors)}.
    """
    fig, axes = _panel_grid(len(panels), cols, (3.4, 3.5))
    colors = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    for ax, (name, curves) in zip(axes.flat, panels.items(), strict=False):
        ax.plot([0, 100], [0, 100], color="0.4", lw=0.8, ls="--", label="calibrated")
        for curve, color in zip(curves, colors, strict=False):
            nominal = 100 * np.asarray(curve["nominal"], float)
            if curve.get("band") is not None:
                low, high = (100 * np.asarray(b, float) for b in curve["band"])
                ax.fill_between(nominal, low, high, color=color, alpha=0.12, lw=0)
            ax.plot(nominal, 100 * np.asarray(curve["observed"], float), marker="o", ms=3,
                    color=color, label=f"{curve['label']} (n={int(curve['n'])})")  # fmt: skip
        ax.set(xlim=(0, 100), ylim=(0, 100), title=name,
               xlabel="nominal coverage of central interval (%)",
               ylabel="observed coverage (%)")  # fmt: skip
        ax.set_aspect("equal")
        ax.legend(fontsize=6.5, loc="upper left")
    note = "shaded: +-2 binomial SE of a calibrated curve on that many crystals"
    return _save_grid(fig, axes, len(panels), path, f"{title}\n{note}")


def importance_plot(
    gini: Sequence[Sequence[Any]], permutation: Sequence[Sequence[Any]] | None, path: Path,
    title: str, missing: str = "",
) -> Path:  # fmt: skip
    """The random forest's Gini importances (training fit) beside its permutation importances
    (increase of the validation MAE when one column is shuffled; error bars: std over the
    shuffles). A feature in both top lists is drawn dark in both panels. ``missing``: the
    text shown instead of the permutation panel when there are none."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.0), dpi=110)

    def label(name: Any) -> str:
        return str(name).removeprefix("MagpieData ")

    in_gini = {str(r[0]) for r in gini}
    in_perm = {str(r[0]) for r in permutation or ()}
    both = in_gini & in_perm if permutation else in_gini
    colors = [("tab:blue" if str(r[0]) in both else "lightsteelblue") for r in gini][::-1]
    axes[0].barh(range(len(gini)), [float(r[1]) for r in gini][::-1], color=colors)
    axes[0].set_yticks(range(len(gini)), [label(r[0]) for r in gini][::-1], fontsize=7)
    axes[0].set_xlabel("Gini importance (share of impurity decrease, sums to 1)")
    axes[0].set_ylabel("composition feature (Magpie statistic)")
    axes[0].set_title(f"Gini, training fit: top {len(gini)}"
                      + ("\n(dark: also in the permutation top list)" if permutation else ""),
                      fontsize=9)  # fmt: skip
    ax = axes[1]
    if permutation:
        rows = list(permutation)[::-1]
        colors = [("tab:orange" if str(r[0]) in both else "navajowhite") for r in rows]
        ax.barh(range(len(rows)), [float(r[1]) for r in rows], color=colors,
                xerr=[float(r[2]) if len(r) > 2 else 0.0 for r in rows], ecolor="0.3",
                error_kw={"lw": 0.8})  # fmt: skip
        ax.set_yticks(range(len(rows)), [label(r[0]) for r in rows], fontsize=7)
        ax.axvline(0, color="0.5", lw=0.6)
        ax.set_xlabel("permutation importance: increase in validation MAE (V)")
        ax.set_ylabel("composition feature (Magpie statistic)")
        ax.set_title(f"permutation, validation split: top {len(rows)}\n"
                     "(dark: also in the Gini top list)", fontsize=9)  # fmt: skip
    else:
        ax.axis("off")
        ax.text(0.5, 0.5, missing or "no permutation importances", ha="center", va="center",
                fontsize=9, wrap=True, transform=ax.transAxes)  # fmt: skip
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
