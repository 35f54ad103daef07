"""Screening on a Ray cluster: ``voltage-serve screen --engine ray`` (issue 20).

Why an engine and not a second screen: ``serving.screen.run.run_screen`` keeps everything that
decides *what* the outputs are (selection, sharding, resume from ``<out>.partial.jsonl``, the
tier-2 plan, the CSVs and summary); :class:`RayEngine` only decides *where* the batches run. The
driver appends every batch's records to the partial file as it arrives, so a Ray screen resumes
exactly like a local one (same file, same rule: ids already there are skipped) and can even be
resumed by a local run or by a Slurm shard of the same ``--shard i/n``, and the other way round.

How: the batches are planned on the driver before anything is read: the ids still to do, in the
order the local run reads them (``inputs.storage_order``), cut into the local run's batches
(``run.tier1_batches`` / ``tier2_batches``). So every structure is predicted in the same
batch as in a single-process run and the figures are bit-identical, not just close. A Ray Data
datasource (:class:`_BatchSource`) turns contiguous groups of batches into read tasks; each read
task opens the folder / archive *on its worker* (the input must be at the same path on every
node: a shared filesystem, as for a Slurm array) and emits one row per batch (ids, formats,
bytes). ``map_batches`` runs a pool of actors (:class:`_Tier1Actor`, :class:`_Tier2Actor`), one
core and one torch thread each, as the local process pool; each actor loads the models once and
calls the very functions the local run calls (``prepare.screen_chunk`` /
``tiers.Rescorer.lines``). Rows are whole batches and Ray calls the actor with one row at
a time, so the way Ray Data splits or merges blocks cannot change a batch.

Models reach the actors as checkpoint *bytes* (one copy per node in Ray's object store), loaded
weights-only in the actor with ``VoltageModel.from_checkpoint``; no model object is pickled, the
workers need neither the checkpoint path nor the MLflow registry, and a registry champion is the
version the driver resolved once (a promotion during the screen cannot mix two models). Each
actor checks that its models hash to the driver's (``model_ident``): a node with other code or
another element table would otherwise write different numbers into the same file.

Each output row carries the actor's name (node IP and pid), the batch's busy seconds and the
actor's model-loading time; the driver sums them into per-worker throughput (structures per busy
second), kept in the summary (``engine.per_worker``) and printed by ``voltage-serve screen``.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.screen import tiers
from serving.screen.inputs import iter_contents, storage_order
from serving.screen.models import model_ident
from serving.screen.predictor import Predictor
from serving.screen.prepare import formula_of, init_worker, screen_chunk
from serving.screen.run import Work, run_screen, tier1_batches, tier2_batches
from voltage_model.predict import VoltageModel

if TYPE_CHECKING:
    import pyarrow as pa

#: The pinned Ray (also in requirements.lock and the ``ray`` extra of pyproject.toml).
RAY_REQUIREMENT = "ray[data]==2.60.0"
INSTALL_HINT = f'pip install "{RAY_REQUIREMENT}" (or: pip install -e ".[ray]")'


class RayMissingError(RuntimeError):
    """Ray Data is not installed in this environment."""


def require_ray() -> None:
    """Fail early, naming the install command, when Ray Data cannot be imported."""
    try:
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayMissingError(
            f"--engine ray needs Ray Data, which is not installed here ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


# =============================================================================== models
def model_from_bytes(blob: bytes) -> VoltageModel:
    """A model from checkpoint bytes, read weights-only (``VoltageModel.from_checkpoint`` needs
    a file: a temporary one, removed once the model is in memory)."""
    with tempfile.TemporaryDirectory(prefix="voltage-screen-") as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(blob)
        return VoltageModel.from_checkpoint(path)


def checkpoint_blobs(
    paths: Mapping[str, Path], champions: Sequence[str] = (), prefix: str = "electrode-voltage"
) -> dict[str, bytes]:
    """Checkpoint bytes per ion: the given files, and for ``champions`` the checkpoint of the
    version each ion's champion alias points at now (resolved once, here, on the driver, with the
    registry's read side; nothing logged is executed)."""
    blobs = {ion: Path(p).read_bytes() for ion, p in paths.items()}
    if not champions:
        return blobs
    import mlflow

    from voltage_model.naming import model_name
    from voltage_model.registry import ModelLoadError, champion_version, download_checkpoint

    uri = mlflow.get_tracking_uri()
    for ion in champions:
        name = model_name(prefix, ion)
        version = champion_version(uri, name)
        if version is None:
            raise ModelLoadError(f"{name} has no 'champion' version in the registry at {uri}")
        with tempfile.TemporaryDirectory(prefix=f"voltage-{name}-") as tmp:
            blobs[ion] = download_checkpoint(uri, version, Path(tmp)).read_bytes()
    return blobs


def _load_models(blobs: Mapping[str, Any], idents: Mapping[str, str]) -> dict[str, VoltageModel]:
    """The actor's models from the object store, checked against the driver's hashes."""
    import ray

    refs = {ion: blobs[ion] for ion in idents}
    models = {ion: model_from_bytes(ray.get(ref)) for ion, ref in refs.items()}
    for ion, model in models.items():
        got = model_ident(model)
        if got != idents[ion]:
            raise RuntimeError(
                f"worker {_worker_name()} loaded the {ion} model with hash {got}, the driver has "
                f"{idents[ion]}: run the same code and element data on every node"
            )
    return models


def _worker_name() -> str:
    import ray.util

    return f"{ray.util.get_node_ip_address()}:{os.getpid()}"


# =============================================================================== read side
def _batch_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([
        ("batch", pa.int64()), ("ids", pa.list_(pa.string())), ("fmts", pa.list_(pa.string())),
        ("ions", pa.list_(pa.list_(pa.string()))), ("data", pa.list_(pa.binary())),
    ])  # fmt: skip


@dataclass(frozen=True)
class _Batch:
    """One planned batch: its index, and per structure id, format and ions (tier 2)."""

    index: int
    ids: tuple[str, ...]
    fmts: tuple[str, ...]
    ions: tuple[tuple[str, ...], ...]


def _read_batches(inputs: str, group: Sequence[_Batch]) -> Iterator[pa.Table]:
    """A read task: the bytes of its batches, one row per batch, each emitted once complete
    (batches are contiguous in storage order, so a tar is streamed once, up to the last one)."""
    import pyarrow as pa

    where = {k: j for j, b in enumerate(group) for k in b.ids}
    got: list[dict[str, bytes]] = [{} for _ in group]
    done: set[int] = set()
    schema = _batch_schema()
    for key, data in iter_contents(Path(inputs), where):
        j = where[key]
        got[j][key] = data
        b = group[j]
        if len(got[j]) == len(b.ids):
            row = {"batch": [b.index], "ids": [list(b.ids)], "fmts": [list(b.fmts)],
                   "ions": [[list(i) for i in b.ions]],
                   "data": [[got[j][k] for k in b.ids]]}  # fmt: skip
            got[j] = {}
            done.add(j)
            yield pa.Table.from_pydict(row, schema=schema)
    missing = [k for j, b in enumerate(group) if j not in done for k in b.ids if k not in got[j]]
    if missing:
        raise FileNotFoundError(
            f"{inputs} on {_worker_name()}: {len(missing)} files not found, e.g. "
            f"{missing[:3]}: every node must see the input at the same path"
        )


def _make_source(inputs: str, batches: Sequence[_Batch], tasks: int) -> Any:
    """A Ray Data datasource of ``tasks`` read tasks over contiguous groups of ``batches``."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _BatchSource(Datasource):
        """Planned screening batches of one folder / archive (rows: whole batches)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(
            self, parallelism: int, per_task_row_limit: int | None = None,
            data_context: Any = None,
        ) -> list[ReadTask]:  # fmt: skip
            # Our own grouping, not ``parallelism``: a group is a stretch of the storage order
            # (a compressed tar is decompressed once per group, up to its last member).
            n = max(1, min(tasks, len(batches)))
            bounds = [round(i * len(batches) / n) for i in range(n + 1)]
            out = []
            for lo, hi in itertools.pairwise(bounds):
                group = list(batches[lo:hi])
                meta = BlockMetadata(num_rows=len(group), size_bytes=None, exec_stats=None,
                                     input_files=None)  # fmt: skip
                out.append(ReadTask(functools.partial(_read_batches, inputs, group), meta,
                                    schema=_batch_schema()))  # fmt: skip
            return out

    return _BatchSource()


# =============================================================================== actors
class _Actor:
    """Common part of the two actors: timing rows, one torch thread (the actors are the
    parallelism, as the local pool's processes are)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.worker = _worker_name()
        self.load_seconds = 0.0

    def run(self, jobs: list[tuple[str, str, bytes, tuple[str, ...]]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        names = ("batch", "lines", "worker", "n", "seconds", "load_seconds")
        out: dict[str, list[Any]] = {k: [] for k in names}
        for row in batch.to_pylist():  # one row = one planned batch
            t0 = time.perf_counter()
            parts = (row["ids"], row["fmts"], row["data"], row["ions"])
            jobs = [(k, f, d, tuple(i)) for k, f, d, i in zip(*parts, strict=True)]
            lines = self.run(jobs)
            out["batch"].append(row["batch"])
            out["lines"].append(json.dumps(lines, separators=(",", ":")))
            out["worker"].append(self.worker)
            out["n"].append(len(jobs))
            out["seconds"].append(time.perf_counter() - t0)
            out["load_seconds"].append(self.load_seconds)
        return pa.Table.from_pydict(out)


class _Tier1Actor(_Actor):
    """Tier 1: ``prepare.screen_chunk`` on each batch, with the models loaded once."""

    def __init__(self, blobs: Mapping[str, Any], idents: Mapping[str, str], ions: Sequence[str],
                 max_sites: int) -> None:  # fmt: skip
        super().__init__()
        t0 = time.perf_counter()
        models = _load_models(blobs, {i: idents[i] for i in ions})
        init_worker(Predictor(ions, models), max_sites)
        formula_of(["Li"])  # warm up (pymatgen import, element tables): not in busy time
        self.load_seconds = round(time.perf_counter() - t0, 3)

    def run(self, jobs: list[tuple[str, str, bytes, tuple[str, ...]]]) -> list[dict[str, Any]]:
        return screen_chunk([(k, f, d) for k, f, d, _ in jobs])


class _Tier2Actor(_Actor):
    """Tier 2: ``tiers.Rescorer.lines`` (the champions as served) on each batch."""

    def __init__(self, blobs: Mapping[str, Any], idents: Mapping[str, str], max_sites: int
                 ) -> None:  # fmt: skip
        from voltage_model.cif import served_structure
        from voltage_model.models.chgnet_backbone import load_model

        super().__init__()
        t0 = time.perf_counter()
        models = _load_models(blobs, idents)
        self.rescorer = tiers.Rescorer(models, max_sites, served_structure)
        load_model()  # CHGNet itself (~3 s, cached per process): counted as loading, not busy
        self.load_seconds = round(time.perf_counter() - t0, 3)

    def run(self, jobs: list[tuple[str, str, bytes, tuple[str, ...]]]) -> list[dict[str, Any]]:
        return self.rescorer.lines([tiers.Job(*job) for job in jobs])


# =============================================================================== engine
@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run.

    ``address``: None starts a private Ray on this machine for the run (shut down after it);
    ``"auto"`` joins the cluster this machine is part of (``ray start``); ``"host:port"`` the
    cluster whose head is there. ``actors``: size of the actor pool (default: one per CPU of
    the cluster, at most one per batch). ``read_tasks``: how many read tasks the batches are
    grouped into (default: two per actor; more tasks stream earlier, but each task of a
    compressed tar decompresses the archive up to its last member). ``local_cpus``: CPUs of a
    private Ray (None: all of this machine's)."""

    address: str | None = None
    actors: int | None = None
    read_tasks: int | None = None
    local_cpus: int | None = None

    def __post_init__(self) -> None:
        for name in ("actors", "read_tasks", "local_cpus"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"ray {name} must be >= 1, got {value}")


@dataclass
class _WorkerStats:
    structures: int = 0
    batches: int = 0
    busy_seconds: float = 0.0
    load_seconds: float = 0.0


@dataclass
class RayEngine:
    """Runs the batches of ``run_screen`` on a Ray cluster (see the module docstring).

    ``blobs``: checkpoint bytes of every ion's model, the same bytes the driver's models were
    read from. Use as a context manager: a Ray started here is shut down at the end (a cluster
    joined with ``address`` keeps running; only this driver disconnects)."""

    blobs: Mapping[str, bytes] = field(repr=False)
    settings: RaySettings = field(default_factory=RaySettings)
    progress: bool = True
    #: Actors in the largest pool so far (the summary's ``workers``).
    workers: int = field(default=0, init=False)
    _started: bool = field(default=False, init=False, repr=False)
    _refs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _stats: dict[str, dict[str, _WorkerStats]] = field(default_factory=dict, init=False,
                                                      repr=False)  # fmt: skip
    _address: str | None = field(default=None, init=False, repr=False)

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the Ray this engine started (a no-op when it joined a running one)."""
        import ray

        self._refs.clear()
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False
        self._address = None

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        import ray

        if self._address is not None:
            return
        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home by default
            if self.settings.address is None:
                ray.init(num_cpus=self.settings.local_cpus, include_dashboard=False)
            else:
                try:
                    ray.init(address=self.settings.address)
                except ConnectionError as exc:  # the user's to fix: a ValueError (exit 2)
                    raise ValueError(
                        f"cannot reach a Ray cluster at {self.settings.address!r} ({exc}); start "
                        "one with `ray start --head` or check --ray-address"
                    ) from None
            self._started = True
        self._address = ray.get_runtime_context().gcs_address

    def _pool(self, n_batches: int) -> int:
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        wanted = self.settings.actors or max(1, cpus)
        return max(1, min(wanted, n_batches))

    def _ref(self, ion: str) -> Any:
        import ray

        self._connect()  # first: ray.put would otherwise start a default Ray of its own
        if ion not in self._refs:
            self._refs[ion] = ray.put(self.blobs[ion])
        return self._refs[ion]

    # ------------------------------------------------------------------ tiers
    def tier1(self, work: Work, todo: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        order = storage_order(work.inputs, todo)
        cut = tier1_batches(order, work.batch_size)
        batches = [_Batch(i, tuple(ids), tuple(work.formats[k] for k in ids), ((),) * len(ids))
                   for i, ids in enumerate(cut)]  # fmt: skip
        ions = list(work.ions)
        kwargs = {"blobs": {i: self._ref(i) for i in ions}, "ions": ions,
                  "idents": {i: model_ident(work.models[i]) for i in ions},
                  "max_sites": work.max_sites}  # fmt: skip
        return self._run("tier1", work.inputs, batches, _Tier1Actor, kwargs)

    def tier2(
        self, work: Work, todo: Mapping[str, tuple[str, ...]]
    ) -> Iterator[list[dict[str, Any]]]:
        order = storage_order(work.inputs, todo)
        batches = [_Batch(i, tuple(ids), tuple(work.formats[k] for k in ids),
                          tuple(todo[k] for k in ids))
                   for i, ids in enumerate(tier2_batches(order))]  # fmt: skip
        ions = sorted({i for v in todo.values() for i in v})
        kwargs = {"blobs": {i: self._ref(i) for i in ions},
                  "idents": {i: model_ident(work.models[i]) for i in ions},
                  "max_sites": work.max_sites}  # fmt: skip
        return self._run("tier2", work.inputs, batches, _Tier2Actor, kwargs)

    def _run(
        self, tier: str, inputs: Path, batches: Sequence[_Batch], actor: type[_Actor],
        kwargs: dict[str, Any],
    ) -> Iterator[list[dict[str, Any]]]:  # fmt: skip
        """Read -> actor pool -> this driver, streaming: records arrive as batches finish."""
        import ray.data

        if not batches:
            return
        actors = self._pool(len(batches))
        self.workers = max(self.workers, actors)
        tasks = self.settings.read_tasks or 2 * actors
        source = _make_source(str(Path(inputs).resolve()), batches, tasks)
        # Reads take no CPU slot: the actors hold every core, and a read that waited for one
        # would wait for ever (reads are I/O and decompression, a small share of the work).
        ray.data.DataContext.get_current().enable_progress_bars = self.progress
        reads = ray.data.TaskPoolStrategy(size=min(tasks, actors))
        ds = ray.data.read_datasource(source, num_cpus=0, compute=reads)
        ds = ds.map_batches(actor, fn_constructor_kwargs=kwargs, batch_size=1,
                            batch_format="pyarrow", num_cpus=1,
                            compute=ray.data.ActorPoolStrategy(size=actors))  # fmt: skip
        stats = self._stats.setdefault(tier, {})
        for out in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in out.to_pylist():
                s = stats.setdefault(row["worker"], _WorkerStats())
                s.structures += row["n"]
                s.batches += 1
                s.busy_seconds += row["seconds"]
                s.load_seconds = row["load_seconds"]
                yield json.loads(row["lines"])

    def report(self) -> dict[str, Any]:
        """The summary's ``engine``: the cluster, the pool size and per-worker throughput."""
        per_worker = {
            tier: [{"worker": name, "structures": s.structures, "batches": s.batches,
                    "busy_seconds": round(s.busy_seconds, 3),
                    "structures_per_second": (round(s.structures / s.busy_seconds, 2)
                                              if s.busy_seconds > 0 else None),
                    "load_seconds": s.load_seconds}
                   for name, s in sorted(workers.items())]
            for tier, workers in self._stats.items()
        }  # fmt: skip
        return {"name": "ray", "address": self._address, "workers": self.workers,
                "per_worker": per_worker}  # fmt: skip


# =============================================================================== entry point
def run_screen_ray(
    inputs: Path,
    ions: Sequence[str],
    blobs: Mapping[str, bytes],
    out_csv: Path,
    summary_json: Path,
    settings: RaySettings | None = None,
    models: Mapping[str, VoltageModel] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """``run_screen`` on Ray: same arguments and outputs (``workers`` aside), the models given as
    checkpoint bytes (``checkpoint_blobs``). ``models``: the driver's copies, when already read
    from those bytes (else read here)."""
    require_ray()
    models = dict(models) if models is not None else {i: model_from_bytes(blobs[i]) for i in ions}
    with RayEngine(blobs, settings or RaySettings(), kwargs.get("progress", True)) as engine:
        return run_screen(inputs, ions, models, out_csv, summary_json, engine=engine,
                          **kwargs)  # fmt: skip
