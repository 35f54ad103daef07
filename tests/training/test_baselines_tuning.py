"""The baselines' tuning API (``fit_tuned``), their pooled variants and the stage's outputs.

Tiny synthetic data: real (made-up but valid) transition-metal oxide/phosphate formulas whose
voltage is 2 x mean electronegativity (+ an ion-specific offset for the pool partners), two
formulas per host structure, so grouped folds and partner rows on shared hosts are exercised.
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

from training.baselines.models import BASELINE_METHODS, BaselineConfig, KRRParams, RFParams
from training.baselines.models import SVRParams as SVR_
from training.baselines.tuning import FittedBaseline, PartnerRows, TuningRows, fit_tuned
from voltage_model.composition import composition_features

METALS = ("Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu")
FRAMEWORKS = ("{M}O2", "{M}PO4", "{M}SiO4", "{M}BO3", "{M}2O5", "{M}P2O7")
REPO = Path(__file__).resolve().parents[2]


def _formulas(n: int = 48) -> list[str]:
    """``n`` formulas with distinct reduced compositions, in a fixed shuffled order."""
    out: dict[str, str] = {}
    for frame, metal, x in itertools.product(FRAMEWORKS, METALS, ("", "Li")):
        formula = x + frame.format(M=metal)
        out.setdefault(Composition(formula).reduced_formula, formula)
    formulas = list(out.values())
    return [formulas[i] for i in np.random.default_rng(0).permutation(len(formulas))[:n]]


def _voltage(formulas: list[str], offset: float = 0.0, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, 0.02, len(formulas))
    return np.array([2.0 * Composition(f).average_electroneg + offset for f in formulas]) + noise


@pytest.fixture(scope="module")
def ion() -> dict:
    """48 crystals of the ion (two per host): train 0-31, val 32-39, test 40-47."""
    formulas = _formulas()
    X, _ = composition_features(formulas)
    hosts = np.array([f"host-{i // 2}" for i in range(len(formulas))])
    return {"formulas": formulas, "X": X, "y": _voltage(formulas), "hosts": hosts,
            "tr": np.arange(32), "va": np.arange(32, 40), "te": np.arange(40, 48)}  # fmt: skip


@pytest.fixture(scope="module")
def partners(ion: dict) -> PartnerRows:
    """Two partner ions on the ion's own hosts 0-19 and 8-23 (as multivalent ions share hosts),
    with voltages shifted by +1 V and -0.5 V."""
    blocks = []
    for (lo, hi), offset in (((0, 40), 1.0), ((16, 48), -0.5)):
        rows = np.arange(lo, hi)
        f = [ion["formulas"][i] for i in rows]
        blocks.append((ion["X"][rows], _voltage(f, offset, seed=lo + 1), ion["hosts"][rows]))
    return PartnerRows.from_ions(blocks)


def _cfg(**overrides) -> BaselineConfig:
    """Small grids and forests, 3 folds: the test file stays fast."""
    base = dict(
        rf=RFParams(n_estimators=40, seed=1, n_jobs=1), cv_folds=3, cv_rf_trees=20,
        svr_grid={"C": [3.0, 30.0], "gamma": [0.01, 0.03]},
        krr_grid={"alpha": [0.01, 0.1], "gamma": [0.005, 0.02]},
        rf_grid={"min_samples_leaf": [1, 3], "max_features": [1.0, 0.5]},
    )  # fmt: skip
    base.update(overrides)
    return BaselineConfig(**base)  # type: ignore[arg-type]


def _tune_rows(ion: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """train+val rows (X, y, hosts) and the train rows' indices in them."""
    rows = np.concatenate([ion["tr"], ion["va"]])
    return ion["X"][rows], ion["y"][rows], ion["hosts"][rows], np.arange(len(ion["tr"]))


# --------------------------------------------------------------------------- the API
@pytest.mark.parametrize("name", BASELINE_METHODS)
def test_fit_tuned_works_for_every_method(name: str, ion: dict, partners: PartnerRows) -> None:
    X, y, hosts, train = _tune_rows(ion)
    cfg = _cfg()
    fitted = fit_tuned(name, TuningRows(X, y, hosts, partners, train), cfg, seed=0)
    assert isinstance(fitted, FittedBaseline) and fitted.name == name
    pred = fitted.predict(ion["X"][ion["te"]])
    assert pred.shape == (len(ion["te"]),) and np.isfinite(pred).all()
    family = name.removesuffix("_pooled")
    n_points = {"svr": 4, "krr": 4, "rf": 4}.get(family, 1)
    assert len(fitted.search) == n_points
    assert all(np.isfinite(e["cv_mae"]) for e in fitted.search)
    best = min(fitted.search, key=lambda e: e["cv_mae"])
    assert fitted.choice == best["params"]
    if family != "rf":  # forests are rescored at full size (next test)
        assert fitted.cv_mae == best["cv_mae"]
    std = fitted.predict_std(ion["X"][ion["te"]])
    if family == "gp_comp":
        assert std is not None and std.shape == pred.shape and (std > 0).all()
        assert fitted.estimator is None and fitted.params["nu"] == cfg.gp.nu
    else:
        assert std is None and fitted.estimator is not None
    if family == "mean":  # fitted on the train rows only
        np.testing.assert_allclose(pred, y[train].mean())


@pytest.mark.parametrize("name", ["rf", "rf_pooled"])
def test_forest_cv_mae_is_the_full_size_forests(
    name: str, ion: dict, partners: PartnerRows
) -> None:
    """The grid is searched with ``cv_rf_trees``-tree forests; the reported ``cv_mae`` is the
    chosen point's with ``rf.n_estimators`` trees, what a search at full size reports."""
    X, y, hosts, train = _tune_rows(ion)
    grid = {"min_samples_leaf": [3], "max_features": [0.5]}
    rows = TuningRows(X, y, hosts, partners, train)
    small = fit_tuned(name, rows, _cfg(rf_grid=grid))
    full = fit_tuned(name, rows, _cfg(rf_grid=grid, cv_rf_trees=None))
    assert small.search[0]["cv_mae"] != full.search[0]["cv_mae"]  # 20 trees, not 40
    assert small.cv_mae == full.cv_mae == full.search[0]["cv_mae"]
    np.testing.assert_array_equal(small.predict(X), full.predict(X))


def test_pooled_methods_need_partners_and_names_are_checked(ion: dict) -> None:
    X, y, hosts, _ = _tune_rows(ion)
    with pytest.raises(ValueError, match="partners"):
        fit_tuned("krr_pooled", TuningRows(X, y, hosts), _cfg())
    with pytest.raises(ValueError, match="unknown baseline"):
        fit_tuned("lasso", TuningRows(X, y, hosts), _cfg())
    with pytest.raises(ValueError, match="groups"):
        fit_tuned("krr", TuningRows(X, y, hosts[:-1]), _cfg())


def test_inner_folds_are_grouped_by_host_and_see_only_the_given_rows(
    ion: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CV splits the rows it is given (train+val here) by host; a host never straddles a
    fold; ``folds`` defaults to ``cfg.cv_folds``."""
    import training.gp_cv as gp_cv

    seen: list[tuple[list[str], int]] = []
    real = gp_cv.group_folds

    def spy(hosts, folds):
        seen.append((list(hosts), folds))
        return real(hosts, folds)

    monkeypatch.setattr(gp_cv, "group_folds", spy)
    X, y, hosts, train = _tune_rows(ion)
    fit_tuned("svr", TuningRows(X, y, hosts, fit_rows=train), _cfg(cv_folds=4))
    assert seen == [(hosts.tolist(), 4)]
    for tr, te in real(hosts.tolist(), 4):
        assert not set(hosts[tr]) & set(hosts[te])


@pytest.mark.parametrize("name", ["krr_pooled", "rf_pooled", "gp_comp_pooled"])
def test_pooled_folds_drop_partner_rows_of_held_out_hosts(
    name: str, ion: dict, partners: PartnerRows, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each inner fold pools exactly the partner rows whose host it does not hold out; the
    final fit (train rows) pools none on a host of the rows it is not fitted on (val)."""
    import training.gp_cv as gp_cv
    from training.baselines import tuning

    splits: list = []
    real_folds = gp_cv.group_folds

    def spy_folds(hosts, folds):
        splits.extend(real_folds(hosts, folds))
        return splits

    monkeypatch.setattr(gp_cv, "group_folds", spy_folds)
    fits: list[tuple[np.ndarray, int, np.ndarray]] = []
    real_design = tuning._design

    def spy_design(X, y, pool):
        fits.append((np.array(X, copy=True), len(y), pool.hosts.copy()))
        return real_design(X, y, pool)

    monkeypatch.setattr(tuning, "_design", spy_design)
    X, y, hosts, train = _tune_rows(ion)
    fit_tuned(name, TuningRows(X, y, hosts, partners, train), _cfg())

    def fold_of(rows: np.ndarray) -> int:
        """Which fold a design was for: the folds run side by side, in no fixed order."""
        return next(k for k, (tr, _) in enumerate(splits)
                    if len(tr) == len(rows) and np.array_equal(X[tr], rows, equal_nan=True))

    # One design per fold and scoring round (forests: the search, then the rescoring), then
    # the final fit.
    assert (len(fits) - 1) % len(splits) == 0 and len(fits) > len(splits)
    folds = [fold_of(rows) for rows, _, _ in fits[:-1]]
    assert sorted(folds) == sorted(list(range(len(splits))) * (len(folds) // len(splits)))
    for k, (_, n_own, pool_hosts) in zip(folds, fits[:-1], strict=True):
        tr, te = splits[k]
        held = set(hosts[te])
        assert n_own == len(tr)
        assert not held & set(pool_hosts)
        assert len(pool_hosts) == int((~np.isin(partners.hosts, sorted(held))).sum())
    _, n_own, pool_hosts = fits[-1]
    val_hosts = set(hosts) - set(hosts[train])
    assert n_own == len(train) and not val_hosts & set(pool_hosts)
    assert len(pool_hosts) == int((~np.isin(partners.hosts, sorted(val_hosts))).sum())


def test_partner_rows(partners: PartnerRows) -> None:
    assert partners.n_ions == 3 and set(partners.ion_index) == {1, 2}
    z = partners.normalised_targets()
    for i in (1, 2):  # each ion normalised by its own rows (the +1 / -0.5 V offsets vanish)
        assert z[partners.ion_index == i].mean() == pytest.approx(0.0, abs=1e-9)
        assert z[partners.ion_index == i].std() == pytest.approx(1.0)
    kept = partners.without_hosts(["host-0", "host-9"])
    assert len(kept) == len(partners) - 2 - 4  # host-0: ion 1 twice; host-9: both ions twice
    assert not {"host-0", "host-9"} & set(kept.hosts)
    with pytest.raises(ValueError, match="ion indices"):
        PartnerRows(partners.X, partners.y, partners.ion_index - 1, 3, partners.hosts)
    with pytest.raises(ValueError, match="length"):
        PartnerRows(partners.X[:-1], partners.y, partners.ion_index, 3, partners.hosts)


def test_pooling_helps_an_ion_with_few_crystals(ion: dict, partners: PartnerRows) -> None:
    """With 12 own crystals and partners following the same chemistry at other voltage levels,
    per-ion normalisation lets the pooled fits borrow the shape: lower test error."""
    own = np.arange(12)
    X, y, hosts = ion["X"][own], ion["y"][own], ion["hosts"][own]
    pool = partners.without_hosts(ion["hosts"][ion["te"]])
    Xt, yt = ion["X"][ion["te"]], ion["y"][ion["te"]]
    for name in ("krr", "gp_comp"):
        alone = fit_tuned(name, TuningRows(X, y, hosts), _cfg())
        pooled = fit_tuned(f"{name}_pooled", TuningRows(X, y, hosts, pool), _cfg())
        mae = {k: np.abs(m.predict(Xt) - yt).mean() for k, m in (("a", alone), ("p", pooled))}
        assert mae["p"] < mae["a"], name


def test_gp_comp_learns_and_its_std_grows_away_from_the_data(ion: dict) -> None:
    X, y, hosts, train = _tune_rows(ion)
    gp = fit_tuned("gp_comp", TuningRows(X, y, hosts, fit_rows=train), _cfg())
    mean = fit_tuned("mean", TuningRows(X, y, hosts, fit_rows=train), _cfg())
    Xt, yt = ion["X"][ion["te"]], ion["y"][ion["te"]]
    assert np.abs(gp.predict(Xt) - yt).mean() < 0.5 * np.abs(mean.predict(Xt) - yt).mean()
    assert gp.cv_mae is not None and mean.cv_mae is not None and gp.cv_mae < mean.cv_mae
    far, _ = composition_features(["CsF", "BaI2"])
    std_near, std_far = gp.predict_std(X[train]), gp.predict_std(far)
    assert std_near is not None and std_far is not None
    assert (std_near > 0).all() and std_far.min() > std_near.max()


@pytest.mark.parametrize("family", ["svr", "krr"])
def test_kernel_grid_fast_path_equals_the_pipeline(
    family: str, ion: dict, partners: PartnerRows
) -> None:
    """The inner CV scores SVR/KRR grid points from shared distance matrices; each must predict
    what the stage's final pipeline (``make_svr``/``make_krr``) predicts."""
    from training.baselines import tuning

    params = {"svr": SVR_(C=10.0, gamma=0.02), "krr": KRRParams(alpha=0.03, gamma=0.01)}[family]
    cfg = _cfg()
    X, y, Xq = ion["X"][ion["tr"]], ion["y"][ion["tr"]], ion["X"][ion["te"]]
    pools = [None] + ([partners] if family == "krr" else [])
    for pool in pools:
        design = tuning._design(X, y, pool)
        fast = tuning._kernel_grid(family, [params], design, Xq)[0]
        slow = tuning._fit_model(family, params, design, cfg).predict(Xq)
        np.testing.assert_allclose(fast, slow, atol=1e-6)


# --------------------------------------------------------------------------- stage and CLI
def _write_data(tmp: Path, ion: dict) -> tuple[Path, Path]:
    """Records and a host-grouped split for Mg (the fixture's crystals) and its partner Ca
    (hosts 0-23 as well, +1 V); Li is the source ion and takes no part."""
    from training.data.records import Record, write_records
    from training.data.split import write_splits

    def record(ion_name: str, i: int, v: float) -> Record:
        return Record(f"b-{ion_name}-{i}", ion_name, ion["hosts"][i], ion["formulas"][i],
                      "d", ion["formulas"][i], float(v), None, None, 1, {}, "test")  # fmt: skip

    split_of = {"train": ion["tr"], "val": ion["va"], "test": ion["te"]}
    records = [record("Mg", i, ion["y"][i]) for i in range(48)]
    records += [record("Ca", i, ion["y"][i] + 1.0) for i in range(48)]
    records += [record("Li", i, ion["y"][i] - 1.0) for i in range(48)]
    splits = {name: {s: [f"b-{name}-{i}" for i in rows] for s, rows in split_of.items()}
              for name in ("Mg", "Ca", "Li")}  # fmt: skip
    write_records(tmp / "records.jsonl.gz", records)
    write_splits(tmp / "splits.json", splits, 0)
    return tmp / "records.jsonl.gz", tmp / "splits.json"


def _params_file(tmp: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ions"] = {"Li": {"clean_k": None}, "Mg": {"clean_k": None, "pool": "multivalent"},
                      "Ca": {"clean_k": None, "pool": "multivalent"}}  # fmt: skip
    params["baselines"].update(
        cv_folds=3, cv_rf_trees=20, seeds=[0, 1],
        rf={"n_estimators": 40, "max_depth": None, "min_samples_leaf": 1, "n_jobs": 1},
        svr_grid={"C": [3.0, 30.0]}, krr_grid={"alpha": [0.01, 0.1]},
        rf_grid={"min_samples_leaf": [1, 3]},
    )  # fmt: skip
    params["mlflow"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    rows = list(csv.DictReader(path.read_text().splitlines()))
    return list(rows[0]), rows


def test_cli_stage_writes_every_method_with_cv_mae_and_val_predictions(
    tmp_path: Path, ion: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``voltage baselines`` for a pooled ion: test and validation CSVs with a column per
    method (the comparison's format), per-method ``cv_mae`` and searches in the JSON, partner
    crystals pooled from their training split only, all features in this ion's own cache."""
    from typer.testing import CliRunner

    from training.cli import app
    from training.datasets import load_ion_data
    from training.stages.ion_model import baseline_rows

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    records, splits = _write_data(tmp_path, ion)
    out = tmp_path / "out"
    cache = out / "composition_Mg.npz"
    args = ["baselines", "--ion", "Mg", "--records", str(records), "--splits", str(splits),
            "--features-cache", str(cache), "--metrics", str(out / "baselines_Mg.json"),
            "--predictions", str(out / "baselines_Mg.csv"),
            "--val-predictions", str(out / "baselines_Mg_val.csv"),
            "--params", str(_params_file(tmp_path))]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    methods = ["mean", "svr", "krr", "rf", "rf@1", "gp_comp", "krr_pooled", "rf_pooled",
               "rf_pooled@1", "gp_comp_pooled"]  # fmt: skip
    header, rows = _read_csv(out / "baselines_Mg.csv")
    assert header == ["battery_id", "target", *methods]
    assert [r["battery_id"] for r in rows] == [f"b-Mg-{i}" for i in ion["te"]]
    header, rows = _read_csv(out / "baselines_Mg_val.csv")
    assert header == ["battery_id", "target", *methods]
    assert [r["battery_id"] for r in rows] == [f"b-Mg-{i}" for i in ion["va"]]

    report = json.loads((out / "baselines_Mg.json").read_text())
    assert report["pool_ions"] == ["Ca"]
    assert set(report["models"]) == set(methods)
    tuned = [m for m in methods if "@" not in m]
    assert set(report["cv_mae"]) == set(tuned)
    assert report["best_by_cv"] == min(report["cv_mae"], key=report["cv_mae"].get)
    svr = report["selection"]["methods"]["svr"]
    assert len(svr["search"]) == 2 and svr["cv_mae"] == min(e["cv_mae"] for e in svr["search"])
    assert set(report["uncertainty"]) == {"gp_comp", "gp_comp_pooled"}
    assert report["rf_importance_top15"]
    # Permutation importances of the fitted forest, scored on validation (never test).
    perm = report["rf_permutation_val"]
    assert perm["split"] == "val" and perm["n_rows"] == len(ion["va"]) and perm["top"]
    assert all(len(row) == 3 and row[2] >= 0 for row in perm["top"])

    # The comparison reads every column as a method row.
    data = load_ion_data(records, splits, "Mg")
    assert set(baseline_rows(data, out / "baselines_Mg.csv")) == set(tuned)
    # Partner features came into this ion's own cache, every split (no other stage's file).
    with np.load(cache, allow_pickle=False) as npz:
        assert set(ion["formulas"]) <= set(npz["formulas"].tolist())


def test_partner_rows_are_the_partners_training_split(tmp_path: Path, ion: dict) -> None:
    from training.datasets import load_ion_data
    from training.stages.baselines import partner_rows

    records, splits = _write_data(tmp_path, ion)
    ca = load_ion_data(records, splits, "Ca")
    rows = partner_rows([ca], tmp_path / "cache.npz")
    assert rows is not None and rows.n_ions == 2 and set(rows.ion_index) == {1}
    assert rows.hosts.tolist() == ca.host_ids("train")
    np.testing.assert_array_equal(rows.y, ca.targets("train"))
    assert partner_rows([], tmp_path / "cache.npz") is None
