"""Traceable logs: JSON lines with request ids, a prediction log, drift over all workers.

In-process: the JSON formatter, request-id hygiene, the access line, the prediction log (one
file per process, rotated; the structure hash does not depend on the input format).

Against a real ``bentoml serve`` with **2 workers**, a drift reference and
``VOLTAGE_PREDICTION_LOG`` set:

* every line the ``serving`` loggers write is one JSON object; each API request (HTTP and gRPC)
  has exactly one ``request`` line with its request id, ion, model version, status, latency and
  error kind; an error body's ``request_id`` (= the ``X-Request-ID`` header, or the gRPC
  ``x-request-id`` trailing metadata) finds that line;
* each worker writes its own prediction log file; its lines carry the request ids of the access
  log and the same hash for one crystal sent as CIF and as POSCAR;
* the drift gauges on ``/metrics`` describe both workers' windows together: recomputed offline
  from the prediction log (every prediction, both files), PSI, site PSI and the unseen share are
  the scraped values.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from serving import logs
from serving import voltage_pb2 as pb
from serving import voltage_pb2_grpc as rpc
from serving.drift import DriftWindow, load_reference
from serving.predlog import PredictionLog, structure_hash, worker_path
from tests.serving_fixtures import (
    REPO,
    MlflowStore,
    Server,
    cif,
    http_json,
    perovskite,
    rocksalt,
    sample_structures,
    served,
    wait_until,
    write_drift_reference,
)

FIXTURE_CIF = (REPO / "tests" / "fixtures" / "CoO2.cif").read_text()


# ------------------------------------------------------------------------------ in-process
def test_json_formatter_carries_the_request_id_and_extra_fields() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    log = logging.getLogger("serving.test_logs")
    ctx = logs.RequestContext("rid-1", "http", "predict")
    try:
        with logs.bound(ctx):
            log.info("hello %s", "world", extra={"answer": 42})
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
        log.info("outside")
    finally:
        logs.configure("INFO", "json")  # back to stderr
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [ln["request_id"] for ln in lines] == ["rid-1", "rid-1", None]
    assert lines[0]["message"] == "hello world" and lines[0]["answer"] == 42
    assert lines[0]["logger"] == "serving.test_logs" and lines[0]["level"] == "INFO"
    assert "ValueError: boom" in lines[1]["exc"] and lines[1]["ts"].endswith("+00:00")


def test_request_ids_are_kept_only_when_they_look_like_ids() -> None:
    assert logs.request_id_from("abc-123_x.y") == "abc-123_x.y"
    for bad in (None, "", "a b", 'x"}', "x" * 200, "\n"):
        rid = logs.request_id_from(bad)
        assert len(rid) == 32 and rid.isalnum()


def test_access_line_names_the_request() -> None:
    stream = io.StringIO()
    logs.configure("INFO", "json", stream=stream)
    try:
        ctx = logs.RequestContext("rid-2", "grpc", "predict_batch", items=3)
        ctx.note_prediction("Li", 2)
        ctx.note_prediction("Mg", 1)
        ctx.note_error("parse")
        logs.access_line(ctx, "OK", method="PredictBatch")
    finally:
        logs.configure("INFO", "json")
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert line["event"] == "request" and line["request_id"] == "rid-2"
    assert (line["ion"], line["model_version"], line["items"]) == (["Li", "Mg"], [2, 1], 3)
    assert (line["status"], line["error_kind"], line["method"]) == ("OK", "parse", "PredictBatch")
    assert line["latency_ms"] >= 0


def test_prediction_log_is_one_rotated_file_per_process(tmp_path) -> None:
    path = tmp_path / "preds" / "predictions.jsonl"
    assert worker_path(path, "w3") == tmp_path / "preds" / "predictions.w3.jsonl"
    log = PredictionLog(path, max_bytes=2000, backups=2)
    try:
        for i in range(40):
            log.write({"request_id": f"r{i}", "voltage": 3.0 + i})
    finally:
        log.close()
    files = sorted(p.name for p in (tmp_path / "preds").iterdir())
    assert log.path.name.startswith("predictions.p") and log.path.name in files
    assert f"{log.path.name}.1" in files and f"{log.path.name}.3" not in files  # 2 backups
    last = [json.loads(x) for x in log.path.read_text().splitlines()]
    assert last[-1]["request_id"] == "r39" and "ts" in last[-1]


def test_structure_hash_does_not_depend_on_the_input_format() -> None:
    from pymatgen.core import Structure

    from serving.inputs import to_structure
    from serving.openapi import JSON_EXAMPLE, POSCAR_EXAMPLE

    a = to_structure(FIXTURE_CIF, "cif", 500)
    b = to_structure(POSCAR_EXAMPLE, "poscar", 500)
    c = to_structure(JSON_EXAMPLE, "json", 500)
    assert structure_hash(a) == structure_hash(b) == structure_hash(c)
    other = Structure.from_str(cif(rocksalt()), fmt="cif")
    assert structure_hash(other) != structure_hash(a)


# ------------------------------------------------------------------------------ a real server
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def server(workdir: Path) -> Any:
    store = MlflowStore.published(workdir / "mlflow", {"Li": 1, "Mg": 2})
    with served(
        workdir, store, VOLTAGE_IONS="Li,Mg", VOLTAGE_WORKERS="2", VOLTAGE_RELOAD_INTERVAL="60",
        VOLTAGE_DRIFT_REFERENCE=str(write_drift_reference(workdir / "ref.json", ["Li", "Mg"])),
        VOLTAGE_PREDICTION_LOG=str(workdir / "predictions" / "predictions.jsonl"),
    ) as srv:  # fmt: skip
        wait_until(lambda: len(_lines(srv, "gRPC server listening")) >= 2, 60, what="both workers")
        yield srv


def _json_lines(server: Server) -> list[dict[str, Any]]:
    out = []
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))  # a serving line that is not JSON fails here
    return out


def _lines(server: Server, message: str) -> list[dict[str, Any]]:
    return [ln for ln in _json_lines(server) if message in ln.get("message", "")]


def _access(server: Server, request_id: str) -> list[dict[str, Any]]:
    return [ln for ln in _json_lines(server)
            if ln.get("event") == "request" and ln.get("request_id") == request_id]  # fmt: skip


def _metrics(server: Server) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = http_json(f"{server.url}/metrics", method="GET")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_every_serving_line_is_json_and_each_request_has_one(server) -> None:
    ok = http_json(f"{server.url}/predict", {"ion": "Li", "structure": FIXTURE_CIF},
                   headers={"X-Request-ID": "logs-ok-1"})  # fmt: skip
    assert ok[0] == 200
    status, body = http_json(f"{server.url}/predict", {"ion": "Mg", "structure": "junk"})
    assert status == 400 and body["request_id"]
    time.sleep(0.5)
    serving_lines = [ln for ln in _json_lines(server) if ln["logger"].startswith("serving")]
    assert serving_lines and all("request_id" in ln and "ts" in ln for ln in serving_lines)
    text = server.log.read_text(errors="replace")
    assert "[serving." not in text and " serving.access " not in text  # nothing in plain text
    (line,) = _access(server, "logs-ok-1")
    assert (line["protocol"], line["endpoint"], line["status"]) == ("http", "predict", 200)
    assert (line["ion"], line["model_version"], line["error_kind"]) == ("Li", 1, None)
    assert line["latency_ms"] > 0 and line["path"] == "/predict"
    (err,) = _access(server, body["request_id"])  # the id in the error body finds the line
    assert (err["status"], err["error_kind"], err["ion"]) == (400, "parse", "Mg")
    assert not _access(server, "none") and not [
        ln for ln in _json_lines(server) if ln.get("path") in ("/metrics", "/healthz")
    ]  # probes and scrapes are not logged


def test_grpc_returns_and_logs_the_request_id(server) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rpc.VoltageServiceStub(channel)
        msg, call = stub.Predict.with_call(
            pb.PredictRequest(ion="Mg", structure=FIXTURE_CIF),
            metadata=(("x-request-id", "grpc-rid-1"),),
        )
        assert dict(call.trailing_metadata())["x-request-id"] == "grpc-rid-1"
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(ion="Xx", structure="x"))
    md = dict(info.value.trailing_metadata())
    err = pb.Error.FromString(md["voltage-error-bin"])
    assert err.request_id == md["x-request-id"] and len(err.request_id) == 32
    time.sleep(0.5)
    (line,) = _access(server, "grpc-rid-1")
    assert (line["protocol"], line["method"], line["status"]) == ("grpc", "Predict", "OK")
    assert (line["ion"], line["model_version"]) == ("Mg", 1) and msg.formula == "CoO2"
    (bad,) = _access(server, err.request_id)
    assert (bad["status"], bad["error_kind"]) == ("INVALID_ARGUMENT", "unknown_ion")


def test_prediction_log_and_drift_over_both_workers(server, workdir) -> None:
    structures = [*sample_structures(8, seed=5), perovskite(), rocksalt(4.5, "Zr", "O")]
    sent = 0
    for i in range(130):  # a new connection each: spread over both workers
        s = structures[i % len(structures)]
        rid = f"drift-{i}"
        status, _ = http_json(f"{server.url}/predict", {"ion": "Li", "structure": cif(s)},
                              headers={"X-Request-ID": rid})  # fmt: skip
        assert status == 200
        sent += 1
    poscar = {"ion": "Li", "format": "poscar", "structure": structures[0].to(fmt="poscar")}
    status, _ = http_json(f"{server.url}/predict", poscar, headers={"X-Request-ID": "poscar-1"})
    assert status == 200
    sent += 1
    folder = workdir / "predictions"

    def all_lines() -> list[dict[str, Any]]:
        return [json.loads(x) for f in sorted(folder.glob("predictions.*.jsonl*"))
                for x in f.read_text().splitlines()]  # fmt: skip

    li = lambda: [ln for ln in all_lines() if ln["ion"] == "Li"]  # noqa: E731
    wait_until(lambda: len(li()) >= sent + 1, 20, what="prediction log lines")
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["predictions.w1.jsonl", "predictions.w2.jsonl"], files
    lines = li()
    first = {ln["request_id"]: ln for ln in lines}
    assert {"drift-0", "poscar-1", "logs-ok-1"} <= set(first)
    assert first["poscar-1"]["structure_sha256"] == first["drift-0"]["structure_sha256"]
    assert set(first["drift-0"]) >= {"ts", "request_id", "ion", "model", "version", "source",
                                     "structure_sha256", "voltage", "uncertainty", "n_sites"}
    assert first["drift-0"]["version"] == 1 and first["drift-0"]["model"] == "electrode-voltage-Li"

    # Drift recomputed offline from the log (both workers' predictions) = the scraped gauges.
    ref = load_reference(workdir / "ref.json")
    offline = DriftWindow(ref, size=2000)
    for ln in lines:
        elements = {"Zr"} if "Zr" in ln["unseen_elements"] else set()
        offline.observe("Li", ln["voltage"], elements, ln["n_sites"])
    want = offline.stats("Li")
    assert want.requests == len(lines) >= 100

    def scraped() -> dict[str, float] | None:
        m = _metrics(server)
        got = {name: m.get((name, (("ion", "Li"),)), math.nan) for name in (
            "voltage_drift_window_requests", "voltage_drift_psi", "voltage_drift_sites_psi",
            "voltage_drift_unseen_element_share")}  # fmt: skip
        return got if got["voltage_drift_window_requests"] == len(lines) else None

    got = wait_until(scraped, 20, what="drift counts of both workers exported")
    assert got["voltage_drift_psi"] == pytest.approx(want.psi, rel=1e-9)
    assert got["voltage_drift_sites_psi"] == pytest.approx(want.sites_psi, rel=1e-9)
    assert got["voltage_drift_unseen_element_share"] == pytest.approx(
        want.unseen_element_share, rel=1e-9
    )
