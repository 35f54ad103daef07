"""What a screen writes and prints: the ranked CSV, the errors CSV, the summary JSON, and the report
lines of ``voltage-serve screen`` / ``screen-merge``."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.screen import tiers

CSV_COLUMNS = ("rank", "id", "formula", "ion", "voltage", "uncertainty", "tier", "figure",
               "tier1_voltage", "tier1_uncertainty", "warnings")  # fmt: skip
ERROR_COLUMNS = ("id", "kind", "message")


def errors_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".errors.csv")


def _two_tier(backbones: Mapping[str, str] | None, ion: str) -> bool:
    """Whether ``ion``'s champion serves a CHGNet head (its tier-1 figure is an estimate)."""
    return (backbones or {}).get(ion, "cgcnn") != "cgcnn"


def ranked_rows(
    records: Iterable[dict[str, Any]], backbones: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per (id, ion) with its final figure (``tiers.final``: tier 2 where there
    is one), ranked within the ion by that figure. ``backbones``: ion -> the champion's
    ``VoltageModel.backbone`` (missing: ``cgcnn``)."""
    rows = []
    for rec in records:
        for ion in rec.get("pred", {}):
            fig = tiers.final(rec, ion, _two_tier(backbones, ion))
            rows.append({"id": rec["id"], "formula": rec["formula"], "ion": ion,
                         **fig, "warnings": ";".join(fig["warnings"])})  # fmt: skip
    rows.sort(key=lambda r: (-r["voltage"], r["ion"], r["id"]))
    ranks: Counter[str] = Counter()
    for row in rows:
        ranks[row["ion"]] += 1
        row["rank"] = ranks[row["ion"]]
    return rows


def _ion_summary(
    records: Mapping[str, dict[str, Any]], ion: str, threshold: float, two_tier: bool
) -> dict[str, Any]:
    """One ion's counts on the final figures, and how many of them each tier produced."""
    figs = [tiers.final(r, ion, two_tier) for r in records.values() if "pred" in r]
    v = np.array([f["voltage"] for f in figs])
    above = v > threshold
    ood = sum(1 for r in records.values() if "pred" in r and r["pred"][ion]["warnings"])
    n_above = int(above.sum())
    return {
        "n": int(v.size), "n_above": n_above,
        "share_above": n_above / v.size if v.size else None,
        "mean": float(v.mean()) if v.size else None,
        "median": float(np.median(v)) if v.size else None,
        "max": float(v.max()) if v.size else None,
        "n_out_of_domain": ood,
        "two_tier": two_tier,
        "n_tier2": sum(f["tier"] == 2 for f in figs),
        "n_tier2_failed": sum(any(w.startswith("tier2_failed") for w in f["warnings"])
                              for f in figs),
        "n_above_tier1_estimate": int(sum(a and f["figure"] == tiers.ESTIMATE
                                          for a, f in zip(above, figs, strict=True))),
    }  # fmt: skip


def summarize(
    records: Mapping[str, dict[str, Any]], ions: Sequence[str], threshold: float,
    backbones: Mapping[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Count and share of structures above ``threshold`` per ion (final figures), plus errors."""
    errors = Counter(r["error"]["kind"] for r in records.values() if "error" in r)
    per_ion = {
        ion: {"backbone": (backbones or {}).get(ion, "cgcnn"),
              **_ion_summary(records, ion, threshold, _two_tier(backbones, ion))}
        for ion in ions
    }  # fmt: skip
    return {
        "threshold": threshold,
        "n_inputs": len(records),
        "n_predicted": sum(1 for r in records.values() if "pred" in r),
        "n_errors": sum(errors.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "per_ion": per_ion,
    }


def write_outputs(
    records: Mapping[str, dict[str, Any]],
    ions: Sequence[str],
    out_csv: Path,
    summary_json: Path,
    threshold: float,
    extra: Mapping[str, Any] | None = None,
    backbones: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ranked CSV, errors CSV and summary JSON from the records (rewritten whole, atomically)."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = ranked_rows(records.values(), backbones)
    volts = ("voltage", "uncertainty", "tier1_voltage", "tier1_uncertainty")
    _write_csv(out_csv, CSV_COLUMNS, rows, dict.fromkeys(volts, "{:.4f}"))
    errs = [
        {"id": r["id"], **r["error"]} for _, r in sorted(records.items()) if "error" in r
    ]  # fmt: skip
    _write_csv(errors_path(out_csv), ERROR_COLUMNS, errs, {})
    summary = {**summarize(records, ions, threshold, backbones), **dict(extra or {})}
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = summary_json.with_name(summary_json.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_json)
    return summary


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict], fmt: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([fmt[c].format(row[c]) if c in fmt else row[c] for c in columns])
    tmp.replace(path)


def throughput(n: int, seconds: float) -> dict[str, Any]:
    """A tier's structures, seconds and structures per second (wall clock)."""
    per_s = round(n / seconds, 2) if seconds > 0 and n else None
    return {"structures": n, "seconds": round(seconds, 3), "structures_per_second": per_s}


# =============================================================================== report
def report_lines(summary: Mapping[str, Any], threshold: float) -> list[str]:
    """What ``voltage-serve screen`` / ``screen-merge`` print: per ion counts (saying which
    figures are tier-1 estimates) and both tiers' throughputs."""
    lines = []
    for ion, s in summary["per_ion"].items():
        share = 100 * (s["share_above"] or 0.0)
        line = f"{ion}: {s['n_above']} of {s['n']} above {threshold} V ({share:.1f}%)"
        if s.get("two_tier"):
            est = s["n_above_tier1_estimate"]
            line += (f" [champion serves {s['backbone']}: {s['n_tier2']} re-scored by it, "
                     f"{est} above are tier-1 CGCNN estimates]")  # fmt: skip
        lines.append(line)
    for name, what in (("tier1", "CGCNN fast path"), ("tier2", "champions as served")):
        t = (summary.get("tiers") or {}).get(name) or {}
        rate = t.get("structures_per_second")
        shown = f"{rate} structures/s" if rate else "n/a"
        ions = f": {', '.join(t['ions'])}" if t.get("ions") else ""
        lines.append(f"{name.replace('tier', 'tier ')} ({what}{ions}): {t.get('structures', 0)} "
                     f"structures in {t.get('seconds', 0)} s, {shown}")  # fmt: skip
    return lines + worker_lines(summary)


def worker_lines(summary: Mapping[str, Any]) -> list[str]:
    """Per-worker throughput of an engine that reports it (Ray: one line per actor and tier),
    so a slow node or a starved actor shows up in the command's output."""
    per_worker = (summary.get("engine") or {}).get("per_worker") or {}
    lines = []
    for tier, workers in per_worker.items():
        for w in workers:
            rate = w.get("structures_per_second")
            lines.append(f"{tier.replace('tier', 'tier ')} worker {w['worker']}: "
                         f"{w['structures']} structures in {w['batches']} batches, "
                         f"{w['busy_seconds']} s busy, "
                         f"{f'{rate} structures/s' if rate else 'n/a'} "
                         f"(models loaded in {w['load_seconds']} s)")  # fmt: skip
    return lines
