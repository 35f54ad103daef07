"""Training throughput of the fast CGCNN form vs the naive reference-style form.

The naive baseline is the literal (N, M, 2F + B) concatenation plus a per-crystal Python pooling
loop, i.e. what the reference CGCNN implementation does.  Both run on the same batches, with the
same initial weights, the same optimiser and the same thread count, in the same process.

Usage::

    python bench/train_throughput.py --synthetic              # realistic synthetic Li-like graphs
    python bench/train_throughput.py --graphs data/graphs/graphs.pt --splits data/splits.json

Reported: median seconds per epoch and crystals/s (forward + backward + SGD step; batches are
collated once up front so only the model is timed) for each form, epochs interleaved so both see
the same machine load, and fast/naive.  With ``--graphs`` a "fast+loader" line also times a full
epoch through a shuffled ``GraphLoader``.  ``tune_cpu_runtime`` (glibc malloc thresholds, flush
denormals) applies to both forms unless ``--no-tune-malloc``.

``--fresh-process`` also trains the fast form in fresh subprocesses that run a parallel torch op
*before* anything sets the flush-denormal flag (the ``tune`` stage's order: torch's OpenMP workers
then exist without the flag), once with the graph converter's subnormal floor (today's code) and
once with the floor off (the code before it), and prints their crystals/s beside the in-process
figure: the floor must keep the fresh process as fast as the in-process run.

Measured on 2 shared cores (Li train, 1579 crystals, 33 atoms/crystal): fast ~800-950/s, naive
~370-400/s (~2.1x); without malloc tuning 600/s vs 300/s.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/train_throughput.py` without installing
    sys.path.insert(0, str(ROOT))

from training.train.loop import tune_cpu_runtime  # noqa: E402
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig  # noqa: E402


@dataclass
class SynthBatch:
    """GraphBatch-shaped container (see docs/CONTRACTS.md) for synthetic benchmarks."""

    atom_fea: torch.Tensor
    nbr_idx: torch.Tensor
    nbr_fea: torch.Tensor
    nbr_mask: torch.Tensor
    crystal_idx: torch.Tensor
    n_crystals: int
    target: torch.Tensor | None
    ids: list[str]


def _gaussian(dist: np.ndarray) -> torch.Tensor:
    """The converter's Gaussian distance expansion (41 centres, subnormal floor included), so the
    synthetic features hold the same numbers real graphs do."""
    from voltage_model.graphs.converter import GraphConverter

    return GraphConverter().expand_distances(torch.from_numpy(dist))


def synthetic_batches(
    n_crystals: int = 1600,
    batch_size: int = 256,
    median_atoms: int = 24,
    n_nbr: int = 12,
    pad_frac: float = 0.0,
    seed: int = 0,
) -> list[SynthBatch]:
    """Random crystals: log-normal sizes (median ``median_atoms``), 12 neighbours, 41 Gaussians."""
    rng = np.random.default_rng(seed)
    table = (rng.random((101, 92)) < 0.1).astype(np.float32)
    sizes = np.clip(np.round(median_atoms * np.exp(0.6 * rng.standard_normal(n_crystals))), 1, 160)
    batches = []
    for start in range(0, n_crystals, batch_size):
        chunk = sizes[start : start + batch_size].astype(int)
        offsets = np.concatenate([[0], np.cumsum(chunk)[:-1]])
        z = rng.integers(1, 95, size=int(chunk.sum()))
        nbr = np.concatenate(
            [o + rng.integers(0, n, size=(n, n_nbr)) for o, n in zip(offsets, chunk, strict=True)]
        )
        dist = rng.uniform(1.5, 8.0, size=nbr.shape).astype(np.float32)
        mask = (rng.random(nbr.shape) >= pad_frac).astype(np.float32)
        batches.append(
            SynthBatch(
                atom_fea=torch.from_numpy(table[z]),
                nbr_idx=torch.from_numpy(nbr.astype(np.int64)),
                nbr_fea=_gaussian(dist) * torch.from_numpy(mask[..., None]),
                nbr_mask=torch.from_numpy(mask),
                crystal_idx=torch.from_numpy(np.repeat(np.arange(len(chunk)), chunk)),
                n_crystals=len(chunk),
                target=torch.from_numpy(rng.normal(size=len(chunk)).astype(np.float32)),
                ids=[f"synth-{start + i}" for i in range(len(chunk))],
            )
        )
    return batches


def real_items(records: Path, splits: Path, ion: str, split: str) -> list[tuple[str, float]]:
    """(charged_id, voltage) for one ion's split: the graph cache is keyed by charged_id."""
    from training.data.records import iter_records
    from training.data.split import load_splits

    wanted = set(load_splits(splits)[ion][split])
    return [
        (r.charged_id, float(r.battery_avg_voltage))
        for r in iter_records(records)
        if r.battery_id in wanted
    ]


def real_loader(
    graphs: Path, items: list[tuple[str, float]], batch_size: int, shuffle: bool
) -> Any:
    """GraphLoader over the real cache (imported lazily: optional until the cache exists)."""
    from training.graphs.store import GraphLoader

    return GraphLoader.from_files(graphs, items, batch_size=batch_size, shuffle=shuffle)


Step = Callable[[Any], None]


def make_step(model: CGCNN, plain: bool) -> Step:
    """One SGD training step (forward, MSE, backward, update) for the chosen form."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step(batch: Any) -> None:
        pred = model(batch, plain=plain)
        loss = torch.nn.functional.mse_loss(pred, batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def time_epoch(step: Step, batches: Iterable[Any]) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - t0


def report(name: str, times: list[float], n: int) -> float:
    """Print and return crystals/s from the median epoch (robust to noisy shared cores)."""
    sec = statistics.median(times)
    spread = ", ".join(f"{t:.2f}" for t in times)
    print(f"{name:>12}: {sec:7.2f} s/epoch {n / sec:8.1f} crystals/s  (epochs: {spread})")
    return n / sec


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="synthetic graphs (the default)")
    p.add_argument("--graphs", type=Path, help="real graph cache, e.g. data/graphs/graphs.pt")
    p.add_argument("--splits", type=Path, default=Path("data/splits.json"))
    p.add_argument("--records", type=Path, default=Path("data/clean/records.jsonl.gz"))
    p.add_argument("--ion", default="Li")
    p.add_argument("--n-crystals", type=int, default=1600, help="synthetic dataset size")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per form (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-tune-malloc", action="store_true", help="keep glibc malloc defaults")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--fresh-process", action="store_true",
        help="also time the fast form in fresh subprocesses (parallel op first, floor on/off)",
    )
    p.add_argument("--child", choices=["floor", "no-floor"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def start_child_like_tune(keep_floor: bool) -> None:
    """The ``tune`` stage's order: a parallel op creates torch's workers before any flag is set
    (``fit`` sets it later, on the calling thread only). ``keep_floor=False`` restores the code
    before the converter's subnormal floor."""
    import voltage_model.graphs.converter as converter

    if not keep_floor:
        converter.SUBNORMAL_FLOOR = 0.0
    a = torch.randn(512, 512)
    for _ in range(4):  # a few parallel matmuls: the OpenMP pool now exists
        a = torch.tanh(a @ a)


def fresh_process_rates(argv: Sequence[str]) -> dict[str, float]:
    """crystals/s of the fast form in a fresh subprocess, with and without the subnormal floor."""
    import subprocess

    keep = [a for a in argv if a not in ("--fresh-process",)]
    rates = {}
    for mode in ("floor", "no-floor"):
        cmd = [sys.executable, __file__, *keep, "--skip-naive", "--child", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        rates[mode] = float(line.split()[1])
    return rates


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child is not None:
        start_child_like_tune(keep_floor=args.child == "floor")
    if args.no_tune_malloc:
        torch.set_num_threads(args.threads)
    else:
        tune_cpu_runtime(args.threads)
    torch.manual_seed(0)
    shuffled = None
    if args.graphs is not None:
        items = real_items(args.records, args.splits, args.ion, "train")
        batches = list(real_loader(args.graphs, items, args.batch_size, shuffle=False))
        shuffled = real_loader(args.graphs, items, args.batch_size, shuffle=True)
        source = f"{args.graphs} ({args.ion} train)"
    else:
        batches = synthetic_batches(args.n_crystals, args.batch_size)
        source = "synthetic"
    n = sum(b.n_crystals for b in batches)
    atoms = sum(int(b.atom_fea.shape[0]) for b in batches)
    print(
        f"{source}: {n} crystals, {len(batches)} batches of <= {args.batch_size}, "
        f"{atoms / n:.1f} atoms/crystal, M={batches[0].nbr_idx.shape[1]}, "
        f"threads={torch.get_num_threads()}, malloc tuned={not args.no_tune_malloc}"
    )
    base = CGCNN(CGCNNConfig())
    steps = {"fast": make_step(copy.deepcopy(base), plain=False)}
    if not args.skip_naive:
        steps["naive"] = make_step(copy.deepcopy(base), plain=True)
    for step in steps.values():  # warm-up: allocator, lazy init
        step(batches[0])
    times: dict[str, list[float]] = {name: [] for name in steps}
    if shuffled is not None:
        times["fast+loader"] = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_epoch(step, batches))
        if shuffled is not None:  # full epoch: shuffled GraphLoader iteration + fast training
            times["fast+loader"].append(time_epoch(steps["fast"], shuffled))
    rates = {name: report(name, t, n) for name, t in times.items()}
    if args.child is not None:
        print(f"RESULT {rates['fast']:.3f}")
        return
    if "naive" in rates:
        print(f"speed-up fast/naive: {rates['fast'] / rates['naive']:.2f}x")
    if args.fresh_process:
        fresh = fresh_process_rates(argv)
        print(f"fresh process, parallel op first, subnormal floor on:  {fresh['floor']:8.1f} "
              f"crystals/s ({fresh['floor'] / rates['fast']:.2f}x in-process)")
        print(f"fresh process, parallel op first, floor off (old code): {fresh['no-floor']:8.1f} "
              f"crystals/s ({fresh['no-floor'] / rates['fast']:.2f}x in-process)")


if __name__ == "__main__":
    main()
