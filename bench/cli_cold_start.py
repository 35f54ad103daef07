"""Cold start of the command line: ``voltage-serve predict`` with no server, from a fresh process.

What is timed (issue 17.4, "the command line answers in seconds"): the installed ``voltage-serve``
entry point, each run a new Python process (nothing cached but the OS page cache), for

* ``help``: ``voltage-serve --help`` (imports nothing heavy);
* ``bad_file``: ``voltage-serve predict bad.cif --ion Li`` on a file that does not parse (exit 2,
  before torch or any model is loaded);
* ``predict_<Ion>``: ``voltage-serve predict <cif> --ion <Ion> --json`` for every ion of the
  release, answered from the pretrained release: ``MLFLOW_TRACKING_URI`` is an empty temporary
  store (a sqlite file that does not exist, so no champion; the repository's own
  ``work/mlflow`` is never read or written) and ``VOLTAGE_RELEASE_DIR`` is ``release/``.

And two references, the floors of a Python command line built on these libraries:

* ``import_torch``: ``python -c "import torch"``; every figure is also given as a ratio to it,
  so runs on machines of different speed or load compare;
* ``imports_torch_chgnet_model``: torch and CHGNet's model class as the featuriser imports it
  (``voltage_model.models.chgnet_backbone.chgnet_class``, without CHGNet's dynamics and VASP
  modules): what any prediction with a CHGNet head must import (every ion of the current release
  serves one), the process ended as ``voltage-serve predict`` ends it, without the teardown;
* ``imports_torch_chgnet``: the same with a plain ``import chgnet.model`` (its package
  ``__init__``, ASE dynamics and all), the floor before ``chgnet_class``: the difference is what
  importing the model class alone saves.

Per scenario: median and min wall seconds and the median CPU seconds (user + system of the child,
which on a shared machine says more than wall time), and for predictions the answer (voltage,
uncertainty, model) of every round, checked identical. Runs are interleaved (round-robin over
the scenarios, ``--n`` rounds) so changes in the machine's load hit every scenario alike; the
1-minute load average before and after is recorded. ``--baseline CMD`` runs the same scenarios
with another command line in the same rounds (e.g. ``python /tmp/old_cli.py``, an older
``serving/cli.py`` saved outside the checkout), for a before/after on equal terms.

Exit status 1 when a scenario's exit status is not the expected one or an answer differs
between rounds (or from the baseline's).

Usage::

    python bench/cli_cold_start.py                         # 5 rounds, every ion of release/
    python bench/cli_cold_start.py --n 3 --ions Li Mg --out reports/bench/cli_cold_start.json
    python bench/cli_cold_start.py --baseline ".venv/bin/python /tmp/old_cli.py"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / ".venv" / "bin" / "voltage-serve"
FIXTURE = ROOT / "tests" / "fixtures" / "CoO2.cif"
TARGET_S = 3.0
BAD_CIF = "data_x\n_cell_length_a 4\nnot a structure\n"


@dataclass
class Scenario:
    name: str
    argv: list[str]
    expect_rc: int
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self, reference: float | None) -> dict[str, Any]:
        med = statistics.median(self.walls) if self.walls else float("nan")
        out: dict[str, Any] = {
            "median_s": round(med, 3),
            "min_s": round(min(self.walls), 3) if self.walls else None,
            "cpu_median_s": round(statistics.median(self.cpus), 3) if self.cpus else None,
            "runs": len(self.walls),
            "x_import_torch": round(med / reference, 2) if reference else None,
        }
        if self.answers:
            out["answer"] = self.answers[0]
            out["answers_identical"] = all(a == self.answers[0] for a in self.answers)
        if self.errors:
            out["errors"] = self.errors[:3]
        return out


def release_ions(release_dir: Path) -> list[str]:
    manifest = json.loads((release_dir / "manifest.json").read_text())
    return list(manifest["models"])


def cli_scenarios(prefix: str, cli: list[str], cif: Path, bad: Path, ions: list[str]) -> list:
    out = [
        Scenario(f"{prefix}help", [*cli, "--help"], 0),
        Scenario(f"{prefix}bad_file", [*cli, "predict", str(bad), "--ion", "Li"], 2),
    ]
    out += [
        Scenario(f"{prefix}predict_{ion}", [*cli, "predict", str(cif), "--ion", ion, "--json"], 0)
        for ion in ions
    ]
    return out


def run_once(sc: Scenario, env: dict[str, str]) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(sc.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != sc.expect_rc:
        sc.errors.append(f"rc {proc.returncode}: {proc.stderr.strip()[-300:]}")
        return
    sc.walls.append(wall)
    sc.cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if "predict_" in sc.name:
        answer = json.loads(proc.stdout)
        sc.answers.append({k: answer.get(k) for k in ("voltage", "uncertainty", "model")})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=5, help="rounds (fresh processes per scenario)")
    ap.add_argument("--ions", nargs="*", default=None, help="default: every ion of the release")
    ap.add_argument("--cif", type=Path, default=FIXTURE)
    ap.add_argument("--release-dir", type=Path, default=ROOT / "release")
    ap.add_argument("--cli", default=str(CLI), help="the command line to time (a command)")
    ap.add_argument("--baseline", default=None, help="another command line, timed alongside")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = ap.parse_args(argv)

    ions = args.ions or release_ions(args.release_dir)
    with tempfile.TemporaryDirectory(prefix="cli-cold-start-") as tmp:
        bad = Path(tmp) / "bad.cif"
        bad.write_text(BAD_CIF)
        store = Path(tmp) / "mlflow" / "mlflow.db"  # never created: an empty store, no champion
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{store}",
            "VOLTAGE_RELEASE_DIR": str(args.release_dir),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),  # as the CLI sets
        }
        floor = "import os, torch, chgnet.model; os._exit(0)"  # ends as the command line does
        model_floor = ("import os, torch; from voltage_model.models.chgnet_backbone import "
                       "chgnet_class; chgnet_class(); os._exit(0)")  # fmt: skip
        runs = [
            Scenario("import_torch", [sys.executable, "-c", "import torch"], 0),
            Scenario("imports_torch_chgnet_model", [sys.executable, "-c", model_floor], 0),
            Scenario("imports_torch_chgnet", [sys.executable, "-c", floor], 0),
            *cli_scenarios("", shlex.split(args.cli), args.cif, bad, ions),
        ]
        if args.baseline:
            runs += cli_scenarios("baseline:", shlex.split(args.baseline), args.cif, bad, ions)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        for _ in range(args.n):
            for sc in runs:
                run_once(sc, env)
        total = time.perf_counter() - t0
        if store.exists():
            print(f"warning: the command line created {store}", file=sys.stderr)

    reference = statistics.median(runs[0].walls) if runs[0].walls else None
    results = {sc.name: sc.summary(reference) for sc in runs}
    failed = [n for n, r in results.items() if r.get("errors") or not r.get("answers_identical", 1)]
    for name, r in results.items():  # the baseline must answer exactly as the command line
        own = results.get(name.removeprefix("baseline:"), {}).get("answer")
        if name.startswith("baseline:") and "answer" in r and r["answer"] != own:
            failed.append(f"{name} (answer differs)")
    report = {
        "rounds": args.n,
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "pythondontwritebytecode": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
        "total_s": round(total, 1),
        "target_s": TARGET_S,
        "results": results,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if failed:
        print(f"failed or inconsistent: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
