"""docs/interpretability.md: every run-derived figure is rendered from reports/interpret/<Ion>.json.

Why: that page used to carry per-ion correlations, MAEs and claim verdicts typed by hand, which
went stale with every pipeline rerun. These tests pin that the generated block follows the
reports (a changed number in a report changes the block), that missing keys render as "–" rather
than breaking the docs stage, and that the committed page equals its rendering with no volt figure
typed outside the block.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from training.docs_interpret import DASH, interpretability_block, load_reports
from training.docs_report import BEGIN, END, hand_typed_figures, splice

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "interpretability.md"


def _spearman(rho_pc1: float, rho_pc2: float) -> dict[str, Any]:
    props = ("covalent_radius", "electronegativity", "first_ionization_energy", "atomic_radius")
    return {
        "PC1": {k: {"rho": rho_pc1 - 0.01 * i, "p": 1e-4, "n": 40} for i, k in enumerate(props)},
        "PC2": {k: {"rho": rho_pc2 - 0.01 * i, "p": 2e-5, "n": 40} for i, k in enumerate(props)},
    }


def _split(head_mae: float, model_mae: float, n: int) -> dict[str, Any]:
    return {
        "linear_head_vs_dft": {"mae": head_mae, "rmse": 1.0, "r2": 0.5, "n": n},
        "model_vs_dft": {"mae": model_mae, "rmse": 1.0, "r2": 0.6, "n": n},
        "linear_head_vs_model": {"mae": 0.111, "rmse": 0.2, "r2": 0.93, "n": n},
    }


def synthetic_report(ion: str = "Mg") -> dict[str, Any]:
    """The shape ``training.stages.interpret.run_interpret`` writes, with recognisable numbers."""
    return {
        "ion": ion,
        "model": {"checkpoint": f"models/ions/{ion}.pt", "n_backbones": 2},
        "n_structures": 1234,
        "element_embedding": {
            "elements": ["O", "Mn", "Fe"],
            "explained_variance_ratio": [0.3, 0.2],
            "spearman": _spearman(-0.432, 0.777),
        },
        "element_embedding_other_backbones": [_spearman(0.123, -0.654)],
        "local_voltage": {
            "head": {
                "train": _split(0.101, 0.091, 80),
                "val": _split(0.202, 0.192, 10),
                "test": _split(0.468, 0.357, 10),
            },
            "o_coordinated": {
                "n_sites": 5678,
                "n_o_coordinated_sites": 2345,
                "by_element": {
                    "Mn": {"z": 25, "median": 3.21, "n_structures": 40},
                    "Fe": {"z": 26, "median": 2.87, "n_structures": 30},
                    "Sc": {"z": 21, "median": 9.99, "n_structures": 1},
                },
            },
        },
        "environments": {
            "n_points": 999,
            "spearman_pc1_local_voltage": {"rho": -0.66, "p": 0.0, "n": 999},
            "spearman_pc2_local_voltage": {"rho": 0.05, "p": 0.3, "n": 999},
            "knn10_r2_local_voltage": {"tsne": 0.834, "pca": 0.612, "full_vectors": 0.901},
        },
        "rf_importance": {
            "top15": [["MagpieData mean CovalentRadius", 0.2345], ["MagpieData mean Row", 0.05]],
            "by_property": [["CovalentRadius", 0.3456], ["Row", 0.07]],
        },
        "claims": {
            "covalent_radius_tracks_pc2": {
                "rho": 0.777, "p": 2e-5, "strongest_pc2_property": "covalent_radius",
                "held": True,
            },
            "rf_covalent_radius_first": {
                "top_feature": "MagpieData mean CovalentRadius", "share": 0.2345, "held": True,
            },
            "local_voltage_mean_reproduces_voltage": {
                "linear_head_test_mae": 0.468, "model_test_mae": 0.357, "held": False,
            },
            "environments_cluster_by_local_voltage": {"tsne_knn10_r2": 0.834, "held": True},
        },
    }  # fmt: skip


def write(reports: Path, *reps: dict[str, Any]) -> Path:
    folder = reports / "interpret"
    folder.mkdir(parents=True, exist_ok=True)
    for rep in reps:
        (folder / f"{rep['ion']}.json").write_text(json.dumps(rep))
    return reports


def claim_line(block: str, title: str) -> str:
    return next(line for line in block.splitlines() if title in line)


def test_block_shows_the_reports_numbers(tmp_path: Path) -> None:
    block = interpretability_block(write(tmp_path, synthetic_report()))
    for figure in ("+0.777 (p 2e-05)", "-0.432", "yes (mean CovalentRadius, 23.4%)",
                   "0.468 vs 0.357", "0.83", "2,345 of 5,678", "1,234", "34.6%",
                   "Mn 3.21", "Fe 2.87 < Mn 3.21", "0.83 / 0.61 / 0.90", "0.101 / 0.202 / 0.468",
                   "0.111, R^2 0.93", "80/10/10", "1: +0.12 / -0.65"):  # fmt: skip
        assert figure in block, figure
    assert "Sc 9.99" not in block  # one structure: below the medians' threshold
    line = claim_line(block, "The mean of the local voltages reproduces")
    assert "Mg 0.468 vs 0.357 V (not held)" in line and "not for Mg" in line
    assert "Mg rho +0.777, p 2e-05 (held)" in claim_line(block, "Covalent radius tracks PC2")


def test_changing_a_number_in_the_report_changes_the_block(tmp_path: Path) -> None:
    rep = synthetic_report()
    before = interpretability_block(write(tmp_path / "a", rep))
    changed = copy.deepcopy(rep)
    changed["local_voltage"]["head"]["test"]["model_vs_dft"]["mae"] = 0.299
    after = interpretability_block(write(tmp_path / "b", changed))
    assert after != before
    assert "0.468 vs 0.299" in after and "0.468 vs 0.357" not in after.split("### The paper")[0]

    flipped = copy.deepcopy(rep)
    flipped["claims"]["covalent_radius_tracks_pc2"]["held"] = False
    line = claim_line(interpretability_block(write(tmp_path / "c", flipped)),
                      "Covalent radius tracks PC2")  # fmt: skip
    assert "(not held)" in line and "held for none" in line  # the verdict is the report's


def test_ions_in_table_order_and_missing_keys_render_as_dash(tmp_path: Path) -> None:
    li, al = synthetic_report("Li"), synthetic_report("Al")
    bare = {"ion": "Na"}  # an incomplete report must not break the other ions' rows
    reports = write(tmp_path, al, bare, li)
    assert list(load_reports(reports)) == ["Li", "Na", "Al"]
    block = interpretability_block(reports)
    rows = [line for line in block.splitlines() if line.startswith("| ")]
    summary = rows[1:4]
    assert [r.split(" | ")[0] for r in summary] == ["| Li", "| Na", "| Al"]
    assert DASH in summary[1] and "0.777" not in summary[1]
    assert "no verdict for Na" in claim_line(block, "Covalent radius tracks PC2")


def test_no_reports_gives_a_placeholder(tmp_path: Path) -> None:
    assert "No interpretation reports" in interpretability_block(tmp_path)


def test_doc_has_no_hand_typed_volt_figure_outside_its_block() -> None:
    text = DOC.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert hand_typed_figures(text) == []


def test_doc_block_equals_its_rendering_from_the_reports() -> None:
    if not sorted((REPO / "reports" / "interpret").glob("*.json")):
        pytest.skip("reports/interpret/<Ion>.json missing: run the pipeline (dvc repro/pull)")
    text = DOC.read_text()
    assert splice(text, interpretability_block(REPO / "reports")) == text, (
        "docs/interpretability.md's generated block differs from reports/interpret: "
        "run `voltage docs`"
    )
