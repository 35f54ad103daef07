"""Serving latency and throughput: the BentoML service (HTTP, gRPC) vs ``mlflow models serve``.

Same registered model, same structures, same client, one server at a time on 127.0.0.1 (so the
servers never compete for the 2 cores; the client shares them). For each server:

* concurrency 1: ``--n1`` sequential single-structure requests -> p50 / p99 latency;
* concurrency 8: ``--n8`` single-structure requests from 8 concurrent clients -> p50 / p99 and
  throughput (structures/s; the service batches concurrent requests adaptively);
* the service's ``/predict_batch`` (``--batch`` structures per call) -> throughput.

Usage::

    python bench/serving_bench.py                       # tiny-registry with a full-size model
    python bench/serving_bench.py --workers 2 --format json --out reports/serving_bench.json
    python bench/serving_bench.py --tracking-uri sqlite:///work/mlflow/mlflow.db --ion Li

By default a temporary MLflow store gets one Li model with the architecture of ``params.yaml``
(untrained weights: speed does not depend on them) and 5 ensemble heads; structures are the
first Li charged structures of ``data/clean/records.jsonl.gz`` (synthetic ones if absent).
``mlflow models serve`` runs with ``--env-manager local`` and, by default, both with its own
default threading and with ``OMP_NUM_THREADS=1`` (the setting the service uses).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/serving_bench.py` without installing
    sys.path.insert(0, str(ROOT))


@dataclass
class Result:
    server: str
    protocol: str
    scenario: str
    requests: int
    structures: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float = float("nan")

    @property
    def throughput(self) -> float:
        return self.structures / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_ms_per_structure(self) -> float:
        """Server CPU (all its processes) per structure: what the server costs, whatever
        else runs on the machine (wall-clock figures on a shared box are not)."""
        return 1000 * self.server_cpu_s / self.structures if self.structures else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def drive(
    call: Callable[[int], Awaitable[int]], n: int, concurrency: int
) -> tuple[list[float], int, float, int]:
    """Run ``n`` calls with ``concurrency`` workers; (latencies s, errors, wall s, structures)."""
    latencies: list[float] = []
    errors = 0
    structures = 0
    counter = iter(range(n))

    async def worker() -> None:
        nonlocal errors, structures
        for i in counter:
            t0 = time.perf_counter()
            try:
                done = await call(i)  # not `structures += await ...`: that reads before awaiting
                structures += done
            except Exception:
                errors += 1
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors, time.perf_counter() - t0, structures


def _result(server: str, proto: str, scen: str, n: int, out: tuple, cpu: float) -> Result:
    lat, errors, wall, structures = out
    return Result(
        server, proto, scen, n, structures, errors, wall,
        percentile(lat, 50) * 1000, percentile(lat, 99) * 1000, cpu,
    )  # fmt: skip


class CpuMeter:
    """CPU seconds used so far by a process and all its descendants (workers included)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)

    def __call__(self) -> float:
        import psutil

        total = 0.0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total


async def measure(
    label: str, proto: str, scen: str, call: Callable[[int], Awaitable[int]], n: int,
    concurrency: int, cpu: CpuMeter,
) -> Result:  # fmt: skip
    c0 = cpu()
    out = await drive(call, n, concurrency)
    return _result(label, proto, scen, n, out, cpu() - c0)


# ------------------------------------------------------------------------------ inputs
def load_texts(n: int, fmt: str, ion: str) -> list[str]:
    """Structure texts of real charged structures (or synthetic ones) in ``fmt``."""
    from pymatgen.core import Structure
    from pymatgen.io.cif import CifWriter

    from tests.serving_fixtures import sample_structures

    path = ROOT / "data/clean/records.jsonl.gz"
    structures = []
    if path.is_file():
        with gzip.open(path, "rt") as fh:
            for line in fh:
                row = json.loads(line)
                if row["working_ion"] == ion:
                    structures.append(Structure.from_dict(row["charged_structure"]))
                if len(structures) >= n:
                    break
    if not structures:
        structures = sample_structures(n)
    if fmt == "cif":
        return [str(CifWriter(s)) for s in structures]
    if fmt == "poscar":
        return [s.to(fmt="poscar") for s in structures]
    return [json.dumps(s.as_dict()) for s in structures]


# ------------------------------------------------------------------------------ clients
async def bench_bento_http(
    url: str, args: argparse.Namespace, texts: list[str], cpu: CpuMeter
) -> list[Result]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=120)
    ) as session:

        async def one(i: int) -> int:
            body = {"ion": args.ion, "structure": texts[i % len(texts)], "format": args.format}
            async with session.post(f"{url}/predict", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(resp.status)
            return 1

        async def batch(i: int) -> int:
            items = [
                {"ion": args.ion, "structure": texts[(i * args.batch + k) % len(texts)],
                 "format": args.format}
                for k in range(args.batch)
            ]  # fmt: skip
            async with session.post(f"{url}/predict_batch", json=items) as resp:
                data = await resp.json()
                if resp.status != 200 or not all(r["ok"] for r in data):
                    raise RuntimeError(resp.status)
            return len(items)

        await drive(one, 20, 2)  # warm-up
        out.append(await measure("bentoml", "http", "c1", one, args.n1, 1, cpu))
        out.append(await measure("bentoml", "http", "c8", one, args.n8, 8, cpu))
        nb = max(1, args.n8 // args.batch)
        out.append(await measure("bentoml", "http", f"batch{args.batch} c2", batch, nb, 2, cpu))
    return out


async def bench_bento_grpc(
    target: str, args: argparse.Namespace, texts: list[str], cpu: CpuMeter
) -> list[Result]:
    import grpc

    from serving import voltage_pb2 as pb
    from serving import voltage_pb2_grpc as rpc

    out = []
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = rpc.VoltageServiceStub(channel)

        async def one(i: int) -> int:
            await stub.Predict(
                pb.PredictRequest(
                    ion=args.ion, structure=texts[i % len(texts)], format=args.format
                ),
                timeout=120,
            )
            return 1

        async def batch(i: int) -> int:
            items = [
                pb.PredictRequest(ion=args.ion, structure=texts[(i * args.batch + k) % len(texts)],
                                  format=args.format)
                for k in range(args.batch)
            ]  # fmt: skip
            resp = await stub.PredictBatch(pb.PredictBatchRequest(items=items), timeout=120)
            if any(r.WhichOneof("outcome") != "prediction" for r in resp.results):
                raise RuntimeError("batch item failed")
            return len(items)

        await drive(one, 20, 2)
        out.append(await measure("bentoml", "grpc", "c1", one, args.n1, 1, cpu))
        out.append(await measure("bentoml", "grpc", "c8", one, args.n8, 8, cpu))
        nb = max(1, args.n8 // args.batch)
        out.append(await measure("bentoml", "grpc", f"batch{args.batch} c2", batch, nb, 2, cpu))
    return out


async def bench_mlflow(
    url: str, label: str, args: argparse.Namespace, texts: list[str], cpu: CpuMeter
) -> list[Result]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=300)
    ) as session:

        async def one(i: int) -> int:
            body = {
                "dataframe_split": {
                    "columns": ["structure", "format"],
                    "data": [[texts[i % len(texts)], args.format]],
                }
            }
            async with session.post(f"{url}/invocations", json=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(resp.status)
            return 1

        await drive(one, 10, 1)
        out.append(await measure(label, "http", "c1", one, args.n1, 1, cpu))
        out.append(await measure(label, "http", "c8", one, args.n8, 8, cpu))
    return out


# ------------------------------------------------------------------------------ servers
def make_store(tmp: Path, ion: str) -> Any:
    from tests.serving_fixtures import MlflowStore, build_checkpoint
    from training.config import load_params
    from voltage_model.models.cgcnn import CGCNNConfig

    config = CGCNNConfig(**load_params(ROOT / "params.yaml").model.model_dump())
    store = MlflowStore.create(tmp / "mlflow")
    with store.active():
        ckpt = build_checkpoint(tmp / "bench.pt", ion, 0, config=config, n_heads=5)
        store.publish(ion, 0, checkpoint=ckpt)
    return store


def run_bento(
    tmp: Path, env: dict[str, str], args: argparse.Namespace, texts: list[str]
) -> list[Result]:
    from tests.serving_fixtures import start_bento

    server = start_bento(tmp, env, wait_ready=True, ready_timeout=180)
    try:
        cpu = CpuMeter(server.process.pid)
        results = asyncio.run(bench_bento_http(server.url, args, texts, cpu))
        results += asyncio.run(bench_bento_grpc(server.grpc_target, args, texts, cpu))
    finally:
        server.stop()
    return results


def run_mlflow(
    tmp: Path, env: dict[str, str], label: str, args: argparse.Namespace, texts: list[str]
) -> list[Result]:
    from tests.serving_fixtures import (
        VENV_BIN,
        Server,
        free_port,
        http_json,
        start_process,
        wait_until,
    )  # fmt: skip

    port = free_port()
    model_uri = f"models:/{args.prefix}-{args.ion}@champion"
    cmd = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
        "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    log = tmp / f"mlflow-{port}.log"
    server = Server(start_process(cmd, env, log), f"http://127.0.0.1:{port}", log)
    try:
        wait_until(
            lambda: http_json(f"{server.url}/ping", method="GET", timeout=2)[0] == 200,
            180, 0.5, what="mlflow models serve",
        )  # fmt: skip
        cpu = CpuMeter(server.process.pid)
        return asyncio.run(bench_mlflow(server.url, label, args, texts, cpu))
    finally:
        server.stop()


def table(results: list[Result]) -> str:
    head = f"{'server':<22}{'proto':<6}{'scenario':<14}{'n':>6}{'err':>5}"
    head += f"{'p50 ms':>9}{'p99 ms':>9}{'struct/s':>10}{'cpu ms/st':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.server:<22}{r.protocol:<6}{r.scenario:<14}{r.requests:>6}{r.errors:>5}"
            f"{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.throughput:>10.1f}{r.cpu_ms_per_structure:>11.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ion", default="Li")
    ap.add_argument("--prefix", default="electrode-voltage")
    ap.add_argument("--format", default="cif", choices=["cif", "poscar", "json"])
    ap.add_argument("--n1", type=int, default=200, help="requests at concurrency 1")
    ap.add_argument("--n8", type=int, default=400, help="requests at concurrency 8")
    ap.add_argument("--batch", type=int, default=32, help="structures per /predict_batch call")
    ap.add_argument("--structures", type=int, default=64, help="distinct structures cycled")
    ap.add_argument("--workers", type=int, default=1, help="BentoML workers (VOLTAGE_WORKERS)")
    ap.add_argument("--tracking-uri", default=None, help="existing store (default: temporary)")
    ap.add_argument(
        "--mlflow-threads", default="both", choices=["both", "default", "one"],
        help="mlflow models serve with its default torch threads, OMP_NUM_THREADS=1, or both",
    )  # fmt: skip
    ap.add_argument("--skip-mlflow", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = ap.parse_args(argv)

    from tests.serving_fixtures import serve_env

    texts = load_texts(args.structures, args.format, args.ion)
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.tracking_uri:
            store_env = {"MLFLOW_TRACKING_URI": args.tracking_uri}
        else:
            store_env = make_store(tmp, args.ion).env
        base = serve_env(tmp / "bentoml_home", None, **store_env)
        bento_env = {
            **base, "VOLTAGE_IONS": args.ion, "VOLTAGE_WORKERS": str(args.workers),
            "VOLTAGE_DRIFT_REFERENCE": "", "VOLTAGE_RELOAD_INTERVAL": "60",
        }  # fmt: skip
        results = run_bento(tmp, bento_env, args, texts)
        if not args.skip_mlflow:
            if args.mlflow_threads in ("both", "default"):
                env = {k: v for k, v in base.items() if k != "OMP_NUM_THREADS"}
                results += run_mlflow(tmp, env, "mlflow (default thr)", args, texts)
            if args.mlflow_threads in ("both", "one"):
                results += run_mlflow(tmp, base, "mlflow (OMP=1)", args, texts)
    print(f"format={args.format} workers={args.workers} cpus={os.cpu_count()} "
          f"structures={len(texts)}")  # fmt: skip
    print(table(results))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                **asdict(r),
                "throughput": r.throughput,
                "cpu_ms_per_structure": r.cpu_ms_per_structure,
            }
            for r in results
        ]
        args.out.write_text(
            json.dumps(
                {"args": vars(args) | {"out": str(args.out)}, "results": rows},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
