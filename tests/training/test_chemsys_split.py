"""The source ion on a split grouped by chemical system (stage ``chemsys_split``), end to end on
the tiny pipeline data: 40 real Li host structures in 10 chemical systems, a small CGCNN, the
composition baselines with small grids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from training.baselines.models import OWN_METHODS
from training.config import SplitSettings
from training.data.split import SPLITS
from training.datasets import IonData
from training.stages.chemsys_split import chemsys_split, ion_records, leak_check, row_chemsys

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 25


def _params(tmp: Path) -> Path:
    """The repository's params with a tiny CGCNN, small baseline grids and an epoch cap."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ions"] = {"Li": {"clean_k": None}, "Na": {"clean_k": None}}
    params["model"] = {"atom_fea_len": 16, "h_fea_len": 16, "n_conv": 2, "n_h": 1}
    params["train"].update(epochs=500, batch_size=8, scheduler="none", lr=0.001)
    params["chemsys_split"] = {"epochs": EPOCHS}
    params["baselines"].update(
        cv_folds=3, cv_rf_trees=20, seeds=[0, 1],
        rf={"n_estimators": 30, "max_depth": None, "min_samples_leaf": 1, "n_jobs": 1},
        svr_grid={"C": [3.0, 30.0]}, krr_grid={"alpha": [0.01, 0.1]},
        rf_grid={"min_samples_leaf": [1, 3]},
    )  # fmt: skip
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def stage(tiny_data: dict, chgnet_features, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``voltage chemsys-split`` as dvc.yaml calls it, tuned parameters overriding params, with
    the CHGNet features of the ``chgnet_features`` stage."""
    from typer.testing import CliRunner

    from training.chgnet_store import save
    from training.cli import app

    tmp = tmp_path_factory.mktemp("chemsys")
    save(tmp / "chgnet.npz", chgnet_features)
    best = tmp / "best_params.json"
    best.write_text(json.dumps({"train": {"lr": 0.003}, "model": {"h_fea_len": 24}}))
    out, preds = tmp / "reports" / "chemsys_split" / "Li.json", tmp / "Li_predictions.csv"
    args = ["chemsys-split", "--ion", "Li", "--records", str(tiny_data["clean"]),
            "--graphs", str(tiny_data["graphs"]), "--best-params", str(best),
            "--out", str(out), "--predictions", str(preds),
            "--chgnet-features", str(tmp / "chgnet.npz"),
            "--params", str(_params(tmp))]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(preds.read_text().splitlines()))
    return {"report": json.loads(out.read_text()), "rows": rows, "reports": tmp / "reports",
            "records": ion_records(tiny_data["clean"], "Li")}  # fmt: skip


def test_split_keeps_every_chemical_system_in_one_part_deterministically(tiny_data: dict):
    rows = ion_records(tiny_data["clean"], "Li")
    data = chemsys_split("Li", rows, SplitSettings())
    keys = {s: set(row_chemsys("Li", data.parts[s])) for s in SPLITS}
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"]
                or keys["val"] & keys["test"])  # fmt: skip
    assert all(keys[s] for s in SPLITS)
    assert sorted(b for s in SPLITS for b in data.ids(s)) == sorted(r.battery_id for r in rows)
    again = chemsys_split("Li", list(reversed(rows)), SplitSettings())
    assert {s: again.ids(s) for s in SPLITS} == {s: data.ids(s) for s in SPLITS}
    other = chemsys_split("Li", rows, SplitSettings(seed=7))
    assert {s: other.ids(s) for s in SPLITS} != {s: data.ids(s) for s in SPLITS}
    assert leak_check(data)["disjoint"]


def test_leak_check_finds_a_shared_chemical_system(tiny_data: dict):
    """The check can fail: one row moved from test to train leaves its system in both."""
    rows = ion_records(tiny_data["clean"], "Li")
    data = chemsys_split("Li", rows, SplitSettings())
    moved = IonData("Li", {"train": [*data.parts["train"], data.parts["test"][0]],
                           "val": data.parts["val"], "test": data.parts["test"]})  # fmt: skip
    check = leak_check(moved)
    assert not check["disjoint"]
    assert check["chemsys_in_two_parts"] == row_chemsys("Li", data.parts["test"][:1])
    assert check["test_reduced_formulas_in_train"]


def test_report_has_every_method_and_the_split_it_was_scored_on(stage: dict):
    rep = stage["report"]
    n, k = rep["n"], rep["n_chemsys"]
    assert sum(n.values()) == len(stage["records"])
    assert sum(k.values()) == len(set(row_chemsys("Li", stage["records"])))
    assert rep["leak_check"] == {"chemsys_in_two_parts": [], "test_reduced_formulas_in_train": [],
                                 "test_frameworks_in_train": [], "disjoint": True}  # fmt: skip
    assert set(rep["methods"]) == {"cgcnn", "chgnet_gp", "average", *OWN_METHODS}  # no rf@1
    assert {"chgnet_gp_minus_best_baseline", "average_minus_best_baseline"} <= set(rep)
    for m in rep["methods"].values():
        assert set(m) == set(SPLITS) and all(set(m[s]) == {"mae", "rmse", "r2"} for s in SPLITS)
    assert set(rep["cv_mae"]) == set(OWN_METHODS)
    assert rep["best_baseline"] == min(rep["cv_mae"], key=rep["cv_mae"].get)
    assert set(rep["cgcnn_minus_baseline"]) == set(OWN_METHODS)
    # The tuned parameters override params.yaml, as in the train stage; the epoch cap applies.
    assert rep["cgcnn"]["model"]["h_fea_len"] == 24 and rep["cgcnn"]["train"]["lr"] == 0.003
    assert rep["cgcnn"]["epochs"] == EPOCHS and rep["cgcnn"]["members"] == 1


def test_cgcnn_learned_on_its_training_rows(stage: dict):
    c = stage["report"]["cgcnn"]
    assert c["train_loss_last_epoch"] < 0.8 * c["train_loss_first_epoch"]


def test_predictions_are_the_test_part_and_give_the_paired_difference(stage: dict):
    rep, rows = stage["report"], stage["rows"]
    assert list(rows[0]) == ["battery_id", "chemsys", "target", "cgcnn", *OWN_METHODS, "chgnet_gp",
                            "average"]
    data = chemsys_split("Li", stage["records"], SplitSettings())
    assert [r["battery_id"] for r in rows] == data.ids("test")
    assert {r["chemsys"] for r in rows} == set(row_chemsys("Li", data.parts["test"]))
    y = np.array([float(r["target"]) for r in rows])
    err = {m: np.abs(np.array([float(r[m]) for r in rows]) - y) for m in ["cgcnn", *OWN_METHODS]}
    best = rep["best_baseline"]
    diff = err["cgcnn"] - err[best]
    assert rep["cgcnn_minus_best_baseline"]["diff"] == pytest.approx(diff.mean(), abs=1e-3)
    assert rep["cgcnn_minus_best_baseline"]["n"] == len(rows)
    assert rep["methods"]["cgcnn"]["test"]["mae"] == pytest.approx(err["cgcnn"].mean(), abs=1e-3)


def test_results_page_renders_the_report(stage: dict):
    from training.docs_report import chemsys_split_text

    text = chemsys_split_text(stage["reports"])
    rep = stage["report"]
    for name in ["cgcnn", *OWN_METHODS]:
        assert f"| {name} | {rep['methods'][name]['val']['mae']:.3f} |" in text
    assert f"CGCNN − {rep['best_baseline']}" in text
    assert chemsys_split_text(stage["reports"].parent / "nowhere").startswith("No report yet")
