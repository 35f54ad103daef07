"""Wall time of each ``dvc repro`` stage, read from the stamped log that ``scripts/main.sh`` writes
(``work/logs/repro.log``: every line prefixed ``HH:MM:SS``).

Why: issue 17 asks for the timings of each stage before and after a change, on a fresh clone.
DVC records no durations, and a stage's own report records only part of its work (e.g. the
MLflow run), so the one complete source is when each stage started: a stage lasts until the next
one starts, and the last one until ``main: dvc repro took N s`` (uncounted when the run was
stopped before that line). Stages ``dvc repro`` skipped ("didn't change") take no time and are
listed apart. ``foreach`` stages (``baselines@Li`` ...) are also summed per family.

Usage::

    python bench/repro_stages.py work/logs/repro.log                     # table on stdout
    python bench/repro_stages.py work/logs/repro.log --json reports/bench/repro_stages.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP = re.compile(r"^(\d\d):(\d\d):(\d\d) ")
RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
TOOK = re.compile(r"main: dvc repro took (\d+) s")
DAY = 24 * 3600


@dataclass
class Stage:
    name: str
    start_s: int  # seconds after the first stamped line
    seconds: int | None = None  # None: still running when the log ends


def _clock(line: str) -> int | None:
    m = STAMP.match(line)
    return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])


def parse(lines: list[str]) -> dict:
    """Stages run (name, start, seconds), stages skipped, the total and whether the run ended."""
    stages: list[Stage] = []
    skipped: list[str] = []
    first = None
    offset = prev = 0
    took = None
    for line in lines:
        clock = _clock(line)
        if clock is None:
            m = TOOK.search(line)  # main.sh's own line carries no stamp
            took = int(m[1]) if m else took
            continue
        if prev and clock + offset < prev - 60:  # past midnight
            offset += DAY
        now = prev = clock + offset
        first = now if first is None else first
        if m := RUNNING.search(line):
            if stages:
                stages[-1].seconds = now - first - stages[-1].start_s
            stages.append(Stage(m[1], now - first))
        elif m := SKIPPED.search(line):
            skipped.append(m[1])
    ended = took is not None
    if stages and ended:  # a stopped run's last stage stays uncounted (None)
        stages[-1].seconds = took - stages[-1].start_s
    families: dict[str, int] = {}
    for s in stages:
        if s.seconds is not None:
            family = s.name.split("@")[0]
            families[family] = families.get(family, 0) + s.seconds
    return {
        "stages": [asdict(s) for s in stages],
        "families": families,
        "skipped": skipped,
        "total_s": took if ended else sum(families.values()),
        "ended": ended,
    }


def table(report: dict) -> str:
    rows = ["| stage | start (s) | seconds |", "|---|---:|---:|"]
    for s in report["stages"]:
        took = "running" if s["seconds"] is None else str(s["seconds"])
        rows.append(f"| {s['name']} | {s['start_s']} | {took} |")
    rows += ["", "| family | seconds |", "|---|---:|"]
    rows += [f"| {k} | {v} |" for k, v in report["families"].items()]
    state = "ended" if report["ended"] else "stopped (last stage not counted)"
    rows += ["", f"total {report['total_s']} s, {state}; skipped: {len(report['skipped'])}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    try:
        lines = args.log.read_text(errors="replace").splitlines()
    except OSError as exc:
        print(f"cannot read {args.log}: {exc}", file=sys.stderr)
        return 2
    report = parse(lines)
    if not report["stages"]:
        print(f"{args.log}: no 'Running stage' line with a time stamp", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
