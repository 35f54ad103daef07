"""``run_screen``: selection, resume, the partial file, both tiers and the outputs; the batches run
on an ``Engine`` (``LocalEngine`` here, ``ray_engine.RayEngine`` on a Ray cluster)."""

from __future__ import annotations

import io
import multiprocessing as mp
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from serving.screen import tiers
from serving.screen.inputs import iter_contents, list_inputs, select_shard
from serving.screen.models import model_ident
from serving.screen.outputs import throughput, write_outputs
from serving.screen.partial import (
    PARTIAL_FORMAT,
    append_lines,
    check_header,
    partial_path,
    read_partial,
)
from serving.screen.predictor import Predictor
from serving.screen.prepare import init_pool_worker, init_worker, screen_chunk
from voltage_model.cif import served_structure
from voltage_model.predict import VoltageModel


# =============================================================================== batches
def tier1_batches(order: Sequence[str], batch_size: int) -> list[list[str]]:
    """Tier-1 batches: consecutive ``batch_size`` ids of the storage order (as ``_chunks``)."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def tier2_batches(order: Sequence[str]) -> list[list[str]]:
    """Tier-2 batches: the storage order cut by ``tiers.chunk_sizes`` (as ``_tier2_jobs``)."""
    out, start = [], 0
    for size in tiers.chunk_sizes(len(order)):
        out.append(list(order[start : start + size]))
        start += size
    return out


def _chunks(
    inputs: Path, todo: Sequence[str], formats: Mapping[str, str], size: int
) -> Iterator[list[tuple[str, str, bytes]]]:
    chunk: list[tuple[str, str, bytes]] = []
    for key, data in iter_contents(inputs, todo):
        chunk.append((key, formats[key], data))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _record_stream(
    chunks: Iterator[list[tuple[str, str, bytes]]],
    predictor: Predictor,
    max_sites: int,
    workers: int,
) -> Iterator[list[dict[str, Any]]]:
    """Records chunk by chunk, from a process pool (``workers`` > 1) or this process."""
    if workers <= 1:
        init_worker(predictor, max_sites)
        yield from map(screen_chunk, chunks)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)  # fork: models are not copied
    with ctx.Pool(workers, init_pool_worker, (predictor, max_sites)) as pool:
        yield from pool.imap(screen_chunk, chunks)


# =============================================================================== the screen
def _tier1(
    fh: io.TextIOBase, records: dict[str, dict], stream: Iterator[list[dict[str, Any]]],
    total: int, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Run the fast path over ``stream`` into the partial file and ``records``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=total, unit="struct", disable=not progress, desc="tier 1") as bar:
        for recs in stream:
            append_lines(fh, recs)
            records.update((r["id"], r) for r in recs)
            bar.update(len(recs))
    return throughput(total, time.perf_counter() - t0)


def _tier2_jobs(
    inputs: Path, todo: Mapping[str, tuple[str, ...]], formats: Mapping[str, str]
) -> Iterator[list[tiers.Job]]:
    """Tier-2 jobs in storage order, cut by ``tiers.chunk_sizes``."""
    sizes = iter(tiers.chunk_sizes(len(todo)))
    size, chunk = next(sizes, 0), []
    for key, data in iter_contents(inputs, todo):
        chunk.append(tiers.Job(key, formats[key], data, todo[key]))
        if len(chunk) == size:
            yield chunk
            size, chunk = next(sizes, 0), []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Rescore:
    """Tier-2 settings: per ion, re-score the ``top`` highest and ``uncertain`` most uncertain
    tier-1 figures with the champion as served (0 and 0: no tier 2)."""

    top: int = 1000
    uncertain: int = 500

    def __post_init__(self) -> None:
        tiers.check_counts(self.top, self.uncertain)


@dataclass(frozen=True)
class Work:
    """What an engine needs to run a screen's batches: where the files are, their formats, the
    ions and their models, and the batch and size limits."""

    inputs: Path
    formats: Mapping[str, str]
    ions: Sequence[str]
    models: Mapping[str, VoltageModel]
    batch_size: int
    max_sites: int


class Engine(Protocol):
    """Where a screen's batches run. ``run_screen`` owns everything else (selection, resume,
    partial file, outputs), so every engine gives the same files for the same inputs.

    ``tier1`` yields the records of the ``todo`` ids batch by batch (``screen_chunk`` on
    consecutive ``batch_size`` ids of the storage order); ``tier2`` the tier-2 lines of
    ``todo`` (id -> ions to re-score; ``tiers.Rescorer.lines`` on the ``tier2_batches``), in
    any order of batches. ``report`` is what the summary keeps about the engine."""

    workers: int

    def tier1(self, work: Work, todo: Sequence[str]) -> Iterator[list[dict[str, Any]]]: ...

    def tier2(
        self, work: Work, todo: Mapping[str, tuple[str, ...]]
    ) -> Iterator[list[dict[str, Any]]]: ...

    def report(self) -> dict[str, Any]: ...


class LocalEngine:
    """This machine: the parent reads the inputs, ``workers`` processes (or the parent itself)
    parse, build graphs and predict."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def tier1(self, work: Work, todo: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        predictor = Predictor(work.ions, work.models)
        chunks = _chunks(work.inputs, todo, work.formats, work.batch_size)
        return _record_stream(chunks, predictor, work.max_sites, self.workers)

    def tier2(
        self, work: Work, todo: Mapping[str, tuple[str, ...]]
    ) -> Iterator[list[dict[str, Any]]]:
        ions = sorted({i for v in todo.values() for i in v})
        rescorer = tiers.Rescorer({i: work.models[i] for i in ions}, work.max_sites,
                                  served_structure)  # fmt: skip
        jobs = _tier2_jobs(work.inputs, todo, work.formats)
        return tiers.stream(jobs, rescorer, self.workers)

    def report(self) -> dict[str, Any]:
        return {"name": "local", "workers": self.workers}


def _tier2(
    fh: io.TextIOBase, records: dict[str, dict], kept: Mapping[str, dict], work: Work,
    engine: Engine, rescore: Rescore, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Re-score the selection of every CHGNet-serving ion (ids already done are skipped)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    two_tier = [i for i in work.ions if tiers.needs_tier2(work.models[i])]
    todo = tiers.plan(kept, two_tier, rescore.top, rescore.uncertain)
    if todo:
        with tqdm(total=len(todo), unit="struct", disable=not progress, desc="tier 2") as bar:
            for lines in engine.tier2(work, todo):
                append_lines(fh, lines)
                for line in lines:
                    records[line["id"]].setdefault("tier2", {}).update(line["tier2"])
                bar.update(len(lines))
    return {"ions": two_tier, "rescore_top": rescore.top, "rescore_uncertain": rescore.uncertain,
            "pairs": sum(len(v) for v in todo.values()),
            **throughput(len(todo), time.perf_counter() - t0)}  # fmt: skip


def run_screen(
    inputs: Path,
    ions: Sequence[str],
    models: Mapping[str, VoltageModel],
    out_csv: Path,
    summary_json: Path,
    threshold: float = 3.0,
    batch_size: int = 64,
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    workers: int = 1,
    max_sites: int = 500,
    limit: int | None = None,
    progress: bool = True,
    rescore: Rescore | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Screen ``inputs`` with one model per ion; returns the summary (see module docstring).

    ``workers`` > 1 runs parsing, graphs and inference in that many processes (one torch thread
    each), in both tiers. ``batch_size`` is both the tier-1 inference batch and the unit of work
    and of progress; 64 is measured fastest on CPU (the (edges, 128) conv tensors of 64 crystals
    stay cache-sized; 256 ran ~1.5x slower per structure). ``limit`` keeps the first N ids of
    the shard (previews, benchmarks). With ``resume`` the ids already in
    ``<out>.partial.jsonl`` are skipped (tier-2 figures too); without it that file starts
    afresh. ``rescore`` (default ``Rescore()``) sets tier 2 (``serving.screen.tiers``).
    ``engine`` runs the batches elsewhere (``serving.screen.ray_engine.RayEngine``: a Ray cluster);
    default ``LocalEngine(workers)``. The outputs do not depend on the engine.
    """
    rescore = rescore or Rescore()
    engine = engine or LocalEngine(workers)
    missing = [i for i in ions if i not in models]
    if not ions or missing:
        raise ValueError(f"need a model for every ion; missing: {missing or 'no ions given'}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    formats = list_inputs(inputs)
    selected = select_shard(formats, shard)[:limit]
    header = {
        "format": PARTIAL_FORMAT, "ions": list(ions),
        "models": {i: model_ident(models[i]) for i in ions},
        "shard": list(shard) if shard else None, "inputs": str(inputs),
        "backbones": {i: models[i].backbone for i in ions},
    }  # fmt: skip
    part = partial_path(out_csv)
    part.parent.mkdir(parents=True, exist_ok=True)
    found, records, _ = read_partial(part) if resume else (None, {}, None)
    check_header(found, header, part)
    todo = [k for k in selected if k not in records]
    work = Work(inputs, formats, list(ions), dict(models), batch_size, max_sites)
    with part.open("a" if found else "w") as fh:
        if not found:
            append_lines(fh, [{"_header": header}])
        stream = engine.tier1(work, todo) if todo else iter(())
        tier1 = _tier1(fh, records, stream, len(todo), progress)
        kept = {k: records[k] for k in selected if k in records}
        tier2 = _tier2(fh, records, kept, work, engine, rescore, progress)
        seconds = time.perf_counter() - t0
        done = {"n_selected": len(selected), "n_new": len(todo), "seconds": round(seconds, 3),
                "tier1": tier1, "tier2": tier2}  # fmt: skip
        append_lines(fh, [{"_done": done}])
    extra = {
        "shard": header["shard"], "ions": list(ions), "models": header["models"],
        "seconds": round(seconds, 3), "n_new": len(todo), "workers": engine.workers,
        "structures_per_second": round(len(todo) / seconds, 1) if seconds > 0 else None,
        "tiers": {"tier1": tier1, "tier2": tier2}, "engine": engine.report(),
    }  # fmt: skip
    return write_outputs(kept, ions, out_csv, summary_json, threshold, extra, header["backbones"])
