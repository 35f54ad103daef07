"""The service's drift windows (serving/drift.py) and the training reference
(training/stages/drift_reference.py); the statistics both use (binning, PSI, element rule) are
tested in tests/voltage_model/test_drift_stats.py.

The alert thresholds (PSI > 0.25, unseen share > 0.2) only mean something if the numbers behind
them are right, so the window is checked against its memory bound and concurrent use, and the
reference against the shape the service loads.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import host_structures

from serving.drift import (
    DriftWindow,
    load_reference,
    unseen_element_share,
    validate_reference,
)
from training.data.records import Record, write_records
from training.data.split import write_splits
from training.stages.drift_reference import (
    DEFAULT_SITE_EDGES,
    DEFAULT_VOLTAGE_EDGES,
    reference_stats,
    write_reference,
)
from voltage_model.drift import bin_fractions, element_symbols

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
    mn_share = sum("Mn" in element_symbols(r.charged_structure) for r in train_li) / 10
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
    window.observe("Li", 2.0, element_symbols(li[11].charged_structure), nsites=6)
    assert window.stats("Li").requests == 1


def test_reference_refuses_no_values_but_windows_take_empty_counts() -> None:
    """One binning rule (empty input bins to zeros); the refusal is the builder's own."""
    li = _records("Li", 4)
    train = {"Li": {r.battery_id for r in li}}
    with pytest.raises(ValueError, match="no finite values to bin for Li voltage"):
        reference_stats({"Li": li}, train, {"Li": np.full(4, np.nan)})
    ref = reference_stats({"Li": li}, train)
    window = DriftWindow(ref, min_samples=1)
    counts = window.counts("Li")
    assert counts.requests == 0 and sum(counts.voltage) == 0 and sum(counts.sites) == 0
    assert math.isnan(window.stats("Li").psi)
    window.observe("Li", math.nan, {"Li", "O"}, nsites=None)  # nothing finite to bin
    assert sum(window.counts("Li").voltage) == 0 and window.counts("Li").requests == 1


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
