"""The comparison stage: methods x ions table, paired test differences, parity grid, summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.compare import paired_vs_baselines, run_compare


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _report(ion: str, maes: dict[str, float]) -> dict:
    return {
        "ion": ion, "n": {"test": 6}, "test_mae": maes["transfer"], "head": "gp",
        "bn_mode": "adapt", "descriptor_weights": [0.5, 1.0],
        "uncertainty": {"coverage_90": 0.9},
        "methods": {k: {"test_mae_mean": v, "test_mae_std": 0.0, "n_seeds": 1}
                    for k, v in maes.items()},
    }  # fmt: skip


@pytest.fixture
def stage_inputs(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 4, 6)
    served = y + np.array([0.1, -0.1, 0.2, -0.2, 0.1, 0.0])  # errors 0.1 0.1 0.2 0.2 0.1 0.0
    krr = y + np.array([0.3, 0.3, -0.3, 0.3, -0.3, 0.3])  # 0.3 everywhere
    rf = y + np.array([0.0, 0.1, 0.2, 0.2, 0.1, 0.1])  # ties the served model on average
    ids = [f"mp-{i}_Mg" for i in range(6)]
    _write_csv(tmp_path / "ion_Mg.csv", [
        {"battery_id": i, "target": t, "transfer": p}
        for i, t, p in zip(ids, y, served, strict=True)
    ])  # fmt: skip
    _write_csv(tmp_path / "baselines_Mg.csv", [
        {"battery_id": i, "target": t, "mean": y.mean(), "krr": k, "rf": r}
        for i, t, k, r in zip(ids, y, krr, rf, strict=True)
    ])  # fmt: skip
    metrics = tmp_path / "ion_Mg.json"
    metrics.write_text(json.dumps(_report("Mg", {"krr": 0.3, "rf": 0.1167, "transfer": 0.1167})))
    return tmp_path, metrics


def test_paired_differences_are_per_crystal_error_differences(stage_inputs):
    folder, _ = stage_inputs
    paired = paired_vs_baselines(folder / "ion_Mg.csv", folder / "baselines_Mg.csv")
    assert set(paired) == {"krr", "rf"}  # svr absent from the baseline file: no row
    d_krr = np.array([0.1, 0.1, 0.2, 0.2, 0.1, 0.0]) - 0.3
    assert paired["krr"]["diff"] == pytest.approx(d_krr.mean(), abs=1e-4)
    assert paired["krr"]["se"] == pytest.approx(d_krr.std(ddof=1) / np.sqrt(6), abs=1e-4)
    assert paired["rf"]["diff"] == pytest.approx(0.0, abs=1e-4) and paired["rf"]["n"] == 6
    assert paired_vs_baselines(folder / "ion_Mg.csv", folder / "missing.csv") == {}


def test_a_seeded_baseline_is_paired_through_its_mean_error_over_seeds(stage_inputs):
    """``rf`` and ``rf@1`` columns: the baseline's error per crystal is their mean."""
    folder, _ = stage_inputs
    rows = list(csv.DictReader((folder / "baselines_Mg.csv").read_text().splitlines()))
    for r in rows:  # a second forest 0.3 V off everywhere: mean |error| = (e_rf + 0.3) / 2
        r["rf@1"] = float(r["target"]) + 0.3
    _write_csv(folder / "baselines_Mg.csv", rows)
    paired = paired_vs_baselines(folder / "ion_Mg.csv", folder / "baselines_Mg.csv")
    e_served = np.array([0.1, 0.1, 0.2, 0.2, 0.1, 0.0])
    e_rf = np.array([0.0, 0.1, 0.2, 0.2, 0.1, 0.1])
    assert paired["rf"]["diff"] == pytest.approx(np.mean(e_served - (e_rf + 0.3) / 2), abs=1e-4)
    assert set(paired) == {"krr", "rf"}


def test_run_compare_writes_table_paired_section_plot_and_summary(stage_inputs):
    folder, metrics = stage_inputs
    out = folder / "out"
    out.mkdir()
    summary = run_compare([metrics], [folder / "ion_Mg.csv"], out / "t.csv", out / "t.md",
                          out / "grid.png", out / "s.json")  # fmt: skip
    md = (out / "t.md").read_text()
    assert "| krr | **" not in md and "| transfer | **0.117" in md
    assert "gp (+composition x 0.5/1), adapt" in md
    assert "| Mg | " in md.split("Paired test differences")[1]
    assert summary["Mg"]["paired_vs_baselines"]["krr"]["diff"] < 0
    assert json.loads((out / "s.json").read_text()) == summary
    assert (out / "grid.png").stat().st_size > 0
    rows = list(csv.DictReader((out / "t.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == {"krr", "rf", "transfer"}
