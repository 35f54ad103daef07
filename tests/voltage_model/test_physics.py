"""The physics cross-check with the real pretrained CHGNet: framework normalisation, refusals,
a plausible LiCoO2 voltage, and the ``pair_voltage`` stage on a self-built snapshot.

Why real CHGNet: the point is that its energies give sensible voltages through this arithmetic;
a faked potential would test only the arithmetic. Structures are built here (LiCoO2 / CoO2,
12 and 9 sites), so each energy costs milliseconds; the CHGNet load (~4 s) happens once.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Composition, Lattice, Structure
from pymatgen.io.cif import CifWriter
from typer.testing import CliRunner

from tests.conftest import write_snapshot
from voltage_model.models import chgnet_backbone, physics
from voltage_model.models.physics import PhysicsError

torch.set_num_threads(1)


def layered(metal: str = "Co", ion: str | None = "Li") -> Structure:
    """R-3m layered oxide (LiCoO2 type, 3 formula units); ``ion=None`` leaves the layer empty."""
    lattice = Lattice.hexagonal(2.82, 14.05)
    s = Structure.from_spacegroup(
        "R-3m", lattice, ["Li", metal, "O"], [[0, 0, 0.5], [0, 0, 0], [0, 0, 0.2604]]
    )
    if ion is None:
        s.remove_species(["Li"])
    elif ion != "Li":
        s.replace_species({"Li": ion})
    return s


@pytest.fixture(scope="module")
def lco() -> Structure:
    return layered()


@pytest.fixture(scope="module")
def coo2() -> Structure:
    return layered(ion=None)


@pytest.fixture(scope="module")
def full(coo2: Structure, lco: Structure) -> physics.PhysicsVoltage:
    return physics.physics_voltage(coo2, lco, "Li")


# ------------------------------------------------------------------------------ physics
def test_licoo2_voltage_is_physical(full: physics.PhysicsVoltage) -> None:
    assert 2.0 < full.voltage < 6.0
    assert full.framework == "CoO2"
    assert (full.x_charged, full.x_discharged, full.dx, full.valence) == (0.0, 1.0, 1.0, 1)
    assert full.metal_energy == physics.metal_energy("Li")
    li = physics.metal_structure("Li")
    assert len(li) == 1 and -3.0 < full.metal_energy < -1.0  # bcc Li, ~-1.9 eV/atom in MP


def test_supercell_of_the_discharged_end_gives_the_same_voltage(coo2, lco, full) -> None:
    bigger = physics.physics_voltage(coo2, lco * (2, 2, 1), "Li")
    assert bigger.voltage == pytest.approx(full.voltage, abs=2e-3)
    assert bigger.energy_discharged == pytest.approx(full.energy_discharged, abs=5e-3)
    assert bigger.dx == pytest.approx(1.0)


def test_partly_lithiated_charged_end_is_counted_per_framework_unit(coo2, lco) -> None:
    """Charged Li2Co3O6 (3 framework units) vs discharged Li6Co6O12 (6 units): dx = 1/3."""
    charged = lco.copy()
    charged.remove_sites([next(i for i, site in enumerate(charged) if site.specie.symbol == "Li")])
    discharged = lco * (2, 1, 1)
    res = physics.physics_voltage(charged, discharged, "Li")
    assert res.x_charged == pytest.approx(2 / 3)
    assert res.x_discharged == pytest.approx(1.0)
    assert res.dx == pytest.approx(1 / 3)
    e_c, e_d = physics.energies_per_atom([charged, discharged])
    mu = physics.metal_energy("Li")
    by_hand = -((e_d * 24 / 6) - (e_c * 11 / 3) - mu / 3) / (1 / 3)
    assert res.voltage == pytest.approx(by_hand, abs=1e-4)
    assert 1.0 < res.voltage < 7.0


def test_mismatched_frameworks_are_refused_naming_both(coo2) -> None:
    with pytest.raises(PhysicsError) as err:
        physics.physics_voltage(coo2, layered("Ni"), "Li")
    assert err.value.reason == "mismatch"
    assert "CoO2" in str(err.value) and "NiO2" in str(err.value)


@pytest.mark.parametrize("which", ["reversed", "same"])
def test_no_insertion_is_refused(coo2, lco, which) -> None:
    charged, discharged = (lco, coo2) if which == "reversed" else (lco, lco * (1, 1, 2))
    with pytest.raises(PhysicsError) as err:
        physics.physics_voltage(charged, discharged, "Li")
    assert err.value.reason == "no_insertion"
    assert "must hold more Li" in str(err.value)


def test_frameworks_match_within_tolerance_only() -> None:
    fc, fd = physics.match_frameworks(Composition("Co3O6"), Composition("Li4Co4O8"), "Li")
    assert (fc.formula, fc.n_fu, fd.n_fu, fd.x) == ("CoO2", 3.0, 4.0, 1.0)
    with pytest.raises(PhysicsError, match="frameworks differ"):
        physics.match_frameworks(Composition("CoO2"), Composition("LiCoO2.1"), "Li")
    with pytest.raises(PhysicsError, match="no host"):
        physics.match_frameworks(Composition("Li2"), Composition("Li2"), "Li")


def test_valences_and_metals_are_keyed_by_element() -> None:
    assert [physics.valence(i) for i in ("Li", "Na", "K", "Mg", "Ca", "Zn", "Al")] == [
        1, 1, 1, 2, 2, 2, 3
    ]  # fmt: skip
    for ion in ("Li", "Na", "K", "Mg", "Ca", "Zn", "Al"):
        assert physics.metal_structure(ion).composition.reduced_formula == ion
    with pytest.raises(PhysicsError, match="not an element"):
        physics.valence("Xx")
    with pytest.raises(PhysicsError, match="no metal reference for Fe"):
        physics.metal_energy("Fe")


def test_metal_energy_is_computed_once_per_process(full) -> None:
    before = physics._relaxed_metal_energy.cache_info()
    assert physics.metal_energy("Li") == full.metal_energy
    after = physics._relaxed_metal_energy.cache_info()
    assert after.hits == before.hits + 1 and after.misses == before.misses


# ------------------------------------------------------------------------------ stage
def _pair_row(bid: str, ion: str, charged: str, discharged: str, volts: float) -> dict:
    return {"battery_id": bid, "working_ion": ion, "charged_id": charged.split("/")[-1][:-4],
            "charged_formula": "x", "discharged_id": discharged.split("/")[-1][:-4],
            "discharged_formula": "y", "pair_voltage": volts, "battery_avg_voltage": volts + 0.1,
            "charged_cif": charged, "discharged_cif": discharged}  # fmt: skip


@pytest.fixture(scope="module")
def pair_snapshot(tmp_path_factory: pytest.TempPathFactory, coo2, lco) -> Path:
    """One good Li pair (and its supercell twin), one mismatch, one reversed, one missing end,
    and a Mg row (another ion: left out when only Li is asked for)."""
    root = tmp_path_factory.mktemp("pairs")
    cifs = {"cifs_r/mp-1.cif": coo2, "cifs_r/mp-2.cif": lco, "cifs_r/mp-3.cif": lco * (2, 1, 1),
            "cifs_r/mp-4.cif": layered("Ni"), "cifs_r/mp-5.cif": layered(ion="Mg")}  # fmt: skip
    rows = [
        _pair_row("mp-2_Li", "Li", "cifs_r/mp-1.cif", "cifs_r/mp-2.cif", 4.0),
        _pair_row("mp-3_Li", "Li", "cifs_r/mp-1.cif", "cifs_r/mp-3.cif", 4.0),
        _pair_row("mp-4_Li", "Li", "cifs_r/mp-1.cif", "cifs_r/mp-4.cif", 4.0),
        _pair_row("mp-9_Li", "Li", "cifs_r/mp-2.cif", "cifs_r/mp-1.cif", 4.0),
        _pair_row("mp-8_Li", "Li", "cifs_r/mp-1.cif", "", 4.0),
        _pair_row("mp-5_Mg", "Mg", "cifs_r/mp-1.cif", "cifs_r/mp-5.cif", 3.0),
    ]
    write_snapshot(root, rows, {k: str(CifWriter(s)) for k, s in cifs.items()})
    return root


def _features(path: Path, ids: list[str], energies: list[float]) -> Path:
    feats = np.zeros((len(ids), chgnet_backbone.FEATURE_DIM))
    feats[:, -1] = energies
    spec = np.array(json.dumps(chgnet_backbone.spec()))
    np.savez(path, ids=np.array(ids), features=feats, spec=spec)
    return path


def test_stage_scores_good_pairs_and_reports_refusals(pair_snapshot, tmp_path, full) -> None:
    from training.stages.pair_voltage import PairVoltagePaths, run_pair_voltage

    out_csv, out_json = tmp_path / "p.csv", tmp_path / "p.json"
    paths = PairVoltagePaths(out_csv, out_json)
    report = run_pair_voltage(pair_snapshot, ["Li"], paths, progress=False)
    rows = {r["battery_id"]: r for r in csv.DictReader(out_csv.open())}
    assert set(rows) == {"mp-2_Li", "mp-3_Li", "mp-4_Li", "mp-9_Li", "mp-8_Li"}
    for bid in ("mp-2_Li", "mp-3_Li"):
        assert float(rows[bid]["physics_voltage"]) == pytest.approx(full.voltage, abs=2e-3)
        assert rows[bid]["framework"] == "CoO2" and rows[bid]["error"] == ""
    assert rows["mp-4_Li"]["reason"] == "mismatch" and "NiO2" in rows["mp-4_Li"]["error"]
    assert rows["mp-9_Li"]["reason"] == "no_insertion"
    assert rows["mp-8_Li"]["reason"] == "missing_structure"
    assert "discharged" in rows["mp-8_Li"]["error"]
    li = report["per_ion"]["Li"]
    assert (li["n"], li["n_scored"], li["n_refused"]) == (5, 2, 3)
    assert li["mae_vs_pair_voltage"] == pytest.approx(abs(full.voltage - 4.0), abs=2e-3)
    assert li["mae_vs_battery_avg_voltage"] == pytest.approx(abs(full.voltage - 4.1), abs=2e-3)
    assert json.loads(out_json.read_text())["metal_energy_eV_per_atom"]["Li"] == pytest.approx(
        full.metal_energy, abs=1e-6
    )
    assert report["features_cache"] == "no features file given"


def test_stage_reuses_charged_energies_only_when_they_agree(pair_snapshot, tmp_path, coo2):
    from training.stages.pair_voltage import PairVoltagePaths, run_pair_voltage

    (e_true,) = physics.energies_per_atom([coo2])
    good = _features(tmp_path / "good.npz", ["mp-1"], [e_true])
    paths = PairVoltagePaths(tmp_path / "a.csv", tmp_path / "a.json", features=good)
    rep = run_pair_voltage(pair_snapshot, ["Li"], paths, progress=False)
    assert rep["charged_energies_from_cache"] == 1 and rep["features_cache"].startswith("used")
    assert rep["per_ion"]["Li"]["n_scored"] == 2
    stale = _features(tmp_path / "stale.npz", ["mp-1"], [e_true + 0.05])
    paths = PairVoltagePaths(tmp_path / "b.csv", tmp_path / "b.json", features=stale)
    rep = run_pair_voltage(pair_snapshot, ["Li"], paths, progress=False)
    assert rep["charged_energies_from_cache"] == 0 and rep["features_cache"].startswith("not used")


def test_cli_stage_writes_reports_and_exits_2_without_snapshot(pair_snapshot, tmp_path) -> None:
    from training.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(f"ions:\n  Li: {{clean_k: null}}\ndata:\n  snapshot_dir: {pair_snapshot}\n")
    out, summary = tmp_path / "r" / "p.csv", tmp_path / "r" / "p.json"
    args = ["pair-voltage", "--out", str(out), "--summary", str(summary), "--no-progress",
            "--params", str(params)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "Li: 2 of 5 scored" in res.output and out.is_file() and summary.is_file()
    res = CliRunner().invoke(app, [*args, "--snapshot-dir", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "snapshot directory not found" in res.output
