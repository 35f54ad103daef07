"""``bench/repro_stages.py`` reads stage wall times from ``main.sh``'s stamped repro log: a stage
lasts until the next one starts, skipped stages cost nothing, midnight is crossed, and a run
that was stopped leaves its last stage uncounted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("repro_stages", ROOT / "bench/repro_stages.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


LOG = """\
23:58:00 Running stage 'ingest':
23:58:00 > voltage ingest --out data/records.jsonl.gz
23:59:30 Stage 'pair_voltage' didn't change, skipping
23:59:30 Running stage 'baselines@Li':
00:01:30 some progress line
00:02:00 Running stage 'baselines@Na':
00:02:40 Running stage 'train':
"""


def test_stage_times_cross_midnight_and_sum_per_family(tmp_path: Path):
    bench = _bench()
    ended = bench.parse((LOG + "main: dvc repro took 400 s\n").splitlines())
    assert [(s["name"], s["start_s"], s["seconds"]) for s in ended["stages"]] == [
        ("ingest", 0, 90), ("baselines@Li", 90, 150), ("baselines@Na", 240, 40),
        ("train", 280, 120),
    ]  # fmt: skip
    assert ended["families"] == {"ingest": 90, "baselines": 190, "train": 120}
    assert ended["skipped"] == ["pair_voltage"] and ended["ended"] and ended["total_s"] == 400

    stopped = bench.parse(LOG.splitlines())  # stopped in train: it is not counted
    assert stopped["stages"][-1]["seconds"] is None and not stopped["ended"]
    assert stopped["total_s"] == 280

    log = tmp_path / "repro.log"
    log.write_text(LOG)
    out = tmp_path / "stages.json"
    assert bench.main([str(log), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["families"]["baselines"] == 190
    log.write_text("no stamps here\n")
    assert bench.main([str(log)]) == 2
