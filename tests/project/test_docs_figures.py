"""Docs cannot go stale: every run-derived figure is rendered from reports/ (``voltage docs``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from training.docs_report import BEGIN, END, hand_typed_figures, problems, render, splice

REPO = Path(__file__).resolve().parents[2]
REPORTS = REPO / "reports"


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """README, docs/, params.yaml and reports/ of the repository, in a scratch folder."""
    if not (REPORTS / "protocol.json").is_file():
        pytest.skip("reports/protocol.json missing: run `dvc repro` first")
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "README.md", root / "README.md")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(REPO / "docs", root / "docs")
    shutil.copytree(REPORTS, root / "reports")
    return root


def test_repository_docs_agree_with_their_reports(repo_copy: Path):
    assert problems(repo_copy, repo_copy / "reports") == []


def test_a_changed_report_makes_the_docs_stale(repo_copy: Path):
    import json

    table = repo_copy / "reports" / "protocol.md"
    table.write_text(table.read_text().replace("|", "| ", 1))
    proto = repo_copy / "reports" / "protocol.json"
    doc = json.loads(proto.read_text())
    ion = next(iter(doc["ions"]))
    doc["ions"][ion]["test"]["mae_model"] += 0.05  # a rerun moved one test figure
    proto.write_text(json.dumps(doc))
    found = problems(repo_copy, repo_copy / "reports")
    assert any("README.md" in f and "differs" in f for f in found)
    assert any("results.md" in f and "differs" in f for f in found)
    for path, text in render(repo_copy, repo_copy / "reports").items():
        path.write_text(text)
    assert problems(repo_copy, repo_copy / "reports") == []


def test_a_hand_typed_figure_is_caught_outside_generated_blocks(repo_copy: Path):
    readme = repo_copy / "README.md"
    readme.write_text(readme.read_text() + "\nOur model reaches 0.312 V on Mg.\n")
    params = repo_copy / "params.yaml"
    params.write_text(params.read_text() + "# tuned: validation 0.35 -> 0.33 V\n")
    found = problems(repo_copy, repo_copy / "reports")
    assert any("README.md: hand-typed figure '0.312 V'" in f for f in found)
    assert any(f.startswith("params.yaml comment") for f in found)


def test_figure_pattern_and_splice():
    text = f"a 0.35 V b\n{BEGIN}\nold 0.4 V 0.401 V\n{END}\nc -0.04 ± 0.02 V, 12 V, v0.35"
    assert hand_typed_figures(text) == ["0.35 V", "-0.04 ± 0.02 V"]
    new = splice(text, "fresh 1.23 V")
    assert "old" not in new and "fresh 1.23 V" in new and new.endswith("v0.35")
    with pytest.raises(ValueError, match="no generated block"):
        splice("no markers", "x")
