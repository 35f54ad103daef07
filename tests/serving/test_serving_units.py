"""Serving building blocks in-process (no server): inputs, batching, swaps, watcher, metrics,
HTTP guard. Fast; the end-to-end behaviour is in tests/serving/test_service.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pymatgen.core import Structure
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving import watcher as watcher_mod
from serving.batching import Admission, MicroBatcher
from serving.config import ServingConfig
from serving.drift import DriftWindow, load_reference
from serving.errors import ServingError
from serving.http_guard import RequestGuard
from serving.inputs import safe_structure_dict, to_structure
from serving.metrics import ServiceMetrics
from serving.models import ModelLoadError, ServedModel
from serving.predictor import Predictor, PredictRequest
from serving.runtime import load_drift
from serving.watcher import ModelManager
from tests.serving_fixtures import build_checkpoint, cif, rocksalt, write_drift_reference
from voltage_model.naming import VersionInfo
from voltage_model.predict import VoltageModel

with warnings.catch_warnings():  # starlette's note about httpx versions is not ours to fix
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

torch.set_num_threads(1)


def _samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[int, VoltageModel]:
    tmp = tmp_path_factory.mktemp("ckpt")
    return {
        seed: VoltageModel.from_checkpoint(build_checkpoint(tmp / f"{seed}.pt", "Li", seed))
        for seed in (1, 2)
    }


def served(model: VoltageModel, version: int) -> ServedModel:
    return ServedModel("Li", model, "electrode-voltage-Li", version, "registry", test_mae=0.4)


def predictor(**kw: Any) -> Predictor:
    config = ServingConfig(ions=("Li", "Mg"), drift_reference=None, records_path=None, **kw)
    return Predictor(config, ServiceMetrics(CollectorRegistry(), config.ions)).start()


# ------------------------------------------------------------------------------ inputs
def test_json_input_never_imports_modules_named_in_it(tmp_path, monkeypatch) -> None:
    """pymatgen decodes site properties with MontyDecoder, which imports "@module"; the
    sanitiser drops properties, so a module named by a request is never imported."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "class Evil:\n    @classmethod\n    def from_dict(cls, d):\n        return cls()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = rocksalt().as_dict()
    data["sites"][0]["properties"] = {"p": {"@module": "evil_mod", "@class": "Evil"}}
    data["properties"] = {"q": {"@module": "evil_mod", "@class": "Evil"}}
    clean = safe_structure_dict(json.loads(json.dumps(data)))
    assert "properties" not in clean and all(set(s) == {"species", "abc"} for s in clean["sites"])
    structure = to_structure(json.dumps(data), "json", 500)
    assert len(structure) == 8
    assert not marker.exists() and "evil_mod" not in sys.modules


@pytest.mark.parametrize(
    ("text", "fmt", "kind"),
    [
        ("", "cif", "empty"),
        ("x", "xyz", "format"),
        ({"lattice": {}}, "cif", "format"),
        ("{", "json", "parse"),
        ('{"lattice": {"matrix": [[1, 0, 0], [0, 1, 0]]}, "sites": []}', "json", "parse"),
        ('{"lattice": {"matrix": [[4,0,0],[0,4,0],[0,0,4]]}, "sites": [{"species": '
         '[{"element": "O", "occu": 1}], "abc": [NaN, 0, 0]}]}', "json", "nan_coordinates"),
    ],
)  # fmt: skip
def test_input_errors_have_kinds(text: Any, fmt: str, kind: str) -> None:
    with pytest.raises(ServingError) as info:
        to_structure(text, fmt, 500)
    assert info.value.kind == kind


def test_error_mappings() -> None:
    def forms(kind: str) -> tuple[int, str, str]:
        e = ServingError(kind, "m")
        return e.http_status, e.status_label, e.grpc_code_name

    assert forms("too_many_sites") == (400, "client_error", "INVALID_ARGUMENT")
    assert forms("too_large") == (413, "client_error", "INVALID_ARGUMENT")
    assert forms("no_champion") == (503, "unavailable", "UNAVAILABLE")
    assert forms("overloaded") == (503, "unavailable", "RESOURCE_EXHAUSTED")
    assert forms("too_many_requests") == (429, "unavailable", "RESOURCE_EXHAUSTED")
    assert forms("timeout") == (504, "unavailable", "DEADLINE_EXCEEDED")
    assert forms("internal") == (500, "server_error", "INTERNAL")
    assert ServingError("overloaded", "m", retry_after=0.2).retry_after_header == "1"
    assert ServingError("overloaded", "m", retry_after=2.5).retry_after_header == "3"
    assert ServingError("parse", "m").retry_after_header is None
    with pytest.raises(ValueError):
        ServingError("made_up", "m")


def test_admission_bounds_pending_items_and_admits_a_big_batch_alone() -> None:
    seen: list[int] = []
    a = Admission(4, on_change=seen.append)
    assert a.try_admit(3) and a.try_admit(1) and a.full
    assert not a.try_admit(1)  # the fifth structure is shed
    a.release(4)
    assert a.pending == 0 and a.try_admit(10)  # larger than the limit, but alone: admitted
    assert not a.try_admit(1)
    a.release(10)
    assert a.try_admit(0) and seen[-1] == 0


def test_predictor_sheds_beyond_the_queue_and_counts_it(models) -> None:
    """Requests beyond VOLTAGE_MAX_QUEUE get ``overloaded`` at once (nothing parsed), are
    counted as shed and unavailable, and the queue drains back to zero."""
    p = predictor(max_queue=2, retry_after_s=2.0)
    p.set_model("Li", served(models[1], 1))
    gate = threading.Event()
    real_infer = p._infer

    def slow_infer(served_model: Any, graphs: Any) -> Any:
        gate.wait(10)
        return real_infer(served_model, graphs)

    p.batcher._infer = slow_infer
    text = cif(rocksalt())

    async def burst() -> list[Any]:
        async def one() -> Any:
            try:
                return await p.predict(PredictRequest("Li", text), "predict", "http")
            except ServingError as e:
                return e

        tasks = [asyncio.ensure_future(one()) for _ in range(6)]
        await asyncio.sleep(0.5)
        gate.set()
        return await asyncio.gather(*tasks)

    try:
        out = asyncio.run(burst())
        shed = [o for o in out if isinstance(o, ServingError)]
        assert len(shed) == 4 and {e.kind for e in shed} == {"overloaded"}
        assert shed[0].http_status == 503 and shed[0].retry_after_header == "2"
        assert "capacity" in shed[0].message
        # A batch larger than the queue still runs when nothing else is pending.
        many = asyncio.run(p.predict_many([PredictRequest("Li", text)] * 3, "predict_batch"))
        assert all(not isinstance(o, ServingError) for o in many)
    finally:
        p.stop()
    s = _samples(p.metrics)
    assert s[("voltage_requests_shed_total", (("protocol", "http"), ("reason", "queue")))] == 4
    assert s[("voltage_errors_total", (("kind", "overloaded"), ("protocol", "http")))] == 4
    assert s[("voltage_queue_items", ())] == 0
    assert p.admission.pending == 0


# ------------------------------------------------------------------------------ batching
def test_batcher_merges_concurrent_requests_and_groups_by_model() -> None:
    calls: list[tuple[str, int]] = []
    gate = threading.Event()

    def infer(model: str, graphs: list[float]) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(5)
        calls.append((model, len(graphs)))
        return np.array(graphs) * 2, np.zeros(len(graphs))

    b = MicroBatcher(infer, max_batch=64, max_wait_s=0.001).start()
    try:
        first = b.submit("a", 0.0)  # occupies the worker while the others queue up
        time.sleep(0.05)
        futs = [b.submit("a" if i % 2 else "b", float(i)) for i in range(1, 11)]
        gate.set()
        assert first.result(5) == (0.0, 0.0)
        assert [f.result(5)[0] for f in futs] == [2.0 * i for i in range(1, 11)]
    finally:
        b.stop()
    assert calls[0] == ("a", 1)
    assert sorted(calls[1:]) == [("a", 5), ("b", 5)]  # one forward per model for the queue


def test_batcher_sends_errors_to_every_caller_and_keeps_running() -> None:
    def infer(model: str, graphs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        if model == "boom":
            raise RuntimeError("bad batch")
        return np.ones(len(graphs)), np.zeros(len(graphs))

    b = MicroBatcher(infer).start()
    try:
        with pytest.raises(RuntimeError, match="bad batch"):
            b.submit("boom", 1).result(5)
        assert b.submit("ok", 1).result(5) == (1.0, 0.0)
    finally:
        b.stop()


# ------------------------------------------------------------------------------ predictor
def test_request_started_before_a_swap_finishes_on_the_old_model(models) -> None:
    p = predictor()
    try:
        old, new = served(models[1], 1), served(models[2], 2)
        p.set_model("Li", old)
        prep = p.prepare(PredictRequest("Li", cif(rocksalt())))
        p.set_model("Li", new)  # swap between parsing and inference
        result = p.finish(prep, *p.batcher.submit(prep.served, prep.graph).result(5))
        assert result.model_version == 1
        again = p.predict_sync(PredictRequest("Li", cif(rocksalt())))
        assert again.model_version == 2 and again.voltage != result.voltage
        expected = models[2].predict([rocksalt()])[0]
        assert again.voltage == pytest.approx(expected.voltage, rel=1e-6)
    finally:
        p.stop()


def test_concurrent_async_requests_share_forward_passes(models) -> None:
    p = predictor()
    p.set_model("Li", served(models[1], 1))
    texts = [cif(rocksalt(4.2 + 0.05 * i)) for i in range(16)]

    async def run() -> list[Any]:
        return await asyncio.gather(*(p.predict(PredictRequest("Li", t)) for t in texts))

    try:
        results = asyncio.run(run())
    finally:
        p.stop()
    singles = [models[1].predict([Structure.from_str(t, fmt="cif")])[0] for t in texts]
    for r, s in zip(results, singles, strict=True):
        assert r.voltage == pytest.approx(s.voltage, rel=1e-5)
    assert p.batcher.items == 16 and p.batcher.batches < 16


def test_unknown_ion_label_is_bounded_and_counts(models) -> None:
    p = predictor(disabled_ions=frozenset({"Mg"}))
    p.set_model("Li", served(models[1], 1))
    try:
        for ion in ("Xx", "Yy", "<script>", None):
            with pytest.raises(ServingError):
                p.predict_sync(PredictRequest(ion, "x"))
        with pytest.raises(ServingError, match="disabled"):
            p.predict_sync(PredictRequest("Mg", "x"))
    finally:
        p.stop()
    s = _samples(p.metrics)
    ions = {dict(k[1]).get("ion") for k in s if k[0] == "voltage_requests_total"}
    assert ions == {"unknown", "Mg"}
    assert p.ready()  # Mg disabled: Li alone makes the service ready
    assert ("voltage_model_loaded", (("ion", "Mg"),)) not in s


def test_drift_window_feeds_gauges(models, tmp_path) -> None:
    ref = write_drift_reference(tmp_path / "ref.json", ["Li"])
    config = ServingConfig(ions=("Li",), drift_reference=ref, records_path=None)
    drift = DriftWindow(load_reference(ref), size=50, min_samples=5)
    p = Predictor(config, ServiceMetrics(CollectorRegistry(), ("Li",)), drift).start()
    p.set_model("Li", served(models[1], 1))
    try:
        for i in range(6):
            p.predict_sync(PredictRequest("Li", cif(rocksalt(4.2 + 0.1 * i, "Zr"))))
        p.refresh_drift()
    finally:
        p.stop()
    s = _samples(p.metrics)
    assert s[("voltage_drift_window_requests", (("ion", "Li"),))] == 6
    assert s[("voltage_drift_unseen_element_share", (("ion", "Li"),))] == 1.0  # Zr unseen
    assert s[("voltage_drift_psi", (("ion", "Li"),))] >= 0
    assert load_drift(ServingConfig(ions=("Li",), drift_reference=tmp_path / "none.json")) is None


def test_drift_of_several_workers_is_the_drift_of_their_windows_together(tmp_path) -> None:
    """Each worker exports counts (livesum); the scrape computes PSI from their sum, which
    equals the PSI of one window holding every worker's predictions."""
    from prometheus_client import generate_latest

    from serving.metrics import aggregate_drift

    ref = load_reference(write_drift_reference(tmp_path / "ref.json", ["Li", "Mg"]))
    rng = np.random.default_rng(0)
    workers = [DriftWindow(ref, size=500, min_samples=100) for _ in range(2)]
    together = DriftWindow(ref, size=1000, min_samples=100)
    for i, v in enumerate(rng.normal(4.5, 1.0, 300)):  # shifted vs the reference's 2-7 V
        elements = {"Li", "O", "Zr"} if i % 5 == 0 else {"Li", "O"}
        for w in (workers[i % 3 == 0], together):
            w.observe("Li", float(v), elements, nsites=int(8 + i % 40))
    summed = workers[0].counts("Li") + workers[1].counts("Li")
    scrape = ServiceMetrics(CollectorRegistry(), ("Li", "Mg"), aggregate_drift_at_scrape=True)
    scrape.set_drift(workers[0].stats_of(summed), summed)
    text = generate_latest(scrape.registry).decode()
    assert "voltage_drift_psi{" not in text  # not set by a worker in multiprocess mode
    out = aggregate_drift(text, workers[0])
    families = {f.name: f for f in text_string_to_metric_families(out)}
    want = together.stats("Li")
    got = {f: families[f].samples[0].value for f in ("voltage_drift_psi",
           "voltage_drift_sites_psi", "voltage_drift_unseen_element_share")}  # fmt: skip
    assert got["voltage_drift_psi"] == pytest.approx(want.psi, rel=1e-12) and want.psi > 0.25
    assert got["voltage_drift_sites_psi"] == pytest.approx(want.sites_psi, rel=1e-12)
    assert got["voltage_drift_unseen_element_share"] == pytest.approx(60 / 300)
    assert [s.labels for s in families["voltage_drift_psi"].samples] == [{"ion": "Li"}]
    assert aggregate_drift(text, None) == text


# ------------------------------------------------------------------------------ metrics
def test_metrics_precreate_reload_series_and_zero_old_versions() -> None:
    m = ServiceMetrics(CollectorRegistry(), ("Li", "Na"))
    m.init_ions(["Li", "Na"])
    s = _samples(m)
    for ion in ("Li", "Na"):
        for result in ("success", "failure"):
            assert s[("voltage_model_reloads_total", (("ion", ion), ("result", result)))] == 0
        assert s[("voltage_model_loaded", (("ion", ion),))] == 0
    m.set_model("Li", "electrode-voltage-Li", 1)
    m.set_model("Li", "electrode-voltage-Li", 2)
    s = _samples(m)
    info = "voltage_model_info"
    assert s[(info, (("ion", "Li"), ("name", "electrode-voltage-Li"), ("version", "1")))] == 0
    assert s[(info, (("ion", "Li"), ("name", "electrode-voltage-Li"), ("version", "2")))] == 1
    assert s[("voltage_model_version", (("ion", "Li"),))] == 2


# ------------------------------------------------------------------------------ watcher
def test_failed_load_keeps_model_counts_and_backs_off(models, monkeypatch) -> None:
    p = predictor()
    p.set_model("Li", served(models[1], 1))
    config = ServingConfig(ions=("Li",), reload_interval_s=10, drift_reference=None)
    mgr = ModelManager(config, p)
    attempts: list[int] = []
    monkeypatch.setattr(
        watcher_mod, "champion_version",
        lambda uri, name: VersionInfo(name, 2, "run", {}) if name.endswith("Li") else None,
    )  # fmt: skip

    def failing(ion: str, uri: str, version: VersionInfo) -> ServedModel:
        attempts.append(version.version)
        raise ModelLoadError("artifact missing")

    monkeypatch.setattr(watcher_mod, "load_registry_model", failing)
    try:
        mgr.poll_once()
        mgr.poll_once()  # within the backoff: no second attempt
        assert attempts == [2]
        assert p.model_for("Li").version == 1
        fail = ("voltage_model_reloads_total", (("ion", "Li"), ("result", "failure")))
        assert _samples(p.metrics)[fail] == 1

        monkeypatch.setattr(
            watcher_mod, "load_registry_model", lambda ion, uri, v: served(models[2], 2)
        )
        mgr._failures.clear()
        mgr.poll_once()
        assert p.model_for("Li").version == 2
    finally:
        p.stop()


# ------------------------------------------------------------------------------ HTTP guard
class _FakeRuntime:
    def __init__(self) -> None:
        self.config = ServingConfig(ions=("Li",), max_body_bytes=200, max_batch_items=2)
        self.metrics = ServiceMetrics(CollectorRegistry(), ("Li",))
        config = self.config

        class _P:
            admission = Admission(2)

            @staticmethod
            def missing() -> list[str]:
                return ["Li"]

            @staticmethod
            def overloaded() -> ServingError:
                return ServingError("overloaded", "full", retry_after=config.retry_after_s)

        self.predictor = _P()


@pytest.fixture
def guarded() -> tuple[TestClient, _FakeRuntime]:
    runtime = _FakeRuntime()

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"got": json.loads(await request.body())})

    app = Starlette(routes=[Route("/predict", echo, methods=["POST"]),
                            Route("/predict_batch", echo, methods=["POST"])])  # fmt: skip
    app.add_middleware(RequestGuard, runtime_of=lambda: runtime)
    return TestClient(app), runtime


@pytest.mark.parametrize(
    ("path", "body", "kind"),
    [
        ("/predict", b"", "empty"),
        ("/predict", b"x" * 201, "too_large"),
        ("/predict", b"{nope", "parse"),
        ("/predict", b"[1]", "parse"),
        ("/predict_batch", b"{}", "parse"),
        ("/predict_batch", b"[{}, {}, {}]", "too_large"),
    ],
)
def test_guard_refuses_bad_bodies(guarded, path: str, body: bytes, kind: str) -> None:
    client, runtime = guarded
    resp = client.post(path, content=body, headers={"Content-Type": "application/json",
                                                     "X-Request-ID": "req-42"})  # fmt: skip
    status = 413 if kind == "too_large" else 400
    assert resp.status_code == status
    assert resp.json() == {"error": resp.json()["error"], "kind": kind, "status": status,
                           "request_id": "req-42"}  # fmt: skip
    assert resp.headers["X-Request-ID"] == "req-42"
    s = _samples(runtime.metrics)
    assert s[("voltage_errors_total", (("kind", kind), ("protocol", "http")))] == 1


def test_guard_replays_accepted_bodies_and_answers_readyz(guarded) -> None:
    client, _ = guarded
    resp = client.post("/predict", json={"ion": "Li"})
    assert resp.status_code == 200 and resp.json() == {"got": {"ion": "Li"}}
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["missing"] == ["Li"]


def test_guard_turns_a_multipart_upload_into_the_json_body(guarded) -> None:
    client, runtime = guarded
    runtime.config = dataclasses.replace(runtime.config, max_body_bytes=1000)
    text = "data_x\n"
    resp = client.post("/predict", files={"file": ("cell.cif", text.encode())},
                       data={"ion": "Li", "explain": "true"})  # fmt: skip
    assert resp.status_code == 200, resp.text
    assert resp.json()["got"] == {"structure": text, "format": "cif", "ion": "Li",
                                  "explain": True}  # fmt: skip
    resp = client.post("/predict", files={"file": ("POSCAR_7", b"p")}, data={"ion": "Mg"})
    assert resp.json()["got"]["format"] == "poscar"
    resp = client.post("/predict", files={"file": ("x.cif", b"p")},
                       data={"ion": "Mg", "format": "json"})  # fmt: skip
    assert resp.json()["got"]["format"] == "json"  # an explicit format wins


@pytest.mark.parametrize(
    ("files", "data", "status", "words"),
    [
        ({"file": ("a.cif", b"\xff\xfe")}, {"ion": "Li"}, 400, "not UTF-8"),
        ({"file": ("a.cif", b"x")}, {"ion": "Li", "ions": "Mg"}, 400, "unknown form field"),
        ({"file": ("a.cif", b"x" * 1200)}, {"ion": "Li"}, 413, "limit"),
        ({"file": ("a.cif", b"x")}, {"ion": "Li", "explain": "maybe"}, 400, "explain"),
    ],
)
def test_guard_refuses_bad_uploads(guarded, files, data, status, words) -> None:
    client, runtime = guarded
    runtime.config = dataclasses.replace(runtime.config, max_body_bytes=1000)
    resp = client.post("/predict", files=files, data=data)
    assert resp.status_code == status and words in resp.json()["error"], resp.text
    # Uploads are for /predict only: /predict_batch still wants JSON.
    resp = client.post("/predict_batch", files={"file": ("a.cif", b"x")}, data={"ion": "Li"})
    assert resp.status_code == 400 and resp.json()["kind"] == "format"


def test_guard_reshapes_other_error_bodies_and_sets_request_ids() -> None:
    runtime = _FakeRuntime()

    async def validation(request: Request) -> JSONResponse:  # BentoML's shape
        return JSONResponse({"error": "1 validation error for Input", "detail": [
            {"loc": ["explain"], "msg": "Input should be a valid boolean"}]}, status_code=400)

    app = Starlette(routes=[Route("/predict", validation, methods=["POST"])])
    app.add_middleware(RequestGuard, runtime_of=lambda: runtime)
    client = TestClient(app)
    resp = client.post("/predict", json={"ion": "Li", "explain": [1]},
                       headers={"X-Request-ID": "has spaces, so not kept"})  # fmt: skip
    body = resp.json()
    assert resp.status_code == 400 and body["kind"] == "parse" and body["status"] == 400
    assert "explain: Input should be a valid boolean" in body["error"]
    assert body["request_id"] == resp.headers["X-Request-ID"] and len(body["request_id"]) == 32
    missing = client.get("/nowhere")  # Starlette's plain-text 404
    assert missing.status_code == 404 and missing.json()["kind"] == "not_found"
    assert missing.json()["request_id"] == missing.headers["X-Request-ID"]
    s = _samples(runtime.metrics)  # refused before any API method: counted by the guard
    assert s[("voltage_errors_total", (("kind", "parse"), ("protocol", "http")))] == 1


def test_guard_sheds_at_once_when_the_queue_is_full(guarded) -> None:
    client, runtime = guarded
    admission = runtime.predictor.admission
    assert admission.try_admit(2) and admission.full
    try:
        resp = client.post("/predict", json={"ion": "Li"})
    finally:
        admission.release(2)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.json()["kind"] == "overloaded" and resp.json()["request_id"]
    s = _samples(runtime.metrics)
    assert s[("voltage_requests_shed_total", (("protocol", "http"), ("reason", "queue")))] == 1
    assert client.post("/predict", json={"ion": "Li"}).status_code == 200


def test_config_from_env(tmp_path: Path) -> None:
    env = {
        "VOLTAGE_IONS": "Li, Mg",
        "VOLTAGE_DISABLED_IONS": "Mg",
        "VOLTAGE_MAX_SITES": "50",
        "VOLTAGE_PARAMS": str(tmp_path / "none.yaml"),
        "MLFLOW_TRACKING_URI": "sqlite:///x.db",
    }
    c = ServingConfig.from_env(env)
    assert c.ions == ("Li", "Mg") and c.enabled_ions == ("Li",) and c.max_sites == 50
    assert c.tracking_uri == "sqlite:///x.db" and c.model_name("Li") == "electrode-voltage-Li"
    with pytest.raises(ValueError, match="VOLTAGE_DISABLED_IONS"):
        ServingConfig.from_env({**env, "VOLTAGE_DISABLED_IONS": "Zn"})
    with pytest.raises(ValueError, match="VOLTAGE_MAX_SITES"):
        ServingConfig.from_env({**env, "VOLTAGE_MAX_SITES": "0"})
    from_params = ServingConfig.from_env({"VOLTAGE_PARAMS": "params.yaml"})
    assert from_params.ions[0] == "Li" and len(from_params.ions) >= 1
    assert (from_params.max_queue, from_params.prediction_log, from_params.log_format) == (
        128, None, "json",
    )  # fmt: skip
    c = ServingConfig.from_env({**env, "VOLTAGE_MAX_QUEUE": "8", "VOLTAGE_RETRY_AFTER_S": "3",
                                "VOLTAGE_PREDICTION_LOG": str(tmp_path / "p.jsonl"),
                                "VOLTAGE_LOG_FORMAT": "text", "VOLTAGE_ACCESS_LOG": "0"})
    assert (c.max_queue, c.retry_after_s, c.log_format, c.access_log) == (8, 3.0, "text", False)
    assert c.prediction_log == tmp_path / "p.jsonl"
    for bad in ({"VOLTAGE_MAX_QUEUE": "0"}, {"VOLTAGE_LOG_FORMAT": "xml"}):
        with pytest.raises(ValueError):
            ServingConfig.from_env({**env, **bad})  # fmt: skip


# ------------------------------------------------------------------------------ CIF fast path
def _cif_cases() -> list[Structure]:
    """Real charged cells from the cleaned snapshot when present, plus awkward synthetic ones."""
    from pymatgen.core import Lattice

    from tests.serving_fixtures import REPO, perovskite, sample_structures

    cases: list[Structure] = [*sample_structures(6), perovskite() * (2, 1, 1)]
    hexagonal = Lattice.hexagonal(3.0, 5.0)
    cases.append(Structure(hexagonal, ["Mg", "O", "O"], [[0, 0, 0], [1 / 3, 2 / 3, 0.25],
                                                        [2 / 3, 1 / 3, 0.75]]))  # fmt: skip
    cases.append(Structure(Lattice.cubic(5), ["Li", "Co"], [[-0.25, 1.5, 0.0], [0.5, 0.5, 0.5]]))
    path = REPO / "data/clean/records.jsonl.gz"
    if path.is_file():
        import gzip

        with gzip.open(path, "rt") as fh:
            for i, line in enumerate(fh):
                if i % 25 == 0:
                    cases.append(Structure.from_dict(json.loads(line)["charged_structure"]))
    return cases


def test_p1_cif_fast_path_gives_pymatgens_structure_exactly() -> None:
    from pymatgen.io.cif import CifWriter

    from voltage_model.cif import parse_p1_cif

    for s in _cif_cases():
        text = str(CifWriter(s))
        fast = parse_p1_cif(text)
        assert fast is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = Structure.from_str(text, fmt="cif")
        assert np.array_equal(fast.lattice.matrix, ref.lattice.matrix)
        assert [site.species for site in fast] == [site.species for site in ref]
        assert np.array_equal(fast.frac_coords, ref.frac_coords)


def test_p1_cif_fast_path_declines_everything_else() -> None:
    from pymatgen.io.cif import CifWriter

    from voltage_model.cif import parse_p1_cif

    s = rocksalt()
    symmetric = str(CifWriter(s, symprec=0.01))  # symmetry operations listed
    partial = str(CifWriter(s)).replace("0.00000000  1\n", "0.00000000  0.5\n", 1)
    two_blocks = str(CifWriter(s)) + "\n" + str(CifWriter(s)).replace("data_", "data_b", 1)
    for text in (symmetric, two_blocks, "garbage", ""):
        assert parse_p1_cif(text) is None
    assert "0.00000000  0.5\n" in partial and parse_p1_cif(partial) is None
