"""Drift maths (serving/drift.py) and the training reference (training/stages/drift_reference.py).

The alert thresholds (PSI > 0.25, unseen share > 0.2) only mean something if the numbers behind
them are right, so the index is checked against a hand-computed textbook value, its basic
properties (zero on identity, growing with shift, finite on empty bins), and the window against
its memory bound and concurrent use.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import host_structures

from serving.drift import (
    DriftWindow,
    bin_fractions,
    load_reference,
    psi,
    psi_from_fractions,
    unseen_element_share,
    validate_reference,
)
from training.data.records import Record, write_records
from training.data.split import write_splits
from training.stages.drift_reference import (
    DEFAULT_SITE_EDGES,
    DEFAULT_VOLTAGE_EDGES,
    _fractions,
    reference_stats,
    structure_elements,
    write_reference,
)

EDGES = np.linspace(-1.0, 7.0, 17)


def _reference_for(values: np.ndarray, elements: dict[str, float] | None = None) -> dict:
    """A one-ion (Li) reference whose voltage histogram is that of ``values``."""
    return {
        "Li": {
            "elements": elements or {"Li": 1.0, "O": 1.0, "Mn": 0.5, "Fe": 0.5},
            "sites": {
                "edges": list(map(float, DEFAULT_SITE_EDGES)),
                "fractions": list(bin_fractions(DEFAULT_SITE_EDGES, np.full(10, 10.0))),
            },
            "voltage": {
                "edges": list(map(float, EDGES)),
                "fractions": list(bin_fractions(EDGES, values)),
            },
            "n": int(values.size),
        }
    }


# ---- PSI ----------------------------------------------------------------------------------------


def test_psi_is_zero_for_identical_distribution() -> None:
    values = np.random.default_rng(0).normal(3.5, 0.8, 5000)
    ref = bin_fractions(EDGES, values)
    assert psi(ref, EDGES, values) == pytest.approx(0.0, abs=1e-12)
    # Same distribution, independent sample: small, well under the "stable" 0.1 line.
    other = np.random.default_rng(1).normal(3.5, 0.8, 5000)
    assert psi(ref, EDGES, other) < 0.02


def test_psi_grows_with_shift() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(3.5, 0.6, 20000)
    ref = bin_fractions(EDGES, base)
    sample = rng.normal(3.5, 0.6, 5000)
    values = [psi(ref, EDGES, sample + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in itertools.pairwise(values)), values
    assert values[0] < 0.1 < values[2]
    assert values[-1] > 0.25


def test_psi_textbook_value() -> None:
    """Expected 25/25/25/25 %, actual 10/20/30/40 %: sum (a-e) ln(a/e) = 0.228217 (by hand:
    0.15 ln 2.5 + 0.05 ln 1.25 + 0.05 ln 1.2 + 0.15 ln 1.6)."""
    edges = [0.0, 1.0, 2.0, 3.0, 4.0]
    values = np.repeat([0.5, 1.5, 2.5, 3.5], [10, 20, 30, 40])
    by_hand = (
        0.15 * math.log(2.5) + 0.05 * math.log(1.25) + 0.05 * math.log(1.2) + 0.15 * math.log(1.6)
    )
    assert by_hand == pytest.approx(0.228217, abs=1e-6)
    assert psi([0.25] * 4, edges, values) == pytest.approx(by_hand, rel=1e-9)
    # PSI is symmetric in (expected, actual).
    assert psi_from_fractions([0.1, 0.2, 0.3, 0.4], [0.25] * 4) == pytest.approx(by_hand, rel=1e-9)


def test_psi_epsilon_keeps_empty_bins_finite() -> None:
    edges = [0.0, 1.0, 2.0]
    value = psi([1.0, 0.0], edges, [1.5] * 50)  # all mass moved to a bin the reference never had
    assert math.isfinite(value) and value > 5
    assert math.isnan(psi([0.5, 0.5], edges, []))  # undefined without data
    assert math.isnan(psi([0.5, 0.5], edges, [math.nan]))


def test_bins_are_open_ended_and_match_the_reference_builder() -> None:
    values = np.array([-5.0, -1.0, 0.2, 3.49, 3.5, 6.99, 7.0, 42.0, np.nan])
    fr = bin_fractions(EDGES, values)
    assert fr.sum() == pytest.approx(1.0)
    assert fr[0] == pytest.approx(2 / 8) and fr[-1] == pytest.approx(3 / 8)
    assert list(fr) == pytest.approx(_fractions(EDGES, values))


def test_psi_rejects_mismatched_bins() -> None:
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [0.0, 1.0, 2.0, 3.0], [1.0])
    with pytest.raises(ValueError):
        bin_fractions([1.0, 0.0], [0.5])


# ---- unseen elements ----------------------------------------------------------------------------


def test_unseen_element_share() -> None:
    known = {"Li", "O", "Fe", "P"}
    sets = [{"Li", "Fe", "P", "O"}, {"Li", "O"}, {"Li", "Xe", "O"}, {"U"}]
    assert unseen_element_share(sets, known) == pytest.approx(0.5)
    assert unseen_element_share([set()], known) == 0.0
    assert unseen_element_share(iter([{"Li"}, {"Co"}]), iter(known)) == pytest.approx(0.5)
    assert math.isnan(unseen_element_share([], known))


# ---- window -------------------------------------------------------------------------------------


def test_window_is_bounded_per_ion_and_ignores_unknown_ions() -> None:
    window = DriftWindow(_reference_for(np.full(100, 3.0)), size=50, min_samples=10)
    for i in range(1000):
        assert window.observe("Li", 3.0 + (i % 7) * 0.01, {"Li", "O"}, nsites=10)
    assert window.count("Li") == 50
    for i in range(1000):
        assert not window.observe(f"ion{i}", 3.0, {"Li"})
    assert window.ions == ["Li"]
    assert len(window._windows) == 1
    window.clear("Li")
    assert window.count("Li") == 0


def test_window_stats() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3.5, 0.5, 5000)
    window = DriftWindow(_reference_for(train), size=400, min_samples=100)
    for v in rng.normal(3.5, 0.5, 99):
        window.observe("Li", v, {"Li", "O"}, nsites=10)
    early = window.stats("Li")
    assert early.requests == 99 and math.isnan(early.psi) and math.isnan(early.unseen_element_share)
    for i, v in enumerate(rng.normal(3.5, 0.5, 301)):
        window.observe("Li", v, {"Li", "O", "Xe"} if i % 4 == 0 else {"Li", "Mn", "O"}, nsites=10)
    stats = window.stats("Li")
    assert stats.requests == 400
    assert stats.psi < 0.1
    assert stats.unseen_element_share == pytest.approx(76 / 400)
    assert stats.sites_psi == pytest.approx(0.0, abs=1e-9)
    # Shift every windowed prediction by 1.5 V: significant drift.
    for v in rng.normal(5.0, 0.5, 400):
        window.observe("Li", v, {"Li", "O"}, nsites=10)
    shifted = window.stats("Li")
    assert shifted.psi > 0.25 and shifted.unseen_element_share == 0.0
    with pytest.raises(KeyError):
        window.stats("Na")


def test_window_is_thread_safe() -> None:
    window = DriftWindow(_reference_for(np.full(100, 3.0)), size=300, min_samples=1)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for v in rng.normal(3.0, 0.3, 2000):
                window.observe("Li", v, {"Li", "O"})
                if v > 3.5:
                    window.stats("Li")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert window.count("Li") == 300


def test_validate_reference_rejects_malformed() -> None:
    good = _reference_for(np.full(10, 3.0))
    validate_reference(good)
    bad = json.loads(json.dumps(good))
    bad["Li"]["voltage"]["fractions"] = bad["Li"]["voltage"]["fractions"][:-1]
    with pytest.raises(ValueError, match="bins"):
        validate_reference(bad)
    bad = json.loads(json.dumps(good))
    del bad["Li"]["elements"]
    with pytest.raises(ValueError, match="elements"):
        validate_reference(bad)
    with pytest.raises(ValueError):
        DriftWindow({})


# ---- training reference -------------------------------------------------------------------------


def _records(ion: str, n: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for i, s in enumerate(host_structures(n, seed)):
        out.append(
            Record(
                battery_id=f"mp-{i}_{ion}",
                working_ion=ion,
                charged_id=f"mp-{i}",
                charged_formula=s.composition.reduced_formula,
                discharged_id=f"mp-{5000 + i}",
                discharged_formula=s.composition.reduced_formula,
                battery_avg_voltage=float(1.0 + 3.0 * rng.random()),
                pair_voltage=None,
                charged_spacegroup=1,
                charged_nsites=len(s),
                charged_structure=s.as_dict(),
                source="test",
            )
        )
    return out


def test_reference_stats_shape(tmp_path: Path) -> None:
    li, na = _records("Li", 12), _records("Na", 6, seed=1)
    train = {
        "Li": {r.battery_id for r in li[:10]},
        "Na": {r.battery_id for r in na[:4]},
        "K": set(),
    }
    stats = reference_stats({"Li": li, "Na": na, "K": []}, train)
    assert set(stats) == {"Li", "Na"}  # K has no training record: nothing to compare with
    for ion, n in (("Li", 10), ("Na", 4)):
        entry = stats[ion]
        assert set(entry) == {"elements", "sites", "voltage", "n"}
        assert entry["n"] == n
        assert entry["elements"]["O"] == 1.0  # every host is an oxide
        assert all(0 < f <= 1 for f in entry["elements"].values())
        assert entry["voltage"]["edges"] == pytest.approx(list(DEFAULT_VOLTAGE_EDGES))
        assert len(entry["voltage"]["fractions"]) == 16
        assert len(entry["sites"]["edges"]) == len(entry["sites"]["fractions"]) + 1
        assert sum(entry["voltage"]["fractions"]) == pytest.approx(1.0)
        assert sum(entry["sites"]["fractions"]) == pytest.approx(1.0)
    train_li = li[:10]
    mn_share = sum("Mn" in structure_elements(r.charged_structure) for r in train_li) / 10
    assert stats["Li"]["elements"]["Mn"] == pytest.approx(mn_share)
    expected = bin_fractions(DEFAULT_VOLTAGE_EDGES, [r.battery_avg_voltage for r in train_li])
    assert stats["Li"]["voltage"]["fractions"] == pytest.approx(list(expected))

    # With predictions, the voltage histogram is that of the predictions (aligned with train).
    preds = {"Li": np.full(10, 6.2)}
    with_preds = reference_stats({"Li": li}, train, preds)
    assert with_preds["Li"]["voltage"]["fractions"][14] == 1.0
    with pytest.raises(ValueError, match="predictions"):
        reference_stats({"Li": li}, train, {"Li": np.zeros(3)})

    path = tmp_path / "ref" / "drift_reference.json"
    write_reference(path, stats)
    loaded = load_reference(path)  # the service's loader accepts what training writes
    assert loaded == json.loads(json.dumps(stats))
    window = DriftWindow(loaded, min_samples=1)
    window.observe("Li", 2.0, structure_elements(li[11].charged_structure), nsites=6)
    assert window.stats("Li").requests == 1


def test_drift_reference_stage_entry_point(tmp_path: Path) -> None:
    li = _records("Li", 10)
    records = tmp_path / "records.jsonl.gz"
    write_records(records, li)
    ids = [r.battery_id for r in li]
    splits = tmp_path / "splits.json"
    write_splits(splits, {"Li": {"train": ids[:8], "val": ids[8:9], "test": ids[9:]}}, seed=0)
    out = tmp_path / "drift_reference.json"
    from typer.testing import CliRunner

    from training.cli import app

    def main(args: list[str]) -> int:
        res = CliRunner().invoke(app, ["drift-reference", *args])
        assert res.exit_code == 0, res.output
        return res.exit_code

    assert main(["--records", str(records), "--splits", str(splits), "--out", str(out)]) == 0
    assert load_reference(out)["Li"]["n"] == 8
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({"Li": {b: 6.9 for b in ids[:8]}}))
    main(["--records", str(records), "--splits", str(splits), "--out", str(out),
          "--predictions-json", str(preds)])  # fmt: skip
    assert load_reference(out)["Li"]["voltage"]["fractions"][-1] == 1.0
