"""The baselines on the test rows before cleaning: the baselines stage predicts them with the
models it fitted on the cleaned rows (nothing refitted, nothing chosen on them), ion_model scores
those predictions beside the served model's, and the results page renders the table.

Data: real (made-up but valid) oxide/phosphate formulas with a voltage of 2 x mean
electronegativity; the rows the cleaning rule would drop get outlier voltages, in the training
and the test split, so a stage that fitted or tuned on any uncleaned row would show it.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from pymatgen.core import Composition

from training.data.records import Record, write_records
from training.data.split import write_splits

REPO = Path(__file__).resolve().parents[2]
METALS = ("Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu")
FRAMEWORKS = ("{M}O2", "{M}PO4", "{M}SiO4", "{M}BO3", "{M}2O5", "{M}P2O7")
# Row indices: splits of every ingested row, and the rows the cleaning rule dropped.
PARTS = {"train": range(0, 40), "val": range(40, 46), "test": range(46, 54)}
DROPPED = {37, 38, 51, 52, 53}  # two training rows, three test rows
METHODS = ["mean", "svr", "krr", "rf", "rf@1", "gp_comp"]


def _formulas(n: int = 54) -> list[str]:
    out: dict[str, str] = {}
    for frame, metal, x in itertools.product(FRAMEWORKS, METALS, ("", "Li")):
        formula = x + frame.format(M=metal)
        out.setdefault(Composition(formula).reduced_formula, formula)
    formulas = list(out.values())
    return [formulas[i] for i in np.random.default_rng(0).permutation(len(formulas))[:n]]


def _write(tmp: Path, dropped_volts: float) -> dict[str, Path]:
    """Uncleaned records/splits of every row and cleaned ones without ``DROPPED``; the dropped
    rows' voltages are ``dropped_volts`` + their index (what the scrambling test varies)."""
    formulas = _formulas()
    y = [2.0 * Composition(f).average_electroneg for f in formulas]
    y = [dropped_volts + i if i in DROPPED else v for i, v in enumerate(y)]

    def record(i: int) -> Record:
        return Record(f"b-{i}", "Na", f"host-{i // 2}", formulas[i], "d", formulas[i],
                      float(y[i]), None, None, 1, {}, "test")  # fmt: skip

    tmp.mkdir(parents=True, exist_ok=True)
    records = [record(i) for part in PARTS.values() for i in part]
    splits_all = {"Na": {s: [f"b-{i}" for i in rows] for s, rows in PARTS.items()}}
    splits = {"Na": {s: [f"b-{i}" for i in rows if i not in DROPPED]
                     for s, rows in PARTS.items()}}  # fmt: skip
    names = {"records_all": "records.jsonl.gz", "splits_all": "splits_all.json",
             "records": "clean.jsonl.gz", "splits": "splits.json"}  # fmt: skip
    paths = {k: tmp / n for k, n in names.items()}
    write_records(paths["records_all"], records)
    write_records(paths["records"], [r for r in records if int(r.battery_id[2:]) not in DROPPED])
    write_splits(paths["splits_all"], splits_all, 0)
    write_splits(paths["splits"], splits, 0)
    return paths


def _params(tmp: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ions"] = {"Li": {"clean_k": None}, "Na": {"clean_k": None}}
    params["baselines"].update(
        cv_folds=3, cv_rf_trees=20, seeds=[0, 1],
        rf={"n_estimators": 30, "max_depth": None, "min_samples_leaf": 1, "n_jobs": 1},
        svr_grid={"C": [3.0, 30.0]}, krr_grid={"alpha": [0.01, 0.1]},
        rf_grid={"min_samples_leaf": [1, 3]},
    )  # fmt: skip
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run_stage(tmp: Path, dropped_volts: float) -> dict[str, Path]:
    """``voltage baselines`` on the data above, as dvc.yaml calls it."""
    from typer.testing import CliRunner

    from training.cli import app

    paths = _write(tmp / "data", dropped_volts)
    out = tmp / "out"
    args = ["baselines", "--ion", "Na", "--records", str(paths["records"]),
            "--splits", str(paths["splits"]), "--features-cache", str(out / "features.npz"),
            "--metrics", str(out / "baselines_Na.json"),
            "--predictions", str(out / "baselines_Na.csv"),
            "--records-all", str(paths["records_all"]),
            "--splits-all", str(paths["splits_all"]),
            "--uncleaned-predictions", str(out / "baselines_Na_uncleaned.csv"),
            "--params", str(_params(tmp))]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return {**paths, "metrics": out / "baselines_Na.json", "csv": out / "baselines_Na.csv",
            "uncleaned": out / "baselines_Na_uncleaned.csv"}  # fmt: skip


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return list(rows[0]), rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """The stage twice: dropped rows at outlier voltages, and at other (scrambled) ones."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        return {"outliers": _run_stage(tmp_path_factory.mktemp("a"), 9.0),
                "scrambled": _run_stage(tmp_path_factory.mktemp("b"), -7.0)}  # fmt: skip
    finally:
        mp.undo()


def test_uncleaned_csv_holds_exactly_the_uncleaned_test_rows(runs: dict) -> None:
    run = runs["outliers"]
    header, rows = _rows(run["uncleaned"])
    assert header == ["battery_id", "target", *METHODS]  # the test CSV's columns
    assert _rows(run["csv"])[0] == header
    assert [r["battery_id"] for r in rows] == [f"b-{i}" for i in PARTS["test"]]
    assert {f"b-{i}" for i in DROPPED & set(PARTS["test"])} <= {r["battery_id"] for r in rows}
    # The targets are the uncleaned ones (the outliers included).
    assert float(rows[-1]["target"]) == pytest.approx(9.0 + 53)


def test_cleaned_test_rows_get_the_same_predictions_in_both_files(runs: dict) -> None:
    run = runs["outliers"]
    cleaned = {r["battery_id"]: r for r in _rows(run["csv"])[1]}
    uncleaned = {r["battery_id"]: r for r in _rows(run["uncleaned"])[1]}
    assert set(cleaned) < set(uncleaned)
    for bid, row in cleaned.items():
        for m in METHODS:
            assert float(uncleaned[bid][m]) == pytest.approx(float(row[m]), abs=1e-4), (bid, m)


def test_uncleaned_rows_neither_refit_nor_tune_the_baselines(runs: dict) -> None:
    """Other voltages on the rows cleaning dropped change nothing the stage fitted or chose:
    same search and choice, same cleaned predictions, same uncleaned predictions."""
    a, b = runs["outliers"], runs["scrambled"]
    rep_a, rep_b = (json.loads(r["metrics"].read_text()) for r in (a, b))

    def choices(rep: dict) -> dict:
        return {n: {k: v for k, v in m.items() if k != "seconds"}
                for n, m in rep["selection"]["methods"].items()}  # fmt: skip

    assert choices(rep_a) == choices(rep_b)
    assert rep_a["cv_mae"] == rep_b["cv_mae"] and rep_a["models"] == rep_b["models"]
    assert a["csv"].read_text() == b["csv"].read_text()
    rows_a, rows_b = _rows(a["uncleaned"])[1], _rows(b["uncleaned"])[1]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert [ra[m] for m in METHODS] == [rb[m] for m in METHODS]
        dropped = int(ra["battery_id"][2:]) in DROPPED
        assert (ra["target"] != rb["target"]) == dropped


def test_ion_model_scores_the_baselines_on_uncleaned_rows_beside_served(
    source: Path, tiny_data: dict, tmp_path: Path
) -> None:
    """``uncleaned_test`` with the baselines' CSV: per baseline mae/rmse/r2 on every uncleaned
    test row, seed columns averaged; a CSV missing a row is refused."""
    from training.datasets import IonData, load_ion_data
    from training.graphs.store import GraphStore
    from training.stages.ion_model import uncleaned_test

    uncleaned = load_ion_data(tiny_data["records"], tiny_data["splits_all"], "Li")
    test = uncleaned.parts["test"]
    cleaned = IonData("Li", {**uncleaned.parts, "test": test[:-1]})  # one row "cleaned away"
    y = uncleaned.targets("test")
    offsets = {"mean": 0.4, "krr": 0.2, "rf": 0.1, "rf@1": 0.3}
    lines = ["battery_id,target," + ",".join(offsets)]
    for bid, t in zip(uncleaned.ids("test"), y, strict=True):
        lines.append(f"{bid},{t},{','.join(str(t + o) for o in offsets.values())}")
    path = tmp_path / "baselines_Li_uncleaned.csv"
    path.write_text("\n".join(lines) + "\n")
    store = GraphStore.load(tiny_data["graphs"])

    rep = uncleaned_test(source, store, cleaned, uncleaned, path)
    assert rep["n"] == len(test) and rep["n_cleaned"] == len(test) - 1
    assert set(rep["baselines"]) == {"mean", "krr", "rf"}
    assert rep["baselines"]["krr"]["mae"] == pytest.approx(0.2)
    assert rep["baselines"]["krr"]["rmse"] == pytest.approx(0.2)
    assert rep["baselines"]["rf"]["mae"] == pytest.approx(0.2)  # mean of 0.1 and 0.3
    assert rep["baselines"]["rf"]["n_seeds"] == 2
    assert rep["baselines"]["rf"]["mae_std"] == pytest.approx(0.1)
    assert "baselines" not in uncleaned_test(source, store, cleaned, uncleaned)

    path.write_text("\n".join(lines[:-1]) + "\n")  # the last uncleaned test row missing
    with pytest.raises(ValueError, match="lacks 1 test ids"):
        uncleaned_test(source, store, cleaned, uncleaned, path)


def test_results_page_tables_the_uncleaned_rows_per_ion(tmp_path: Path) -> None:
    from training.docs_report import uncleaned_table

    reports = tmp_path / "reports"
    (reports / "metrics").mkdir(parents=True)
    (reports / "protocol.json").write_text(json.dumps({"ions": {"Li": {}, "Mg": {}, "K": {}}}))

    def m(mae: float) -> dict[str, float]:
        return {"mae": mae, "rmse": mae + 0.1, "r2": 0.5}

    reps = {
        "Li": {"n": 206, "n_cleaned": 202, "served": m(0.345), "mean": m(0.702),
               "baselines": {"mean": m(0.702), "krr": m(0.391), "rf": m(0.402)}},
        "Mg": {"n": 35, "n_cleaned": 34, "served": m(0.446), "mean": m(1.067),
               "baselines": {"krr": m(0.47), "krr_pooled": m(0.455)}},
        "K": None,  # an ion_model report without the uncleaned section: no row
    }  # fmt: skip
    for ion, unc in reps.items():
        body = {} if unc is None else {"test_uncleaned": unc}
        (reports / "metrics" / f"ion_{ion}.json").write_text(json.dumps(body))
    lines = uncleaned_table(reports).splitlines()
    assert lines[0].split(" | ")[-3:] == ["krr", "rf", "krr_pooled |"]  # mean not repeated
    assert lines[2] == "| Li | 202 | 206 | 0.345 | 0.702 | 0.391 | 0.402 | – |"
    assert lines[3] == "| Mg | 34 | 35 | 0.446 | 1.067 | 0.470 | – | 0.455 |"
    assert len(lines) == 4
