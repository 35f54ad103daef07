"""Stage ``protocol``: the primary comparison (served vs best inner-CV baseline, paired, Holm),
computed by ``training/protocol.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from training.config import load_params
from training.protocol import ProtocolPaths, run_protocol


@dataclass(frozen=True)
class Options:
    metrics_dir: Path
    predictions_dir: Path
    cv_dir: Path
    out: Path
    markdown: Path
    params: Path = Path("params.yaml")


def run(opts: Options) -> None:
    p = load_params(opts.params)
    paths = ProtocolPaths(opts.metrics_dir, opts.predictions_dir, opts.cv_dir, opts.out,
                          opts.markdown)  # fmt: skip
    run_protocol(p.ion_names, p.source_ion, paths)
