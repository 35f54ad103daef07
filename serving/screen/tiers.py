"""Two-tier screening: the fast CGCNN path ranks everything, the served champion re-scores the few
structures that matter (issue 16.4).

Why two tiers: a champion may serve a GP head over frozen CHGNet features, alone
(``LoadedModel.chgnet.weight == 1``) or mixed with the CGCNN ensemble (0.5). CHGNet costs
~50-80 ms of CPU per ~20-atom crystal (graph + forward), against ~3 ms for the CGCNN path, so
running the served model on 100,000 candidates would cost a day of one core per ion. The CGCNN
ensemble is stored in every artifact (it is what the CHGNet variants were chosen against), so it
ranks everything cheaply (tier 1); the champion as served then re-scores, per ion, the top
``top`` structures by tier-1 voltage plus the ``uncertain`` most uncertain ones (tier 2). An ion
whose champion is CGCNN-only needs no tier 2: its tier-1 figure *is* the champion's answer.

Tier 2 is ``VoltageModel.prepare`` + ``predict_graphs`` with one saving: CHGNet's graph and
features depend on the structure only (the artifact's recorded CHGNet spec is checked at load),
so they are computed once per structure and shared by every ion that re-scores it; each ion's
CGCNN part, GP head and blend run through ``LoadedModel.predict_served`` exactly as served.
Structures are read as the service reads them (``parse_structure``'s result and checks; the
caller may pass a faster parser with the same result, see ``voltage_model.cif.served_structure``),
so a tier-2 figure is the answer the service gives for that file.

CHGNet's per-crystal output does not depend on which other crystals share its batch, except that
a batch of one takes a different path (~1e-6 apart in the features on tiny cells); chunks are
therefore cut so that none holds a single structure when more than one is re-scored.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import CrystalGraph
from voltage_model.predict import VoltageModel
from voltage_model.structures import StructureInputError, parse_structure

log = logging.getLogger(__name__)

#: Structures per tier-2 chunk: the unit of work, of progress and of what a crash can lose
#: (32 x ~0.1 s). CHGNet gains nothing from bigger CPU batches (measured: 46-60 ms per crystal
#: for batches of 1 to 48).
TIER2_BATCH = 32
#: ``figure`` column values: the served champion's answer, or the CGCNN ensemble stored in a
#: CHGNet-serving artifact (a tier-1 estimate, not what the service answers).
SERVED = "served"
ESTIMATE = "tier1_cgcnn_estimate"


def needs_tier2(model: VoltageModel) -> bool:
    """Whether the fast path is not the served answer (the champion serves a CHGNet head)."""
    return model.loaded.needs_chgnet


def check_counts(top: int, uncertain: int) -> None:
    """Refuse negative re-scoring counts (0 switches that criterion off)."""
    for name, value in (("rescore_top", top), ("rescore_uncertain", uncertain)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


# =============================================================================== selection
def select_ion(records: Mapping[str, dict[str, Any]], ion: str, top: int, uncertain: int
               ) -> set[str]:  # fmt: skip
    """Ids of the ``top`` highest tier-1 voltages and the ``uncertain`` highest tier-1
    uncertainties of ``ion`` (ties broken by id, so the choice is deterministic).

    Over shards, the union of every shard's top-k contains the global top-k: a structure in the
    global top-k has at most k-1 better ones anywhere, hence in its own shard."""
    rows = [(k, r["pred"][ion]) for k, r in records.items() if "pred" in r and ion in r["pred"]]
    by_volt = sorted(rows, key=lambda t: (-t[1]["voltage"], t[0]))[:top]
    by_unc = sorted(rows, key=lambda t: (-t[1]["uncertainty"], t[0]))[:uncertain]
    return {k for k, _ in by_volt} | {k for k, _ in by_unc}


def plan(records: Mapping[str, dict[str, Any]], ions: Sequence[str], top: int, uncertain: int
         ) -> dict[str, tuple[str, ...]]:  # fmt: skip
    """id -> the ions still to re-score for it (selected and without a tier-2 line yet)."""
    todo: dict[str, list[str]] = {}
    for ion in ions:
        for key in select_ion(records, ion, top, uncertain):
            if ion not in records[key].get("tier2", {}):
                todo.setdefault(key, []).append(ion)
    return {k: tuple(v) for k, v in sorted(todo.items())}


def missing(records: Mapping[str, dict[str, Any]], ions: Sequence[str], top: int, uncertain: int
            ) -> int:  # fmt: skip
    """How many (id, ion) pairs of the selection have no tier-2 line (0: tier 2 is complete)."""
    return sum(len(v) for v in plan(records, ions, top, uncertain).values())


def chunk_sizes(n: int, size: int = TIER2_BATCH) -> list[int]:
    """Chunk lengths summing to n, none of them 1 unless n == 1 (see the module docstring)."""
    sizes = [size] * (n // size) + ([n % size] if n % size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        sizes[-2] -= 1
        sizes[-1] = 2
    return sizes


# =============================================================================== final figure
def final(rec: dict[str, Any], ion: str, two_tier: bool) -> dict[str, Any]:
    """The figure a row reports for ``ion``: tier 2 when there is one, else tier 1, labelled
    (``figure``) as the served answer or as the CGCNN estimate of a CHGNet-serving champion."""
    p = rec["pred"][ion]
    t2 = rec.get("tier2", {}).get(ion)
    warnings = list(p["warnings"])
    if t2 is not None and "error" not in t2:
        volt, unc, tier, figure = t2["voltage"], t2["uncertainty"], 2, SERVED
    else:
        volt, unc, tier = p["voltage"], p["uncertainty"], 1
        figure = ESTIMATE if two_tier else SERVED
        if t2 is not None:
            warnings.append(f"tier2_failed:{t2['error']['kind']}")
    return {"voltage": volt, "uncertainty": unc, "tier": tier, "figure": figure,
            "tier1_voltage": p["voltage"], "tier1_uncertainty": p["uncertainty"],
            "warnings": warnings}  # fmt: skip


# =============================================================================== re-scoring
@dataclass(frozen=True)
class Job:
    """One structure to re-score, and for which ions."""

    id: str
    fmt: str
    data: bytes
    ions: tuple[str, ...]


@dataclass(frozen=True)
class _Ready:
    job: Job
    structure: Any
    chgnet_graph: Any


Parser = Callable[[str, str, int], Any]


class Rescorer:
    """Runs the served champions of the tier-2 ions on parsed structures, sharing CHGNet.

    ``parse(text, fmt, max_sites)`` must return what ``parse_structure`` returns (the default)."""

    def __init__(
        self, models: Mapping[str, VoltageModel], max_sites: int, parse: Parser = parse_structure
    ) -> None:
        self.models = dict(models)
        self.max_sites = max_sites
        self.parse = parse

    def lines(self, jobs: Sequence[Job]) -> list[dict[str, Any]]:
        """One partial-file line per job: ``{"id", "tier2": {ion: figure or error}}``."""
        ready, out = [], []
        for job in jobs:
            item = self._ready(job)
            if isinstance(item, dict):
                out.append(item)
            else:
                ready.append(item)
        return out + self._predicted(ready)

    def _ready(self, job: Job) -> _Ready | dict[str, Any]:
        """Parsed structure and CHGNet graph, or the job's error line (screening goes on)."""
        from voltage_model.models.chgnet_backbone import to_graph

        try:
            structure = self.parse(job.data.decode("utf-8"), job.fmt, self.max_sites)
        except UnicodeDecodeError:
            return _error_line(job, "parse", "file is not UTF-8 text")
        except StructureInputError as exc:
            return _error_line(job, exc.kind, str(exc))
        try:
            return _Ready(job, structure, to_graph(structure))
        except Exception as exc:  # CHGNet refuses e.g. isolated atoms
            return _error_line(job, "chgnet_graph", f"{type(exc).__name__}: {str(exc)[:200]}")

    def _predicted(self, ready: Sequence[_Ready]) -> list[dict[str, Any]]:
        """Lines of a batch; a failing batch is retried item by item."""
        if not ready:
            return []
        try:
            figures = self._predict(ready)
        except Exception as exc:
            if len(ready) == 1:
                log.exception("tier-2 prediction failed for %s", ready[0].job.id)
                return [_error_line(ready[0].job, "internal", f"{type(exc).__name__}")]
            return [line for r in ready for line in self._predicted([r])]
        return [{"id": r.job.id, "tier2": figures[r.job.id]} for r in ready]

    @torch.inference_mode()
    def _predict(self, ready: Sequence[_Ready]) -> dict[str, dict[str, Any]]:
        """``VoltageModel.predict_graphs`` per ion over its rows, CHGNet features computed once."""
        from voltage_model.models.chgnet_backbone import graph_features

        feats = torch.from_numpy(graph_features([r.chgnet_graph for r in ready]))
        graphs: dict[str, dict[int, CrystalGraph]] = {}
        out: dict[str, dict[str, Any]] = {r.job.id: {} for r in ready}
        for ion in sorted({i for r in ready for i in r.job.ions}):
            rows = [k for k, r in enumerate(ready) if ion in r.job.ions]
            mean, std = self._served(ion, [ready[k] for k in rows], feats[rows], graphs, rows)
            for j, k in enumerate(rows):
                out[ready[k].job.id][ion] = {"voltage": float(mean[j]),
                                             "uncertainty": float(std[j])}  # fmt: skip
        return out

    def _served(
        self, ion: str, items: Sequence[_Ready], feats: torch.Tensor,
        cache: dict[str, dict[int, CrystalGraph]], rows: Sequence[int],
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """The body of ``VoltageModel.predict_graphs`` for one ion (same calls, same order)."""
        vm = self.models[ion]
        batch = None
        if vm.loaded.needs_graphs:
            per_conv = cache.setdefault(json.dumps(vm.converter.to_dict(), sort_keys=True), {})
            for k, it in zip(rows, items, strict=True):
                if k not in per_conv:  # one CGCNN graph per distinct converter, as in tier 1
                    per_conv[k] = vm.converter.convert(it.structure)
            batch = collate([per_conv[k] for k in rows], vm.converter, vm.encoding)
        mean, std = vm.loaded.predict_served(batch, feats)
        return mean.double().numpy(), std.double().numpy() * vm.std_scale


def _error_line(job: Job, kind: str, message: str) -> dict[str, Any]:
    err = {"error": {"kind": kind, "message": message}}
    return {"id": job.id, "tier2": {ion: err for ion in job.ions}}


# =============================================================================== processes
_WORKER: dict[str, Any] = {}


def _init_worker(rescorer: Rescorer) -> None:
    _WORKER["rescorer"] = rescorer


def _init_pool_worker(rescorer: Rescorer) -> None:
    """One torch thread per worker: the processes are the parallelism (as in tier 1)."""
    torch.set_num_threads(1)
    _init_worker(rescorer)


def rescore_chunk(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """Tier-2 lines of one chunk (runs in a worker)."""
    return _WORKER["rescorer"].lines(jobs)


def stream(chunks: Iterator[list[Job]], rescorer: Rescorer, workers: int
           ) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
    """Tier-2 lines chunk by chunk, from a process pool (``workers`` > 1) or this process.

    A worker loads CHGNet on its first chunk (~3 s; ``load_model`` is cached per process) unless
    it inherited the parent's copy."""
    if workers <= 1:
        _init_worker(rescorer)
        yield from map(rescore_chunk, chunks)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, _init_pool_worker, (rescorer,)) as pool:
        yield from pool.imap(rescore_chunk, chunks)
