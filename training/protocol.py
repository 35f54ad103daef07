"""The protocol's primary comparison (docs/protocol.md), computed exactly as stated there.

Per transferred ion: the served model (the GP transfer head the ``ion_model`` stage chose, pooled
or on the ion's own crystals) against the best baseline, where "best" is the baseline with the
lowest inner grouped-CV MAE on the ion's train+val rows (the baselines stage's ``cv_mae``; never a
test or outer-CV figure). Evidence: paired per-crystal differences |err(served)| - |err(baseline)|
on the leak-free host-grouped CV (``reports/cv/<ion>.csv``, scored crystals only), a two-sided
Wilcoxon signed-rank test per ion, Holm's step-down adjustment over the transferred ions.
Secondary, reported the same way but not adjusted: the chemical-system-grouped CV and the fixed
test split. The source ion (whose backbone trained on its own crystals, so no CV applies) is
reported on the test split only.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

SERVED_CV_COLUMN = {"gp": "transfer_gp", "gp_alone": "transfer_gp_alone"}
#: The CV check's column of each served variant (``cgcnn``: the CGCNN GP head's column).
VARIANT_CV_COLUMN = {"chgnet": "chgnet_gp", "average": "average"}


def served_cv_columns(ion_report: Mapping[str, Any]) -> tuple[str, str, bool]:
    """(served column, the CGCNN GP column, whether the CHGNet head pools) of a transferred
    ion's ``ion_model`` report, as the CV check names its methods."""
    cgcnn = SERVED_CV_COLUMN.get(ion_report.get("head", "gp"), "transfer_gp")
    variant = ion_report.get("served_variant", "cgcnn")
    pooling = ((ion_report.get("variant_selection") or {}).get("pooling") or {}).get("chgnet")
    return VARIANT_CV_COLUMN.get(variant, cgcnn), cgcnn, bool((pooling or {}).get("pool"))


ALPHA = 0.05
#: How the source ion's served variant is named in the protocol's table.
SOURCE_SERVED = {"average": "average of the cgcnn ensemble and chgnet_gp", "chgnet": "chgnet_gp"}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control, no independence needed)."""
    items = sorted(pvalues.items(), key=lambda kv: kv[1])
    m = len(items)
    out, running = {}, 0.0
    for rank, (key, p) in enumerate(items):
        running = max(running, min(1.0, (m - rank) * p))
        out[key] = running
    return out


def paired_test(err_model: np.ndarray, err_base: np.ndarray) -> dict[str, float]:
    """Mean +- SE of the paired difference and the two-sided Wilcoxon signed-rank p-value."""
    d = np.asarray(err_model, float) - np.asarray(err_base, float)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    p = float(wilcoxon(d).pvalue) if n > 1 and np.any(d != 0) else 1.0
    return {
        "diff": float(d.mean()),
        "se": se,
        "p": p,
        "n": n,
        "mae_model": float(np.mean(err_model)),
        "mae_baseline": float(np.mean(err_base)),
    }


def best_baseline(baseline_report: Mapping[str, Any]) -> tuple[str, float]:
    """The baseline with the lowest inner grouped-CV MAE on train+val (``cv_mae``), excluding
    the mean predictor and seed replicas."""
    cands = {name: mae for name, mae in baseline_report["cv_mae"].items()
             if "@" not in name and name != "mean" and mae is not None}  # fmt: skip
    if not cands:
        raise ValueError(f"{baseline_report.get('ion')}: no baseline carries a cv_mae")
    name = min(cands, key=lambda k: (cands[k], k))
    return name, float(cands[name])


def _cv_rows(path: Path, grouping: str) -> list[dict[str, str]]:
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r["grouping"] == grouping and r["scored"] == "1"]


def cv_comparison(cv_csv: Path, grouping: str, served: str, baseline: str) -> dict[str, float]:
    rows = _cv_rows(cv_csv, grouping)
    y = np.array([float(r["target"]) for r in rows])
    err = {c: np.abs(np.array([float(r[c]) for r in rows]) - y) for c in (served, baseline)}
    return paired_test(err[served], err[baseline])


def split_comparison(model_csv: Path, baselines_csv: Path, baseline: str) -> dict[str, float]:
    """The same pair on the fixed test split (a seeded baseline: mean error over its seeds)."""
    from training.compare import _read_csv, _served_column

    model, base = _read_csv(model_csv), _read_csv(baselines_csv)
    ids = [i for i in model if i in base]
    col = _served_column(model)
    y = np.array([float(model[i]["target"]) for i in ids])
    err_m = np.abs(np.array([float(model[i][col]) for i in ids]) - y)
    cols = [c for c in base[ids[0]] if c.split("@")[0] == baseline]
    err_b = np.mean([np.abs(np.array([float(base[i][c]) for i in ids]) - y) for c in cols], axis=0)
    return paired_test(err_m, err_b)


def primary_table(
    ions: Sequence[str], source_ion: str, metrics_dir: Path, predictions_dir: Path,
    cv_dir: Path,
) -> dict[str, Any]:  # fmt: skip
    """Every ion's row of the protocol's table, with Holm-adjusted p-values over target ions."""
    rows: dict[str, Any] = {}
    for ion in ions:
        base_report = json.loads((metrics_dir / f"baselines_{ion}.json").read_text())
        ion_report = json.loads((metrics_dir / f"ion_{ion}.json").read_text())
        baseline, cv_mae = best_baseline(base_report)
        row: dict[str, Any] = {"best_baseline": baseline, "best_baseline_inner_cv_mae": cv_mae}
        row["test"] = split_comparison(
            predictions_dir / f"ion_{ion}.csv", predictions_dir / f"baselines_{ion}.csv", baseline
        )
        if ion == source_ion:
            row["served"] = SOURCE_SERVED.get(ion_report.get("served_variant", ""),
                                              "cgcnn ensemble (MLP + GP heads)")  # fmt: skip
        else:
            served = served_cv_columns(ion_report)[0]
            row["served"] = served
            for grouping in ("host", "chemsys"):
                row[f"cv_{grouping}"] = cv_comparison(cv_dir / f"{ion}.csv", grouping, served,
                                                      baseline)  # fmt: skip
        rows[ion] = row
    targets = {ion: r["cv_host"]["p"] for ion, r in rows.items() if "cv_host" in r}
    for ion, p_adj in holm(targets).items():
        rows[ion]["cv_host"]["p_holm"] = p_adj
        rows[ion]["cv_host"]["significant"] = bool(p_adj < ALPHA)
    return {"alpha": ALPHA, "family": sorted(targets), "ions": rows}


def _fmt(c: Mapping[str, float]) -> str:
    return f"{c['diff']:+.3f} ± {c['se']:.3f} (n={c['n']})"


def markdown(table: Mapping[str, Any]) -> str:
    """The primary table, then its secondary evidence, as the README includes it."""
    lines = [
        "| ion | served | best baseline (inner CV) | served MAE | baseline MAE | paired "
        "difference (V) | p (Wilcoxon) | p (Holm) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ion, r in table["ions"].items():
        c = r.get("cv_host")
        if c is None:
            continue
        lines.append(f"| {ion} | {r['served']} | {r['best_baseline']} | {c['mae_model']:.3f} | "
                     f"{c['mae_baseline']:.3f} | {_fmt(c)} | {c['p']:.3g} | "
                     f"{c['p_holm']:.3g}{' *' if c['significant'] else ''} |")  # fmt: skip
    sec = ["| ion | best baseline | chemsys-grouped CV: served − baseline | test split: served "
           "− baseline | test p (unadjusted) |", "|---|---|---|---|---|"]  # fmt: skip
    for ion, r in table["ions"].items():
        chem = _fmt(r["cv_chemsys"]) if "cv_chemsys" in r else "n/a (source ion)"
        sec.append(f"| {ion} | {r['best_baseline']} | {chem} | {_fmt(r['test'])} | "
                   f"{r['test']['p']:.3g} |")  # fmt: skip
    return (
        "Primary comparison (docs/protocol.md): leak-free host-grouped CV, scored crystals "
        "only; paired difference = mean ± SE of |error(served)| − |error(baseline)| "
        f"(negative favours the served model); * = Holm-adjusted p < {table['alpha']}.\n\n"
        + "\n".join(lines)
        + "\n\nSecondary evidence (not adjusted):\n\n"
        + "\n".join(sec)
        + "\n"
    )


@dataclass(frozen=True)
class ProtocolPaths:
    """The reports the primary comparison reads (metrics, predictions and CV directories) and
    its outputs (the table as JSON and as Markdown)."""

    metrics_dir: Path
    predictions_dir: Path
    cv_dir: Path
    out_json: Path
    out_md: Path


def run_protocol(ions: Sequence[str], source_ion: str, paths: ProtocolPaths) -> dict[str, Any]:
    table = primary_table(ions, source_ion, paths.metrics_dir, paths.predictions_dir, paths.cv_dir)
    paths.out_json.parent.mkdir(parents=True, exist_ok=True)
    paths.out_json.write_text(json.dumps(table, indent=2) + "\n")
    paths.out_md.write_text(markdown(table))
    return table
