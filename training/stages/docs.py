"""Stage ``docs``: every run-derived figure of README.md and docs/results.md, rendered from the
reports (``training/docs_report.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.docs_report import problems, render


@dataclass(frozen=True)
class Options:
    reports: Path = Path("reports")
    root: Path = Path(".")


def run(opts: Options) -> list[Path]:
    """Write the rendered files; returns their paths."""
    written = []
    for path, text in render(opts.root, opts.reports).items():
        path.write_text(text)
        written.append(path)
    return written


def stale(opts: Options) -> list[str]:
    """What ``run`` would change (nothing written)."""
    return problems(opts.root, opts.reports)
