"""Load shedding, end to end: a burst far above the limits is answered at once, never queued.

A real ``bentoml serve`` (1 worker, tiny real models) with small limits: at most
``VOLTAGE_MAX_QUEUE=4`` structures admitted at once (beyond: 503 ``overloaded``) and BentoML's
``max_concurrency`` of 16 open HTTP requests (beyond: 429). A bounded burst of 160 concurrent
HTTP requests, then 80 concurrent gRPC calls, must get, every one of them, either a prediction
or a quick 429/503 (RESOURCE_EXHAUSTED) in the service's error shape with ``Retry-After``; the
server must then be healthy (``/healthz``, ``/readyz``, a normal prediction, the queue back to
zero), the shed requests counted by reason, and a real Prometheus must fire
``VoltageRequestsShed`` from the scraped counters. The burst figures (answered, shed, p99 of the
answered) are printed and written to ``burst.json`` in the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from serving import voltage_pb2 as pb
from serving import voltage_pb2_grpc as rpc
from tests.serving_fixtures import (
    REPO,
    MlflowStore,
    Server,
    http_json,
    served,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FIXTURE_CIF = (REPO / "tests" / "fixtures" / "CoO2.cif").read_text()
MAX_QUEUE = 4
MAX_CONCURRENCY = 16
HTTP_BURST = 160
GRPC_BURST = 80


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("overload")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Any:
    store = MlflowStore.published(workdir / "mlflow", {"Li": 1})
    with served(
        workdir, store, wait_ready=True, VOLTAGE_IONS="Li", VOLTAGE_WORKERS="1",
        VOLTAGE_RELOAD_INTERVAL="60", VOLTAGE_DRIFT_REFERENCE="",
        VOLTAGE_MAX_QUEUE=str(MAX_QUEUE), VOLTAGE_MAX_CONCURRENCY=str(MAX_CONCURRENCY),
        VOLTAGE_RETRY_AFTER_S="2",
    ) as srv:  # fmt: skip
        yield srv


def _post(url: str, body: bytes, rid: str) -> tuple[int, dict[str, Any], dict[str, str], float]:
    req = urllib.request.Request(
        url, data=body, method="POST",
        headers={"Content-Type": "application/json", "X-Request-ID": rid},
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, raw, headers = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        status, raw, headers = exc.code, exc.read(), exc.headers
    lower = {k.lower(): v for k, v in headers.items()}
    return status, json.loads(raw), lower, time.perf_counter() - t0


def _metric(server: Server, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http_json(f"{server.url}/metrics", method="GET")
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_bentoml_uses_the_services_traffic_answers() -> None:
    """The shims replace BentoML's 429/504 middlewares (a BentoML upgrade that moves them must
    fail here, not silently answer in BentoML's shape)."""
    from bentoml._internal.server.http import traffic

    import serving.service  # noqa: F401  (installs them)

    assert traffic.MaxConcurrencyMiddleware.__name__ == "ConcurrencyLimit"
    assert traffic.TimeoutMiddleware.__name__ == "TimeLimit"


def test_http_burst_is_shed_at_once_and_the_server_recovers(server, workdir) -> None:
    url = f"{server.url}/predict"
    body = json.dumps({"ion": "Li", "structure": FIXTURE_CIF}).encode()
    assert _post(url, body, "warm-up")[0] == 200
    gate = threading.Barrier(HTTP_BURST)

    def one(i: int) -> tuple[int, dict[str, Any], dict[str, str], float]:
        gate.wait(30)
        return _post(url, body, f"burst-{i}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(HTTP_BURST) as pool:
        answers = list(pool.map(one, range(HTTP_BURST)))
    wall = time.perf_counter() - t0

    answered = [a for a in answers if a[0] == 200]
    shed = [a for a in answers if a[0] in (429, 503)]
    assert len(answered) + len(shed) == HTTP_BURST, {a[0] for a in answers}
    assert answered and shed
    for i, (status, data, headers, _) in enumerate(answers):
        if status == 200:
            assert data["ion"] == "Li" and data["formula"] == "CoO2"
            continue
        kind = {429: "too_many_requests", 503: "overloaded"}[status]
        assert (data["kind"], data["status"]) == (kind, status), data
        assert data["request_id"] == headers["x-request-id"] == f"burst-{i}"
        assert headers["retry-after"] == "2"
    by_status = {s: sum(1 for a in shed if a[0] == s) for s in (429, 503)}
    latencies = np.array([a[3] for a in answered])
    # Shed at once: a refusal never waits behind the queue the admitted requests wait in.
    assert np.median([a[3] for a in shed]) < latencies.max()
    figures = {
        "burst": HTTP_BURST, "answered": len(answered), "shed": len(shed),
        "shed_429": by_status[429], "shed_503": by_status[503],
        "answered_p50_s": round(float(np.percentile(latencies, 50)), 3),
        "answered_p99_s": round(float(np.percentile(latencies, 99)), 3),
        "shed_max_s": round(max(a[3] for a in shed), 3), "wall_s": round(wall, 2),
        "max_queue": MAX_QUEUE, "max_concurrency": MAX_CONCURRENCY,
    }  # fmt: skip
    print(f"\nHTTP burst: {json.dumps(figures)}")
    (workdir / "burst.json").write_text(json.dumps({"http": figures}, indent=1))

    # Healthy afterwards: probes, a normal prediction, nothing left queued, sheds counted.
    assert http_json(f"{server.url}/healthz", method="GET")[0] == 200
    assert http_json(f"{server.url}/readyz", method="GET")[0] == 200
    assert _post(url, body, "after")[0] == 200
    wait_until(lambda: _metric(server, "voltage_queue_items") == 0, 10, what="queue drained")
    assert _metric(server, "voltage_requests_shed_total", protocol="http") == len(shed)
    assert _metric(server, "voltage_requests_shed_total", reason="queue") == by_status[503]
    assert _metric(server, "voltage_requests_shed_total", reason="concurrency") == by_status[429]
    assert _metric(server, "voltage_errors_total", kind="overloaded") == by_status[503]
    assert _metric(server, "voltage_requests_total", status="unavailable") == len(shed)


def test_open_requests_beyond_max_concurrency_get_429(server) -> None:
    """Slow uploads hold BentoML's slots (the queue never sees them): the next request gets
    BentoML's 429, in the service's shape with Retry-After; freeing the slots recovers."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    held = []
    try:
        for _ in range(MAX_CONCURRENCY):
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 1000\r\n\r\n{\"ion\": ")  # fmt: skip
            held.append(sock)
        body = json.dumps({"ion": "Li", "structure": FIXTURE_CIF}).encode()

        def refused() -> tuple[int, dict[str, Any], dict[str, str], float] | None:
            answer = _post(f"{server.url}/predict", body, "over-the-limit")
            return answer if answer[0] == 429 else None

        _, data, headers, _ = wait_until(refused, 20, what="a 429")
        assert data == {"error": data["error"], "kind": "too_many_requests", "status": 429,
                        "request_id": "over-the-limit"}  # fmt: skip
        assert headers["retry-after"] == "2" and headers["x-request-id"] == "over-the-limit"
        assert http_json(f"{server.url}/healthz", method="GET")[0] == 200  # probes bypass it
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _post(f"{server.url}/predict", body, "freed")[0] == 200, 30,
               what="answers again once the slow uploads are gone")  # fmt: skip
    assert _metric(server, "voltage_requests_shed_total", reason="concurrency") >= 1
    assert _metric(server, "voltage_errors_total", kind="too_many_requests") >= 1


def test_grpc_burst_gets_resource_exhausted_with_a_retry_delay(server, workdir) -> None:
    gate = threading.Barrier(GRPC_BURST)
    channel = grpc.insecure_channel(server.grpc_target)
    stub = rpc.VoltageServiceStub(channel)
    request = pb.PredictRequest(ion="Li", structure=FIXTURE_CIF)

    def one(i: int) -> tuple[str, float, dict[str, Any]]:
        gate.wait(30)
        t0 = time.perf_counter()
        try:
            _, call = stub.Predict.with_call(request, metadata=(("x-request-id", f"g-{i}"),),
                                             timeout=120)  # fmt: skip
            md = dict(call.trailing_metadata() or ())
            return "OK", time.perf_counter() - t0, md
        except grpc.RpcError as err:
            md = dict(err.trailing_metadata() or ())
            return err.code().name, time.perf_counter() - t0, md

    try:
        with ThreadPoolExecutor(GRPC_BURST) as pool:
            answers = list(pool.map(one, range(GRPC_BURST)))
        ok_after = stub.Predict(request, timeout=60)
    finally:
        channel.close()
    codes = {code for code, _, _ in answers}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"} and "RESOURCE_EXHAUSTED" in codes, codes
    for i, (code, _, md) in enumerate(answers):
        assert md["x-request-id"] == f"g-{i}"
        if code == "RESOURCE_EXHAUSTED":
            err = pb.Error.FromString(md["voltage-error-bin"])
            assert (err.kind, err.http_status, err.request_id) == ("overloaded", 503, f"g-{i}")
            assert md["retry-after"] == "2" and md["grpc-retry-pushback-ms"] == "2000"
    answered = [s for code, s, _ in answers if code == "OK"]
    shed_s = [s for code, s, _ in answers if code != "OK"]
    assert np.median(shed_s) < max(answered)  # refused at once, not after waiting in the queue
    figures = {"burst": GRPC_BURST, "answered": len(answered), "shed": GRPC_BURST - len(answered),
               "answered_p99_s": round(float(np.percentile(answered, 99)), 3)}  # fmt: skip
    print(f"\ngRPC burst: {json.dumps(figures)}")
    saved = json.loads((workdir / "burst.json").read_text()) if (workdir / "burst.json").exists(
    ) else {}  # fmt: skip
    (workdir / "burst.json").write_text(json.dumps({**saved, "grpc": figures}, indent=1))
    assert ok_after.formula == "CoO2"
    assert _metric(server, "voltage_requests_shed_total", protocol="grpc") == figures["shed"]


def test_prometheus_fires_requests_shed(server, tmp_path) -> None:
    import importlib.util
    import sys

    name = "monitoring_promtest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "monitoring" / "promtest.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    promtest = sys.modules[name]
    if promtest.prometheus_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus not installed; CI must run monitoring/setup_prometheus.sh")
        pytest.skip("prometheus not installed (monitoring/setup_prometheus.sh)")
    target = server.url.removeprefix("http://")
    with promtest.run_prometheus(None, tmp_path, target, for_override="1s") as prom:
        prom.wait_for_query("sum(voltage_requests_shed_total)", lambda v: bool(v) and v[0] > 0,
                            timeout=30)  # fmt: skip
        # The counters jumped before Prometheus's first scrape: a few more sheds give rate().
        body = json.dumps({"ion": "Li", "structure": FIXTURE_CIF}).encode()
        gate = threading.Barrier(40)

        def one(i: int) -> int:
            gate.wait(30)
            return _post(f"{server.url}/predict", body, f"p-{i}")[0]

        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            with ThreadPoolExecutor(40) as pool:
                list(pool.map(one, range(40)))
            firing = [a for a in prom.alerts() if a["labels"].get("alertname")
                      == "VoltageRequestsShed" and a["state"] == "firing"]  # fmt: skip
            if firing:
                break
            gate.reset()
            time.sleep(2)
        assert firing, prom.alerts()
