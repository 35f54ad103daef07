"""Serving latency and batch throughput: CGCNN-only vs CHGNet-serving champions, side by side.

Why a bench of its own: ``bench/serving_bench.py`` compares servers (BentoML HTTP/gRPC against
``mlflow models serve``) for one model; the question here (issue 16.3) is what a CHGNet head
costs the service, so the server is left out and the service's own request path is timed, in one
process, for the three kinds of artifact an ion may serve:

* ``cgcnn``: the checkpoint as given (the CGCNN ensemble);
* ``cgcnn+chgnet``: the same plus a CHGNet GP head with share 0.5 (``bench/chgnet_artifact.py``);
* ``chgnet``: the CHGNet head alone (share 1; the CGCNN part is not run).

For each: ``Predictor.predict_sync`` on one structure of ~``--sites`` sites, ``--n1`` times
(p50/p95 ms and CPU ms per request), then ``--n-batch`` distinct structures as concurrent
``Predictor.predict`` calls (``--concurrency``) through the micro-batcher (structures/s, mean
batch size), then the single structure's time split into its steps (parse, CGCNN graph, CHGNet
graph, CHGNet forward, CGCNN ensemble, CHGNet GP head + blend; medians over ``--reps``).
Ratios to ``cgcnn`` come from the same run. Torch runs with ``--threads`` intra-op threads (the
service: ``VOLTAGE_TORCH_THREADS``, default 1).

Usage::

    python bench/chgnet_latency.py                                 # Mg, ~30 sites, 1 thread
    python bench/chgnet_latency.py --threads 2 --out reports/bench/chgnet_latency.json

Shared machines: wall-clock figures depend on what else runs; CPU ms per request does not
(much), and the 1-minute load average is printed before each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KINDS = {"cgcnn": None, "cgcnn+chgnet": 0.5, "chgnet": 1.0}


@dataclass
class KindResult:
    kind: str
    load_avg: float
    p50_ms: float
    p95_ms: float
    cpu_ms_per_request: float
    batch_structures: int
    batch_seconds: float
    batch_cpu_s: float
    mean_batch: float
    steps_ms: dict[str, float] = field(default_factory=dict)

    @property
    def batch_throughput(self) -> float:
        return self.batch_structures / self.batch_seconds if self.batch_seconds > 0 else 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# ------------------------------------------------------------------------------ inputs
def structures(sites: int, n: int) -> list[tuple[str, int]]:
    """(CIF text, sites) of distinct snapshot charged structures with ``sites`` +- 4 sites,
    closest first (any ion's: the model does not care whose)."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    path = ROOT / "data/clean/records.jsonl.gz"
    found, seen = [], set()
    with gzip.open(path, "rt") as fh:
        for line in fh:
            row = json.loads(line)
            d = row["charged_structure"]
            if abs(len(d["sites"]) - sites) <= 4 and row["charged_id"] not in seen:
                seen.add(row["charged_id"])
                found.append(Structure.from_dict(d))
    if len(found) < n:
        raise SystemExit(f"only {len(found)} structures of {sites} +- 4 sites in {path}")
    found.sort(key=lambda s: abs(len(s) - sites))
    return [(str(CifWriter(s)), len(s)) for s in found[:n]]


def artifacts(checkpoint: Path, ion: str, tmp: Path) -> dict[str, Path]:
    from chgnet_artifact import build

    out = {}
    for kind, weight in KINDS.items():
        out[kind] = checkpoint if weight is None else build(checkpoint, ion, weight,
                                                            tmp / f"{kind}.pt")  # fmt: skip
    return out


# ------------------------------------------------------------------------------ predictor
def predictor_for(path: Path, ion: str) -> Any:
    from prometheus_client import CollectorRegistry

    from serving.config import ServingConfig
    from serving.metrics import ServiceMetrics
    from serving.models import ServedModel
    from serving.predictor import Predictor
    from voltage_model.predict import VoltageModel

    config = ServingConfig(ions=(ion,), drift_reference=None, records_path=None,
                           local_voltage_dir=None)  # fmt: skip
    pred = Predictor(config, ServiceMetrics(CollectorRegistry(), config.ions)).start()
    served = ServedModel(ion, VoltageModel.from_checkpoint(path), f"bench-{ion}", 1, "registry")
    pred.set_model(ion, served)
    pred.warm(served)
    return pred


def single(pred: Any, ion: str, text: str, n: int) -> tuple[list[float], float]:
    """Latencies (s) of ``n`` sequential requests, and CPU s per request."""
    from serving.predictor import PredictRequest

    req = PredictRequest(ion=ion, structure=text, format="cif")
    for _ in range(3):
        pred.predict_sync(req)
    lat, c0 = [], time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        pred.predict_sync(req)
        lat.append(time.perf_counter() - t0)
    return lat, (time.process_time() - c0) / n


async def _concurrent(pred: Any, ion: str, texts: list[str], concurrency: int) -> None:
    from serving.predictor import PredictRequest

    todo = iter(texts)

    async def worker() -> None:
        for text in todo:
            await pred.predict(PredictRequest(ion=ion, structure=text, format="cif"))

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def batched(pred: Any, ion: str, texts: list[str], concurrency: int) -> tuple[float, float, float]:
    """(wall s, CPU s, mean micro-batch size) of ``texts`` as concurrent requests."""
    b0, i0 = pred.batcher.batches, pred.batcher.items
    c0, t0 = time.process_time(), time.perf_counter()
    asyncio.run(_concurrent(pred, ion, texts, concurrency))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    batches = pred.batcher.batches - b0
    return wall, cpu, (pred.batcher.items - i0) / batches if batches else 0.0


# ------------------------------------------------------------------------------ steps
def _median_ms(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def steps(pred: Any, ion: str, text: str, reps: int) -> dict[str, float]:
    """Median ms of each step of one request, as ``prepare`` + ``predict_graphs`` run them."""
    import torch

    from serving.inputs import to_structure
    from voltage_model.graphs.batch import collate

    vm = pred.model_for(ion).model
    loaded = vm.loaded
    s = to_structure(text, "cif", 500)
    out = {"parse": _median_ms(lambda: to_structure(text, "cif", 500), reps)}
    if loaded.needs_graphs:
        out["cgcnn_graph"] = _median_ms(lambda: vm.converter.convert(s), reps)
        batch = collate([vm.converter.convert(s)], vm.converter, vm.encoding)
        with torch.inference_mode():
            out["cgcnn_ensemble"] = _median_ms(lambda: loaded.predict_with_std(batch), reps)
    if loaded.needs_chgnet:
        from voltage_model.models.chgnet_backbone import graph_features, to_graph

        out["chgnet_graph"] = _median_ms(lambda: to_graph(s), reps)
        g = to_graph(s)
        out["chgnet_forward"] = _median_ms(lambda: graph_features([g]), reps)
        feats = torch.from_numpy(graph_features([g]))
        with torch.inference_mode():
            out["gp_head_blend"] = _median_ms(lambda: loaded.chgnet.mean_std(feats), reps)
    return out


# ------------------------------------------------------------------------------ report
def run_kind(kind: str, path: Path, args: argparse.Namespace, inputs: list) -> KindResult:
    load = os.getloadavg()[0]
    pred = predictor_for(path, args.ion)
    try:
        lat, cpu = single(pred, args.ion, inputs[0][0], args.n1)
        texts = [t for t, _ in inputs[1:]]
        wall, bcpu, mean_batch = batched(pred, args.ion, texts, args.concurrency)
        step_ms = steps(pred, args.ion, inputs[0][0], args.reps)
    finally:
        pred.stop()
    return KindResult(kind, load, 1000 * percentile(lat, 50), 1000 * percentile(lat, 95),
                      1000 * cpu, len(texts), wall, bcpu, mean_batch, step_ms)  # fmt: skip


def table(results: list[KindResult], target_ms: float) -> str:
    base = results[0]
    head = (f"{'kind':<14}{'p50 ms':>9}{'p95 ms':>9}{'cpu ms/req':>12}{'x p50':>7}"
            f"{'batch st/s':>12}{'x st/s':>8}{'mean batch':>12}{'load':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.kind:<14}{r.p50_ms:>9.1f}{r.p95_ms:>9.1f}{r.cpu_ms_per_request:>12.1f}"
            f"{r.p50_ms / base.p50_ms:>7.2f}{r.batch_throughput:>12.1f}"
            f"{r.batch_throughput / base.batch_throughput:>8.2f}{r.mean_batch:>12.1f}"
            f"{r.load_avg:>6.2f}"
        )
    lines.append(f"target: p50 <= {target_ms:.0f} ms for one structure")
    for r in results:
        split = ", ".join(f"{k} {v:.1f}" for k, v in r.steps_ms.items())
        lines.append(f"  steps of {r.kind} (median ms): {split}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=ROOT / "models/ions/Mg.pt")
    ap.add_argument("--ion", default="Mg")
    ap.add_argument("--sites", type=int, default=30, help="size of the single structure")
    ap.add_argument("--n1", type=int, default=40, help="sequential single requests")
    ap.add_argument("--n-batch", type=int, default=64, help="concurrent requests (distinct)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15, help="repetitions per step timing")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--target-ms", type=float, default=150.0)
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from voltage_model.numerics import flush_subnormals

    flush_subnormals()  # as the service does, before torch's first op
    torch.set_num_threads(args.threads)
    inputs = structures(args.sites, args.n_batch + 1)
    with tempfile.TemporaryDirectory(prefix="chgnet-latency-") as tmp:
        paths = artifacts(args.checkpoint, args.ion, Path(tmp))
        results = [run_kind(kind, path, args, inputs) for kind, path in paths.items()]
    print(f"ion={args.ion} single structure: {inputs[0][1]} sites; batch: {args.n_batch} "
          f"structures of {args.sites} +- 4 sites, concurrency {args.concurrency}; torch threads "
          f"{args.threads}; {os.cpu_count()} CPUs")  # fmt: skip
    print(table(results, args.target_ms))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) | {"batch_throughput": r.batch_throughput} for r in results]
        args.out.write_text(json.dumps({"args": vars(args), "results": rows}, indent=2,
                                       default=str))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
