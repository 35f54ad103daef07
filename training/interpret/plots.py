"""The interpretation figures (paper Fig. 3 panels) as static PNGs, from already computed numbers.

Each function takes plain arrays/dicts (the same numbers written to the stage's JSON), so a figure
can be redrawn from the JSON alone and the plotting code holds no analysis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.plots import _pyplot
from voltage_model.graphs.encoding import element_data


def _save(fig: Any, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def place_labels(
    ax: Any, xy: np.ndarray, labels: Sequence[str], order: Sequence[int], fontsize: float = 7.5,
    offset: float = 5.0,
) -> list[int]:  # fmt: skip
    """Label points beside their markers without overlap (no adjustText in the environment):
    in ``order`` (most important first), each label tries eight positions around its point and
    takes the first whose box overlaps no label already placed, no other marker and stays inside
    the axes; a label with no free position is left out. Returns the indices labelled."""
    import matplotlib.patheffects as pe

    fig = ax.figure
    fig.canvas.draw()  # fixes the layout, so display coordinates are final
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    points = ax.transData.transform(np.asarray(xy, float))
    radius = 4.0 * fig.dpi / 72.0  # a marker's half-width, in pixels
    moves = [(0, 1, "center", "bottom"), (1, 0, "left", "center"), (0, -1, "center", "top"),
             (-1, 0, "right", "center"), (1, 1, "left", "bottom"), (-1, 1, "right", "bottom"),
             (1, -1, "left", "top"), (-1, -1, "right", "top")]  # fmt: skip
    placed: list[Any] = []
    done: list[int] = []
    for i in order:
        for dx, dy, ha, va in moves:
            text = ax.annotate(
                labels[i], xy[i], xytext=(dx * offset, dy * offset), textcoords="offset points",
                ha=ha, va=va, fontsize=fontsize,
                path_effects=[pe.withStroke(linewidth=2.2, foreground="white")],
            )  # fmt: skip
            box = text.get_window_extent(renderer).expanded(1.04, 1.08)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                      and box.y1 <= frame.y1)  # fmt: skip
            hits_marker = any(
                box.x0 - radius < px < box.x1 + radius and box.y0 - radius < py < box.y1 + radius
                for k, (px, py) in enumerate(points) if k != i
            )  # fmt: skip
            if inside and not hits_marker and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                done.append(i)
                break
            text.remove()
    return done


def element_pca_plot(
    symbols: Sequence[str],
    coords: np.ndarray,
    groups: Sequence[int],
    explained: Sequence[float],
    path: Path,
    title: str,
) -> Path:
    """Elements in the first two PCs of their learned embedding, coloured by periodic-table group
    (0 = f-block) on a continuous colour scale. Symbols sit beside their markers, the elements
    farthest from the centre first (the spread-out ones the eye looks for); a symbol that would
    overlap another label or marker is left out, and the title says how many are shown."""
    plt = _pyplot()
    coords = np.asarray(coords, dtype=float)
    fig, ax = plt.subplots(figsize=(7.2, 6.0), dpi=120)
    cmap = plt.get_cmap("viridis")
    sc = ax.scatter(coords[:, 0], coords[:, 1], c=list(groups), cmap=cmap, vmin=0, vmax=18,
                    s=46, edgecolors="k", linewidths=0.4, zorder=2)  # fmt: skip
    cbar = fig.colorbar(sc, ax=ax, ticks=range(0, 19, 2))
    cbar.set_label("periodic-table group (0 = f-block)")
    ax.set_xlabel(f"PC1 of the element embedding ({100 * explained[0]:.0f}% of variance; a.u.)")
    ax.set_ylabel(f"PC2 of the element embedding ({100 * explained[1]:.0f}% of variance; a.u.)")
    if len(coords):
        span = coords.max(axis=0) - coords.min(axis=0)
        ax.set_xlim(coords[:, 0].min() - 0.08 * span[0] - 1e-9,
                    coords[:, 0].max() + 0.08 * span[0] + 1e-9)  # fmt: skip
        ax.set_ylim(coords[:, 1].min() - 0.08 * span[1] - 1e-9,
                    coords[:, 1].max() + 0.08 * span[1] + 1e-9)  # fmt: skip
        scaled = (coords - coords.mean(axis=0)) / np.where(span > 0, span, 1.0)
        order = np.argsort(-np.linalg.norm(scaled, axis=1), kind="stable")
    else:
        order = np.array([], dtype=int)

    def note(k: int) -> str:
        rest = " (the others would overlap)" if k < len(symbols) else ""
        return f"{title}\n{k} of {len(symbols)} elements labelled{rest}"

    head = ax.set_title(note(len(symbols)), fontsize=9)
    fig.tight_layout()  # the final layout (the title keeps its two lines), then the labels
    shown = place_labels(ax, coords, list(symbols), [int(i) for i in order])
    head.set_text(note(len(shown)))
    return _save(fig, path)


def table_position(z: int) -> tuple[int, float]:
    """(column 1..18, row) of element z in the usual periodic-table layout (f-block below)."""
    el = element_data()[z - 1]
    if el.group:  # main table
        return el.group, float(el.period)
    first = 57 if z < 89 else 89  # La.. / Ac..: group slot 0 in the encoding's layout
    return 3 + (z - first), el.period + 2.5


def periodic_heatmap(
    values: Mapping[str, Mapping[str, Any]], path: Path, title: str, few_structures: int = 3
) -> Path:
    """Median local voltage per element on a periodic table; grey = too few sites / absent.

    A value marked ``*`` comes from fewer than ``few_structures`` crystals: one crystal's sites
    are not independent observations, so such medians are anecdotes, not trends.
    """
    plt = _pyplot()
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(11, 6.2), dpi=110)
    meds = [float(v["median"]) for v in values.values()]
    norm = Normalize(vmin=min(meds, default=0.0), vmax=max(meds, default=1.0) + 1e-9)
    cmap = plt.get_cmap("viridis")
    for el in element_data():
        if el.z > 103 or (el.z > 86 and el.symbol not in values):  # keep the layout compact
            continue
        col, row = table_position(el.z)
        entry = values.get(el.symbol)
        face = cmap(norm(float(entry["median"]))) if entry else (0.92, 0.92, 0.92)
        ax.add_patch(Rectangle((col - 0.5, row - 0.5), 0.95, 0.95, facecolor=face, edgecolor="w"))
        dark = entry is not None and norm(float(entry["median"])) < 0.6
        color = "w" if dark else "k"
        ax.text(col - 0.05, row - 0.12, el.symbol, ha="center", va="center", fontsize=8,
                color=color)  # fmt: skip
        if entry:
            few = int(entry.get("n_structures", few_structures)) < few_structures
            label = f"{float(entry['median']):.2f}" + ("*" if few else "")
            ax.text(col - 0.05, row + 0.22, label, ha="center", va="center", fontsize=6,
                    color=color)  # fmt: skip
    ax.set_xlim(0.4, 18.6)
    ax.set_ylim(10.2, 0.4)
    ax.set_aspect("equal")
    ax.axis("off")
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.025, pad=0.01).set_label("median local voltage (V)")
    ax.set_title(f"{title}\n* = from fewer than {few_structures} structures", fontsize=10)
    return _save(fig, path)


def environments_plot(pca: np.ndarray, tsne: np.ndarray, values: np.ndarray, path: Path,
                      title: str) -> Path:  # fmt: skip
    """PCA and t-SNE maps of O-coordinated environments, coloured by local voltage."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6), dpi=110)
    lo, hi = np.quantile(values, [0.02, 0.98]) if len(values) else (0.0, 1.0)
    for ax, xy, name in ((axes[0], pca, "PCA"), (axes[1], tsne, "t-SNE")):
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=values, s=4, cmap="coolwarm", vmin=lo, vmax=hi,
                        edgecolors="none")  # fmt: skip
        ax.set_title(f"{name} of O-coordinated atom vectors", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        axis = "PC" if name == "PCA" else "t-SNE "
        ax.set_xlabel(f"{axis}1 (arbitrary units)")
        ax.set_ylabel(f"{axis}2 (arbitrary units)")
    fig.colorbar(sc, ax=axes, fraction=0.03).set_label("local voltage (V)")
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # no tight_layout: it fights the shared colour bar
    plt.close(fig)
    return path


def rf_importance_plot(top: Sequence[Sequence[Any]], by_property: Sequence[Sequence[Any]],
                       path: Path, title: str) -> Path:  # fmt: skip
    """Random-forest Gini importances: top features, and summed per elemental property."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    for ax, rows, name in ((axes[0], top, "feature"), (axes[1], by_property, "property")):
        labels = [str(r[0]).removeprefix("MagpieData ") for r in rows][::-1]
        vals = [float(r[1]) for r in rows][::-1]
        ax.barh(range(len(vals)), vals, color="tab:blue")
        ax.set_yticks(range(len(vals)), labels, fontsize=7)
        ax.set_xlabel("Gini importance (share of impurity decrease, sums to 1)")
        ax.set_ylabel("composition feature (Magpie statistic)" if name == "feature"
                      else "elemental property (its statistics summed)")  # fmt: skip
        ax.set_title(f"top {len(vals)} by {name}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
