"""The run-derived figures of docs/interpretability.md, rendered from reports/interpret/<Ion>.json.

Why: the interpretability page used to quote per-ion Spearman correlations, local-voltage MAEs,
kNN R^2 and claim verdicts typed by hand; every pipeline rerun (new backbones, new heads) left
them stale, and one bullet contradicted its own table. Here every such number is read from the
``interpret`` stage's JSON reports (``training/stages/interpret.py::run_interpret``) and rendered
into the page's one generated block (the BEGIN ... END markers of ``training.docs_report``), so
the page can only disagree with its reports until ``voltage docs`` runs, and the docs test says so.

Reports are read defensively: a key an older or partial report lacks renders as "–" instead of
failing the whole docs stage, because one ion's incomplete report must not hide the other ions.
A report that is not valid JSON still raises: that is a broken pipeline output, not a gap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The working ions in the order the project's tables list them (params.yaml, protocol table).
ION_ORDER: tuple[str, ...] = ("Li", "Na", "K", "Mg", "Ca", "Zn", "Al")
# The element properties the stage correlates with the embedding (training/interpret/elements.py).
PROPERTIES: tuple[tuple[str, str], ...] = (
    ("covalent_radius", "covalent radius"),
    ("electronegativity", "electronegativity"),
    ("first_ionization_energy", "1st ionisation energy"),
    ("atomic_radius", "atomic radius"),
)
# Per-element medians are listed only for elements seen in this many structures: medians over a
# handful of structures are anecdotes, not trends.
MEDIAN_MIN_STRUCTURES = 20
THREE_D = range(21, 31)  # Sc..Zn: the redox-active 3d series the paper's Fig. 3 discusses
DASH = "–"
# Three decimals where the |rho| >= 0.5 rule decides: a rho of 0.498 must not read "0.50, not held".
RHO_RULE = "+.3f"
# The paper's claims as the stage scores them (``training.stages.interpret.claims``): key in the
# report's ``claims`` block, the claim, and the stage's fixed pass rule (a threshold, not a result).
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("covalent_radius_tracks_pc2", "Covalent radius tracks PC2 of the element embedding",
     "|rho| >= 0.5 and p < 0.01"),
    ("rf_covalent_radius_first", "The random forest ranks a covalent-radius feature first",
     "top composition feature is a covalent-radius statistic with a Gini share >= 10%"),
    ("local_voltage_mean_reproduces_voltage",
     "The mean of the local voltages reproduces the crystal voltage (Eq. 2)",
     "test MAE of the linear local-voltage head <= 1.25 x the full model's"),
    ("environments_cluster_by_local_voltage", "Oxygen environments cluster by local voltage",
     "t-SNE 10-nearest-neighbour R^2 >= 0.5"),
)  # fmt: skip


# =============================================================================== reading
def load_reports(reports: Path) -> dict[str, dict[str, Any]]:
    """``{ion: report}`` for every ``reports/interpret/<Ion>.json`` present, in table order.

    Ions outside ION_ORDER are appended alphabetically rather than dropped, so a newly added ion
    shows up in the docs instead of silently missing from them.
    """
    folder = reports / "interpret"
    found = {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}
    order = [i for i in ION_ORDER if i in found] + sorted(set(found) - set(ION_ORDER))
    return {ion: json.loads(found[ion].read_text()) for ion in order}


def _at(obj: Any, *path: str | int) -> Any:
    """``obj[path[0]][path[1]]...`` or None when any step is missing or of the wrong type."""
    for key in path:
        try:
            obj = obj[key]
        except (KeyError, IndexError, TypeError):
            return None
    return obj


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _f(x: Any, spec: str) -> str:
    """``format(x, spec)`` for a finite number, "–" for anything else (missing, None, NaN)."""
    return format(x, spec) if _is_num(x) else DASH


def _p(x: Any) -> str:
    """A p-value with two significant digits (0.14, 0.0053, 1.2e-14); an exact 0 is scipy's
    underflow, not a certainty, so it reads "≈ 0"."""
    return "≈ 0" if x == 0 and _is_num(x) else _f(x, ".2g")


def _rho_p(entry: Any, spec: str = "+.2f") -> str:
    """A Spearman entry ``{rho, p, n}`` as "+0.21 (p 0.14)"."""
    rho = _at(entry, "rho")
    return DASH if not _is_num(rho) else f"{format(rho, spec)} (p {_p(_at(entry, 'p'))})"


def _feature(name: Any) -> str:
    """A Magpie feature name without the "MagpieData " prefix every one of them carries."""
    return str(name).removeprefix("MagpieData ") if name is not None else DASH


def _share(x: Any) -> str:
    """A fraction as a percentage (Gini shares, explained variance): 0.2571 -> "25.7%"."""
    return _f(x * 100 if _is_num(x) else None, ".1f") + ("%" if _is_num(x) else "")


def _verdict(claim: Any) -> str:
    """The claim's verdict as the report records it: never recomputed here, so the page cannot
    disagree with the stage about what held."""
    held = _at(claim, "held")
    return DASH if not isinstance(held, bool) else ("held" if held else "not held")


def _strongest_pc2(rep: dict[str, Any]) -> str:
    """The property with the largest |rho| with PC2 (as the stage's claim picks it)."""
    pc2 = _at(rep, "element_embedding", "spearman", "PC2")
    if isinstance(pc2, dict):
        scored = [(abs(v["rho"]), k) for k, v in pc2.items() if _is_num(_at(v, "rho"))]
        if scored:
            return max(scored)[1]
    name = _at(rep, "claims", "covalent_radius_tracks_pc2", "strongest_pc2_property")
    return str(name) if name is not None else DASH


def _rf_top(rep: dict[str, Any]) -> tuple[Any, Any]:
    """(feature, Gini share) of the RF's first feature: ``rf_importance.top15[0]`` (the stage
    copies it from the baselines report), else the ``claims`` block's copy."""
    top = _at(rep, "rf_importance", "top15", 0)
    if isinstance(top, list | tuple) and len(top) == 2:
        return top[0], top[1]
    claim = _at(rep, "claims", "rf_covalent_radius_first")
    return _at(claim, "top_feature"), _at(claim, "share")


def _pairs(x: Any) -> list[tuple[Any, Any]]:
    """The ``[name, value]`` pairs of a ranked list (RF importances), malformed entries dropped."""
    if not isinstance(x, list):
        return []
    return [(a[0], a[1]) for a in x if isinstance(a, list | tuple) and len(a) == 2]


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# =============================================================================== sections
def summary_table(reps: dict[str, dict[str, Any]]) -> str:
    """One row per ion: the four findings of the paper's Fig. 3 side by side."""
    rows = []
    for ion, rep in reps.items():
        sp = _at(rep, "element_embedding", "spearman")
        feature, share = _rf_top(rep)
        cov_first = DASH if feature is None else ("yes" if "CovalentRadius" in str(feature)
                                                  else "no")  # fmt: skip
        test = _at(rep, "local_voltage", "head", "test")
        elements = _at(rep, "element_embedding", "elements")
        rows.append([
            ion,
            str(len(elements)) if isinstance(elements, list) else DASH,
            _rho_p(_at(sp, "PC1", "covalent_radius"), RHO_RULE),
            _rho_p(_at(sp, "PC2", "covalent_radius"), RHO_RULE),
            _strongest_pc2(rep).replace("_", " "),
            f"{cov_first} ({_feature(feature)}, {_share(share)})",
            f"{_f(_at(test, 'linear_head_vs_dft', 'mae'), '.3f')} vs "
            f"{_f(_at(test, 'model_vs_dft', 'mae'), '.3f')}",
            _f(_at(rep, "environments", "knn10_r2_local_voltage", "tsne"), ".2f"),
        ])  # fmt: skip
    return _table(
        ["ion", "elements", "cov. radius vs PC1: rho (p)", "cov. radius vs PC2: rho (p)",
         "strongest PC2 property", "RF top feature a covalent-radius one? (feature, share)",
         "test MAE (V): linear local-voltage head vs full model",
         "environments t-SNE 10-NN R^2"],
        rows,
    )  # fmt: skip


def _claim_number(key: str, claim: Any) -> str:
    """The measured number a claim rests on, as the ``claims`` block records it."""
    if key == "covalent_radius_tracks_pc2":
        return f"rho {_f(_at(claim, 'rho'), RHO_RULE)}, p {_p(_at(claim, 'p'))}"
    if key == "rf_covalent_radius_first":
        return f"{_feature(_at(claim, 'top_feature'))} {_share(_at(claim, 'share'))}"
    if key == "local_voltage_mean_reproduces_voltage":
        return (f"{_f(_at(claim, 'linear_head_test_mae'), '.3f')} vs "
                f"{_f(_at(claim, 'model_test_mae'), '.3f')} V")  # fmt: skip
    if key == "environments_cluster_by_local_voltage":
        return f"R^2 {_f(_at(claim, 'tsne_knn10_r2'), '.2f')}"
    return DASH


def claims_lines(reps: dict[str, dict[str, Any]]) -> str:
    """One bullet per paper claim: which ions it held for, then each ion's number and verdict."""
    lines = []
    for key, title, rule in CLAIMS:
        verdicts = {ion: _verdict(_at(rep, "claims", key)) for ion, rep in reps.items()}
        held = [i for i, v in verdicts.items() if v == "held"]
        failed = [i for i, v in verdicts.items() if v == "not held"]
        unknown = [i for i, v in verdicts.items() if v == DASH]
        summary = [f"held for {', '.join(held) or 'none'}"]
        if failed:
            summary.append(f"not for {', '.join(failed)}")
        if unknown:
            summary.append(f"no verdict for {', '.join(unknown)}")
        per_ion = "; ".join(
            f"{ion} {_claim_number(key, _at(rep, 'claims', key))} ({verdicts[ion]})"
            for ion, rep in reps.items()
        )
        lines.append(f"- **{title}** (rule: {rule}): {'; '.join(summary)}. {per_ion}.")
    return "\n".join(lines) + "\n"


def embedding_table(reps: dict[str, dict[str, Any]]) -> str:
    """Backbone 0's Spearman rho of every property with PC1 / PC2, with the PCs' variance."""
    rows = []
    for ion, rep in reps.items():
        emb = _at(rep, "element_embedding")
        var = _at(emb, "explained_variance_ratio")
        cells = [ion, f"{_share(_at(var, 0))} / {_share(_at(var, 1))}"]
        for prop, _ in PROPERTIES:
            cells.append(f"{_f(_at(emb, 'spearman', 'PC1', prop, 'rho'), '+.2f')} / "
                         f"{_f(_at(emb, 'spearman', 'PC2', prop, 'rho'), '+.2f')}")  # fmt: skip
        rows.append(cells)
    return _table(["ion", "variance PC1 / PC2"] + [f"{label} PC1 / PC2" for _, label in PROPERTIES],
                  rows)  # fmt: skip


def backbones_table(reps: dict[str, dict[str, Any]]) -> str:
    """Covalent radius vs PC1 / PC2 on every backbone of the ensemble: does it survive the seed?"""
    rows = []
    for ion, rep in reps.items():
        first = _at(rep, "element_embedding", "spearman")
        others = _at(rep, "element_embedding_other_backbones")
        every = [first] + (others if isinstance(others, list) else [])
        cells = [f"{i}: {_f(_at(sp, 'PC1', 'covalent_radius', 'rho'), '+.2f')} / "
                 f"{_f(_at(sp, 'PC2', 'covalent_radius', 'rho'), '+.2f')}"
                 for i, sp in enumerate(every)]  # fmt: skip
        rows.append([ion, _f(_at(rep, "model", "n_backbones"), "d"), "; ".join(cells)])
    return _table(["ion", "backbones", "cov. radius vs PC1 / PC2, per backbone"], rows)


def head_table(reps: dict[str, dict[str, Any]]) -> str:
    """The linear local-voltage head and the full model against DFT on every split, and the head
    against the model on test (how well the additive explanation matches what it explains)."""
    rows = []
    for ion, rep in reps.items():
        head = _at(rep, "local_voltage", "head")
        splits = ("train", "val", "test")
        rows.append([
            ion,
            "/".join(_f(_at(head, s, "model_vs_dft", "n"), "d") for s in splits),
            " / ".join(_f(_at(head, s, "linear_head_vs_dft", "mae"), ".3f") for s in splits),
            " / ".join(_f(_at(head, s, "model_vs_dft", "mae"), ".3f") for s in splits),
            f"{_f(_at(head, 'test', 'linear_head_vs_model', 'mae'), '.3f')}, "
            f"R^2 {_f(_at(head, 'test', 'linear_head_vs_model', 'r2'), '.2f')}",
        ])  # fmt: skip
    return _table(
        ["ion", "n train/val/test", "linear head vs DFT, MAE (V) train / val / test",
         "full model vs DFT, MAE (V) train / val / test", "head vs model on test: MAE (V), R^2"],
        rows,
    )  # fmt: skip


def sites_lines(reps: dict[str, dict[str, Any]]) -> str:
    """Per ion: O-coordinated sites, the per-element median local voltages (elements in at least
    MEDIAN_MIN_STRUCTURES structures, highest first) and the 3d metals in ascending order."""
    lines = []
    for ion, rep in reps.items():
        o = _at(rep, "local_voltage", "o_coordinated")
        by = _at(o, "by_element")
        by = by if isinstance(by, dict) else {}
        common = [(el, v) for el, v in by.items()
                  if _is_num(_at(v, "median")) and _is_num(_at(v, "n_structures"))
                  and v["n_structures"] >= MEDIAN_MIN_STRUCTURES]  # fmt: skip
        high_first = sorted(common, key=lambda ev: -ev[1]["median"])
        medians = ", ".join(f"{el} {v['median']:.2f}" for el, v in high_first) or DASH
        three_d = sorted(((el, v) for el, v in common if _at(v, "z") in THREE_D),
                         key=lambda ev: ev[1]["median"])  # fmt: skip
        order = " < ".join(f"{el} {v['median']:.2f}" for el, v in three_d) or DASH
        lines.append(
            f"- {ion}: {_f(_at(o, 'n_o_coordinated_sites'), ',d')} of "
            f"{_f(_at(o, 'n_sites'), ',d')} sites in {_f(_at(rep, 'n_structures'), ',d')} "
            f"structures are O-coordinated. Medians (V): {medians}. 3d metals, ascending: {order}."
        )
    return "\n".join(lines) + "\n"


def environments_table(reps: dict[str, dict[str, Any]]) -> str:
    """How well a site's neighbours in each map predict its local voltage, and PC1's rank
    correlation with it."""
    rows = []
    for ion, rep in reps.items():
        env = _at(rep, "environments")
        knn = _at(env, "knn10_r2_local_voltage")
        rows.append([
            ion, _f(_at(env, "n_points"), ",d"),
            " / ".join(_f(_at(knn, k), ".2f") for k in ("tsne", "pca", "full_vectors")),
            _rho_p(_at(env, "spearman_pc1_local_voltage")),
            _rho_p(_at(env, "spearman_pc2_local_voltage")),
        ])  # fmt: skip
    return _table(
        ["ion", "sites mapped", "10-NN R^2: t-SNE / PCA / 64-d vectors",
         "PC1 vs local voltage: rho (p)", "PC2 vs local voltage: rho (p)"],
        rows,
    )  # fmt: skip


def rf_table(reps: dict[str, dict[str, Any]]) -> str:
    """The RF's three most important features and properties (Gini share, summed per property)."""
    rows = []
    for ion, rep in reps.items():
        rf = _at(rep, "rf_importance")
        top, by = _pairs(_at(rf, "top15")), _pairs(_at(rf, "by_property"))
        cov = next((s for name, s in by if name == "CovalentRadius"), None)
        rows.append([
            ion,
            ", ".join(f"{_feature(n)} {_share(s)}" for n, s in top[:3]) or DASH,
            ", ".join(f"{n} {_share(s)}" for n, s in by[:3]) or DASH,
            _share(cov),
        ])  # fmt: skip
    return _table(["ion", "top features (Gini share)", "top properties (summed share)",
                   "covalent radius, summed"], rows)  # fmt: skip


def interpretability_block(reports: Path) -> str:
    """The generated block of docs/interpretability.md: every run-derived figure on that page.

    ``reports`` is the pipeline's reports folder (``reports/``); the per-ion reports are read
    from ``reports/interpret/<Ion>.json``. Splice the result between the page's markers with
    ``training.docs_report.splice``.
    """
    reps = load_reports(reports)
    if not reps:
        return "No interpretation reports yet (`reports/interpret/<Ion>.json`): run `dvc repro`.\n"
    return (
        "### Summary per ion\n\n"
        + summary_table(reps)
        + "\n### The paper's claims, as the stage scores them\n\n"
        + claims_lines(reps)
        + "\n### Element embeddings: Spearman rho with PC1 / PC2 (backbone 0)\n\n"
        + embedding_table(reps)
        + "\nCovalent radius on every backbone of the ensemble (backbone: PC1 / PC2):\n\n"
        + backbones_table(reps)
        + "\n### Local-voltage head\n\n"
        + head_table(reps)
        + f"\nO-coordinated sites and median local voltages (elements in >= "
        f"{MEDIAN_MIN_STRUCTURES} structures):\n\n"
        + sites_lines(reps)
        + "\n### Local environments\n\n"
        + environments_table(reps)
        + "\n### Random-forest importances (composition features)\n\n"
        + rf_table(reps)
    )
