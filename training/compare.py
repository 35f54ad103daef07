"""The comparison across ions: the paper's table (methods x ions, mean +- std over seeds) and its
Fig. 2-style grid of parity plots, as DVC metrics/plots and MLflow artifacts.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from training.baselines.models import base_name
from training.plots import parity_grid

# Zhang et al. (2022), validation-selected and -reported (so optimistic), transfer learning.
PAPER_TL_MAE = {"Zn": 0.479, "Mg": 0.451, "Ca": 0.403, "Na": 0.508, "Al": 0.680, "K": 0.656}
BASELINES = ("svr", "krr", "rf", "gp_comp", "krr_pooled", "rf_pooled", "gp_comp_pooled")
# ``*_per_seed``: one source-ensemble member (one Li training seed) at a time, mean +- std over
# the members; the rows without it are the ensembles served (one figure, std 0).
METHOD_ORDER = [
    "mean", "svr", "krr", "rf", "gp_comp", "krr_pooled", "rf_pooled", "gp_comp_pooled",
    "source_unchanged", "source_unchanged_per_seed", "source_offset",
    "source_offset_per_seed", "cgcnn_scratch", "cgcnn", "cgcnn_per_seed", "transfer",
    "transfer_per_seed", "transfer_gp_bn_adapt", "transfer_gp_bn_frozen",
    "transfer_gp_alone_bn_adapt", "transfer_gp_alone_bn_frozen", "transfer_fc_bn_adapt",
    "transfer_fc_bn_frozen", "chgnet_gp", "chgnet_gp_alone", "chgnet_gp_pooled", "served",
]  # fmt: skip


def _head_label(report: dict) -> str:
    """``gp (+composition x w1/w2/w3; pooled with Mg/Ca), adapt``: the served head kind, the
    descriptor weights its marginal likelihood chose per backbone (when any is non-zero), the
    ions whose training crystals it pooled (or that the pooling CV declined), and the BatchNorm
    mode."""
    if "head" not in report:
        return ""
    weights = report.get("descriptor_weights") or []
    notes = []
    if any(w > 0 for w in weights):
        notes.append("+composition x " + "/".join(f"{w:g}" for w in weights))
    if report.get("pool_ions"):
        notes.append("pooled with " + "/".join(report["pool_ions"]))
    elif (report.get("pool_selection") or {}).get("partners"):
        notes.append("own crystals: pooling lost in train+val CV")
    extra = f" ({'; '.join(notes)})" if notes else ""
    return f"{report['head']}{extra}, {report['bn_mode']}"


def _read_csv(path: Path) -> dict[str, dict[str, str]]:
    """A predictions CSV keyed by battery id (empty when the file is missing)."""
    if not Path(path).is_file():
        return {}
    return {r["battery_id"]: r for r in csv.DictReader(Path(path).read_text().splitlines())}


def _served_column(rows: dict[str, dict[str, str]]) -> str:
    """The served model's column: ``served`` (the variant the ion serves: CGCNN, CHGNet head or
    their average); in reports without it, ``transfer`` for a transferred ion, ``cgcnn`` for the
    source."""
    first = next(iter(rows.values()))
    return next(c for c in ("served", "transfer", "cgcnn") if c in first)


def paired_vs_baselines(model_csv: Path, baselines_csv: Path) -> dict[str, dict[str, float]]:
    """The served model against each conventional baseline on the same test crystals: mean and
    standard error of |error(model)| - |error(baseline)| per crystal (negative: model better).

    Why: with 11-42 test crystals per ion, a difference of two MAEs alone cannot say whether it
    is more than noise; the paired standard error can (the crystals' difficulty cancels). A
    seeded baseline's error per crystal is its mean over its seed columns (``rf``, ``rf@1``)."""
    return _paired(_read_csv(model_csv), _read_csv(baselines_csv))


def _paired(
    model: dict[str, dict[str, str]], base: dict[str, dict[str, str]]
) -> dict[str, dict[str, float]]:
    ids = [i for i in model if i in base]
    if not ids:
        return {}
    col = _served_column(model)
    y = np.array([float(model[i]["target"]) for i in ids])
    err = np.abs(np.array([float(model[i][col]) for i in ids]) - y)
    out = {}
    for name in BASELINES:
        cols = [c for c in base[ids[0]] if base_name(c) == name]
        if not cols:
            continue
        base_err = np.mean(
            [np.abs(np.array([float(base[i][c]) for i in ids]) - y) for c in cols], axis=0
        )
        d = err - base_err
        se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
        out[name] = {"diff": round(float(d.mean()), 4), "se": round(se, 4), "n": len(d)}
    return out


def paired_markdown(paired: dict[str, dict[str, dict[str, float]]]) -> str:
    """The paired differences as a table: one row per ion, one column per baseline."""
    lines = ["| ion | " + " | ".join(f"served − {b}" for b in BASELINES) + " |",
             "|---|" + "---|" * len(BASELINES)]  # fmt: skip
    for ion, by in paired.items():
        cells = [f"{by[b]['diff']:+.3f} ± {by[b]['se']:.3f}" if b in by else "" for b in BASELINES]
        lines.append(f"| {ion} | " + " | ".join(cells) + " |")
    return (
        "\nPaired test differences (V): mean ± standard error over the test crystals of "
        "|error(served)| − |error(baseline)|; negative favours the served model.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def _best_by_inner_cv(path: Path) -> str | None:
    """The baseline the protocol compares against: lowest inner-CV MAE on train+val (never the
    lowest test MAE, which would pick the baseline on test)."""
    from training.protocol import best_baseline

    return best_baseline(json.loads(path.read_text()))[0] if path.is_file() else None


def load_reports(paths: list[Path]) -> dict[str, dict[str, Any]]:
    reports = {}
    for p in paths:
        r = json.loads(Path(p).read_text())
        reports[r["ion"]] = r
    return reports


def table_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ion, r in reports.items():
        for name in METHOD_ORDER:
            m = r["methods"].get(name)
            if m is None:
                continue
            rows.append({
                "ion": ion, "method": name, "test_mae_mean": round(m["test_mae_mean"], 4),
                "test_mae_std": round(m["test_mae_std"], 4), "n_seeds": m["n_seeds"],
                "n_test": r["n"]["test"],
            })  # fmt: skip
    return rows


def markdown(reports: dict[str, dict[str, Any]]) -> str:
    ions = list(reports)
    head = "| method | " + " | ".join(ions) + " |\n|---|" + "---|" * len(ions) + "\n"
    lines = []
    for name in METHOD_ORDER:
        cells = []
        present = False
        for ion in ions:
            m = reports[ion]["methods"].get(name)
            if m is None:
                cells.append("")
                continue
            present = True
            best = min(v["test_mae_mean"] for v in reports[ion]["methods"].values())
            cell = f"{m['test_mae_mean']:.3f} ± {m['test_mae_std']:.3f}"
            cells.append(f"**{cell}**" if m["test_mae_mean"] == best else cell)
        if present:
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = (
        "| paper TL (val) | "
        + " | ".join(f"{PAPER_TL_MAE[i]:.3f}" if i in PAPER_TL_MAE else "" for i in ions)
        + " |"
    )
    unc = (
        "| coverage90 (test) | "
        + " | ".join(
            f"{reports[i]['uncertainty'].get('coverage_90', float('nan')):.2f}" for i in ions
        )
        + " |"
    )
    bn = (
        "| head, BN mode (val-selected) | "
        + " | ".join(_head_label(reports[i]) for i in ions)
        + " |"
    )
    return (
        "Test MAE (V), mean ± std over seeds, grouped test split (no host shared with any "
        "training set). Bold: best per ion. Rows without a suffix are the models as served: "
        "the Li ensemble (3 training seeds) and transfer over its 3 backbones are one model "
        "each, and deterministic methods have std 0; `_per_seed` rows score one ensemble "
        "member (one Li training seed) at a time; the random forest, CGCNN from scratch and "
        "the fc heads are refitted per seed. `cgcnn` (Li) and `transfer` are hybrids: their "
        "GP heads read the CGCNN backbone's crystal vector and the composition descriptors. "
        "Baselines are tuned per ion by grouped CV on train+val; `*_pooled` ones also see the "
        "partner ions' training crystals, as the pooled GP does. Bold marks the lowest test "
        "figure only: nothing is chosen by it (docs/protocol.md).\n\n"
        + head
        + "\n".join([*lines, paper, unc, bn])
        + "\n"
    )


def run_compare(
    metrics_paths: list[Path], predictions_paths: list[Path], out_csv: Path, out_md: Path,
    out_plot: Path, summary_json: Path,
) -> dict[str, Any]:  # fmt: skip
    reports = load_reports(metrics_paths)
    rows = table_rows(reports)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    paired, panels = {}, {}
    for p in predictions_paths:
        ion = Path(p).stem.split("_", 1)[1]
        model = _read_csv(p)
        if not model:
            continue
        paired[ion] = _paired(model, _read_csv(Path(p).with_name(f"baselines_{ion}.csv")))
        col = _served_column(model)
        panels[f"{ion} ({col})"] = (
            np.array([float(r["target"]) for r in model.values()]),
            np.array([float(r[col]) for r in model.values()]),
        )
    out_md.write_text(markdown(reports) + paired_markdown(paired))
    parity_grid(panels, out_plot)
    chosen = {ion: _best_by_inner_cv(Path(metrics_paths[0]).parent / f"baselines_{ion}.json")
              for ion in reports}  # fmt: skip
    summary = {
        ion: {"final_test_mae": r["test_mae"],
              "best_baseline": chosen[ion],
              "best_baseline_mae": (r["methods"][chosen[ion]]["test_mae_mean"]
                                    if chosen[ion] in r["methods"] else None),
              **{f"unc_{k}": v for k, v in r["uncertainty"].items()},
              "paired_vs_baselines": paired.get(ion, {})}
        for ion, r in reports.items()
    }  # fmt: skip
    summary_json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary
