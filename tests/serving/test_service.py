"""The BentoML service end to end: a real ``bentoml serve`` (2 workers) on a real MLflow store.

One server is started for the module (starting one costs ~20 s of CPU), serving Li and Mg (with
champions), Na (registered, no champion) and K (disabled). Tests run in file order because the
later ones change the registry: first everything that needs Na without champion (readiness,
503, the real-Prometheus ``VoltageNoChampion`` alert), then a failed reload, then promotions
under load. A second server, from a built Bento with no registry reachable, checks packaging.

Compared with the in-process predictor (same checkpoint, same code) answers must agree to float
precision: micro-batches of different composition may reorder float sums.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from pymatgen.core import Structure

from serving import voltage_pb2 as pb
from serving import voltage_pb2_grpc as rpc
from serving.config import ServingConfig
from serving.predictor import PredictRequest
from serving.runtime import ServingRuntime
from tests.serving_fixtures import (
    REPO,
    VENV_BIN,
    MlflowStore,
    Server,
    cif,
    corrupt_version,
    http_json,
    perovskite,
    rocksalt,
    sample_structures,
    serve_env,
    served,
    start_bento,
    wait_until,
    write_drift_reference,
    write_records,
)
from training.registry import by_alias

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MAX_SITES = 40
MAX_BODY = 100_000
IONS = "Li,Mg,Na,K"
MATERIAL = "mp-1001"


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service")


@pytest.fixture(scope="module")
def store(workdir: Path) -> MlflowStore:
    return MlflowStore.published(
        workdir / "mlflow",
        {"Li": {"seed": 1, "test_mae": 0.41}, "Mg": {"seed": 2, "test_mae": 0.52}},
        candidates={"Na": 3},  # registered, but no champion
    )


@pytest.fixture(scope="module")
def files(workdir: Path) -> dict[str, Path]:
    return {
        "drift": write_drift_reference(workdir / "drift_reference.json", ["Li", "Mg"]),
        "records": write_records(
            workdir / "records.jsonl.gz", [(MATERIAL, "Li", perovskite(), 3.3)]
        ),
    }


@pytest.fixture(scope="module")
def server(workdir: Path, store: MlflowStore, files: dict[str, Path]) -> Any:
    with served(
        workdir,
        store,
        VOLTAGE_IONS=IONS,
        VOLTAGE_DISABLED_IONS="K",
        VOLTAGE_WORKERS="2",
        VOLTAGE_RELOAD_INTERVAL="1",
        VOLTAGE_MAX_SITES=str(MAX_SITES),
        VOLTAGE_MAX_BODY_BYTES=str(MAX_BODY),
        VOLTAGE_DRIFT_REFERENCE=str(files["drift"]),
        VOLTAGE_RECORDS=str(files["records"]),
    ) as srv:
        # Both workers must have loaded their models before tests count on them.
        wait_until(lambda: _all_workers_loaded(srv), 60, what="both workers loaded")
        yield srv


def _all_workers_loaded(srv: Server) -> bool:
    m = metric_values(srv)
    return m.get(("voltage_model_reloads_total", (("ion", "Mg"), ("result", "success"))), 0) >= 2


@pytest.fixture(scope="module")
def local(store: MlflowStore, files: dict[str, Path]) -> Any:
    """The in-process predictor over the same registry (what HTTP and gRPC must equal)."""
    config = ServingConfig(
        ions=("Li", "Mg"),
        tracking_uri=store.tracking_uri,
        model_source="registry",
        max_sites=MAX_SITES,
        max_body_bytes=MAX_BODY,
        drift_reference=None,
        records_path=files["records"],
    )
    runtime = ServingRuntime(config).start(watch=False)
    yield runtime.predictor
    runtime.stop()


@pytest.fixture(scope="module")
def stub(server: Server) -> Any:
    channel = grpc.insecure_channel(server.grpc_target)
    yield rpc.VoltageServiceStub(channel)
    channel.close()


# ------------------------------------------------------------------------------ helpers
def predict_http(server: Server, payload: Any, **kw: Any) -> tuple[int, Any]:
    return http_json(f"{server.url}/predict", payload, **kw)


def grpc_error(call: Any, *args: Any) -> tuple[grpc.StatusCode, str, pb.Error]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args)
    err = info.value
    md = dict(err.trailing_metadata() or ())
    return err.code(), err.details(), pb.Error.FromString(md["voltage-error-bin"])


def metric_values(server: Server) -> dict[tuple[str, tuple], float]:
    status, text = http_json(f"{server.url}/metrics", method="GET")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(metrics: dict, metric: str, **labels: str) -> float:
    return metrics.get((metric, tuple(sorted(labels.items()))), 0.0)


def poscar_text(structure: Structure) -> str:
    return structure.to(fmt="poscar")


def assert_same(http: dict, grpc_msg: pb.Prediction, local: Any) -> None:
    assert http["voltage"] == pytest.approx(local.voltage, rel=1e-5, abs=1e-6)
    assert http["uncertainty"] == pytest.approx(local.uncertainty, rel=1e-4, abs=1e-6)
    assert grpc_msg.voltage == pytest.approx(local.voltage, rel=1e-5, abs=1e-6)
    assert grpc_msg.uncertainty == pytest.approx(local.uncertainty, rel=1e-4, abs=1e-6)
    assert http["model"]["version"] == grpc_msg.model.version == local.model_version
    assert http["model"]["name"] == grpc_msg.model.name == local.model_name
    assert http["formula"] == grpc_msg.formula == local.formula
    assert http["unseen_elements"] == list(grpc_msg.unseen_elements)
    assert http["unseen_elements"] == list(local.unseen_elements)


# ------------------------------------------------------------------------------ predictions
@pytest.mark.parametrize("fmt", ["cif", "poscar", "json"])
def test_http_and_grpc_equal_in_process_predictor(server, stub, local, fmt) -> None:
    structures = [*sample_structures(3, seed=7), rocksalt(4.5, "Zr", "O")]  # Zr: unseen
    for i, s in enumerate(structures):
        ion = "Li" if i % 2 == 0 else "Mg"
        text = {"cif": cif(s), "poscar": poscar_text(s), "json": json.dumps(s.as_dict())}[fmt]
        status, body = predict_http(server, {"ion": ion, "structure": text, "format": fmt})
        assert status == 200, body
        msg = stub.Predict(pb.PredictRequest(ion=ion, structure=text, format=fmt))
        want = local.predict_sync(PredictRequest(ion, text, fmt))
        assert_same(body, msg, want)
        assert body["ion"] == ion and body["model"]["source"] == "registry"
    assert body["unseen_elements"] == ["Zr"]
    assert any("Zr" in w for w in body["warnings"])


def test_json_structure_as_object_and_lowercase_ion(server, local) -> None:
    s = rocksalt()
    status, body = predict_http(server, {"ion": "li", "structure": s.as_dict(), "format": "json"})
    assert status == 200, body
    want = local.predict_sync(PredictRequest("Li", json.dumps(s.as_dict()), "json"))
    assert body["ion"] == "Li"
    assert body["voltage"] == pytest.approx(want.voltage, rel=1e-5)


def test_material_id_lookup(server, stub, local) -> None:
    status, body = predict_http(server, {"ion": "Li", "material_id": MATERIAL})
    assert status == 200, body
    want = local.predict_sync(PredictRequest("Li", material_id=MATERIAL))
    assert body["material_id"] == MATERIAL and body["reference_voltage"] == 3.3
    assert body["voltage"] == pytest.approx(want.voltage, rel=1e-5)
    msg = stub.Predict(pb.PredictRequest(ion="Li", material_id=MATERIAL))
    assert msg.reference_voltage == 3.3 and msg.formula == body["formula"]


def test_predict_batch_mixed_ions_in_order_with_partial_failures(server, stub, local) -> None:
    good = [cif(s) for s in sample_structures(4, seed=3)]
    items = [
        {"ion": "Li", "structure": good[0]},
        {"ion": "Mg", "structure": good[1], "format": "cif"},
        {"ion": "Li", "structure": "not a crystal"},
        {"ion": "Xx", "structure": good[2]},
        {"ion": "Na", "structure": good[3]},
        {"ion": "Mg", "structure": good[3]},
        {"ion": 7},
    ]
    status, body = http_json(f"{server.url}/predict_batch", items)
    assert status == 200, body
    assert [r["index"] for r in body] == list(range(len(items)))
    assert [r["ok"] for r in body] == [True, True, False, False, False, True, False]
    assert [r["kind"] for r in body if not r["ok"]] == [
        "parse", "unknown_ion", "no_champion", "parse",
    ]  # fmt: skip
    assert [r["status"] for r in body if not r["ok"]] == [400, 400, 503, 400]
    for item, r in zip(items, body, strict=True):
        if r["ok"]:
            want = local.predict_sync(PredictRequest(item["ion"], item["structure"]))
            assert r["prediction"]["ion"] == item["ion"]
            assert r["prediction"]["voltage"] == pytest.approx(want.voltage, rel=1e-5)

    reqs = [
        pb.PredictRequest(ion=str(i.get("ion")), structure=i.get("structure", "")) for i in items
    ]
    resp = stub.PredictBatch(pb.PredictBatchRequest(items=reqs))
    kinds = [r.error.kind if r.WhichOneof("outcome") == "error" else "ok" for r in resp.results]
    assert kinds == ["ok", "ok", "parse", "unknown_ion", "no_champion", "ok", "unknown_ion"]
    assert resp.results[1].prediction.voltage == pytest.approx(body[1]["prediction"]["voltage"])


def test_models_lists_versions_mae_and_load_time(server, stub) -> None:
    for method in ("GET", "POST"):
        status, body = http_json(
            f"{server.url}/models", method=method, raw=b"" if method == "POST" else None
        )
        assert status == 200, body
        rows = {r["ion"]: r for r in body["models"]}
        assert body["ready"] is False
        assert rows["Li"]["version"] == 1 and rows["Li"]["test_mae"] == pytest.approx(0.41)
        assert rows["Mg"]["name"] == "electrode-voltage-Mg" and rows["Mg"]["loaded_at"]
        assert rows["Na"]["loaded"] is False and rows["K"]["disabled"] is True
    models = {m.ion: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert models["Mg"].model.version == 1 and models["Mg"].test_mae == pytest.approx(0.52)
    assert not models["Na"].loaded and models["K"].disabled


def test_grpc_reflection_lists_the_services(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(refl.ServerReflectionInfo(iter([req]))))
    names = {s.name for s in resp.list_services_response.service}
    assert {"electrode_voltage.v1.VoltageService", "grpc.health.v1.Health"} <= names


def test_docs_and_health(server) -> None:
    assert http_json(f"{server.url}/healthz", method="GET")[0] == 200
    status, spec = http_json(f"{server.url}/docs.json", method="GET")
    assert status == 200 and {"/predict", "/predict_batch", "/models"} <= set(spec["paths"])
    status, page = http_json(f"{server.url}/docs", method="GET")
    assert status == 200 and "swagger" in page.lower()


# ------------------------------------------------------------------------------ bad input
def _poscar_with(coord_line: str, species: str = "Mn O", counts: str = "1 1") -> str:
    return "\n".join([
        "bad", "1.0", "4 0 0", "0 4 0", "0 0 4", species, counts, "direct",
        "0 0 0", coord_line,
    ])  # fmt: skip


BAD_INPUTS = [
    # (case, payload dict | raw bytes, status, kind, words in the message)
    ("unparseable", {"ion": "Li", "structure": "garbage", "format": "cif"}, 400, "parse",
     ["cannot parse cif"]),
    ("wrong format", {"ion": "Li", "structure": "x", "format": "xyz"}, 400, "format",
     ["unknown format", "xyz"]),
    ("format mismatch", {"ion": "Li", "structure": "data_x\n", "format": "poscar"}, 400, "parse",
     ["poscar"]),
    ("unknown ion", {"ion": "Xx", "structure": "x"}, 400, "unknown_ion", ["unknown ion", "Xx"]),
    ("missing ion", {"structure": "x"}, 400, "unknown_ion", ["ion", "missing"]),
    ("empty body", b"", 400, "empty", ["body is empty"]),
    ("empty structure", {"ion": "Li", "structure": "  "}, 400, "empty", ["structure is empty"]),
    ("too many sites", {"ion": "Li", "structure": None, "format": "cif"}, 400,
     "too_many_sites", ["64 sites", f"limit is {MAX_SITES}"]),
    ("body too large", {"ion": "Li", "structure": "x" * (MAX_BODY + 10)}, 413, "too_large",
     ["limit", str(MAX_BODY)]),
    ("element outside encoding", {"ion": "Li", "structure": _poscar_with("0.5 0.5 0.5", "Md O"),
     "format": "poscar"}, 400, "unknown_element", ["outside the encoding", "Md"]),
    ("nan coordinates", {"ion": "Li", "structure": _poscar_with("nan 0.5 0.5"),
     "format": "poscar"}, 400, "nan_coordinates", ["NaN"]),
    ("overlapping atoms", {"ion": "Li", "structure": _poscar_with("0.01 0 0"),
     "format": "poscar"}, 400, "overlapping_atoms", ["apart"]),
    ("invalid json", b'{"ion": "Li", ', 400, "parse", ["not valid JSON"]),
    ("not an object", b"[1, 2]", 400, "parse", ["JSON object"]),
    ("wrong field type", {"ion": 5, "structure": "x"}, 400, "parse", ["'ion' must be a string"]),
    ("bad json structure", {"ion": "Li", "structure": {"sites": []}, "format": "json"}, 400,
     "parse", ["lattice"]),
    ("unknown material", {"ion": "Li", "material_id": "mp-999999"}, 400, "parse",
     ["unknown material id", "mp-999999"]),
    ("no champion", {"ion": "Na", "structure": "x"}, 503, "no_champion", ["no champion", "Na"]),
    ("disabled ion", {"ion": "K", "structure": "x"}, 503, "no_champion", ["disabled", "K"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "payload", "status", "kind", "words"), BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])  # fmt: skip
def test_bad_input_http(server, case, payload, status, kind, words) -> None:
    if case == "too many sites":
        payload = {**payload, "structure": cif(rocksalt() * (2, 2, 2))}
    if isinstance(payload, bytes):
        got, body = http_json(f"{server.url}/predict", raw=payload, method="POST")
    else:
        got, body = predict_http(server, payload)
    assert got == status, body
    assert body["kind"] == kind and body["status"] == status and body["request_id"]
    for word in words:
        assert word in body["error"], body
    ok, _ = predict_http(server, {"ion": "Li", "structure": cif(rocksalt())})
    assert ok == 200  # the server keeps answering


def test_bad_input_http_content_type_and_batch_limits(server) -> None:
    status, body = http_json(
        f"{server.url}/predict", raw=b"ion=Li", headers={"Content-Type": "text/plain"}
    )
    assert status == 400 and body["kind"] == "format" and "content type" in body["error"]
    status, body = http_json(f"{server.url}/predict_batch", {"ion": "Li"})
    assert status == 400 and "JSON list" in body["error"]


#: Over gRPC the body-level cases do not exist and the proto types every field.
GRPC_BAD = [c for c in BAD_INPUTS if isinstance(c[1], dict)
            and c[0] not in ("wrong field type", "bad json structure")]  # fmt: skip


@pytest.mark.parametrize(("case", "payload", "status", "kind", "words"), GRPC_BAD,
                         ids=[c[0] for c in GRPC_BAD])  # fmt: skip
def test_bad_input_grpc(stub, case, payload, status, kind, words) -> None:
    structure = payload.get("structure") or ""
    if case == "too many sites":
        structure = cif(rocksalt() * (2, 2, 2))
    req = pb.PredictRequest(
        ion=payload.get("ion") or "", structure=structure,
        format=payload.get("format") or "", material_id=payload.get("material_id") or "",
    )  # fmt: skip
    code, details, err = grpc_error(stub.Predict, req)
    want = grpc.StatusCode.UNAVAILABLE if status == 503 else grpc.StatusCode.INVALID_ARGUMENT
    assert code == want and err.kind == kind and err.http_status == status
    for word in words:
        assert word in details
    stub.Predict(pb.PredictRequest(ion="Li", structure=cif(rocksalt())))


# ------------------------------------------------------------------------------ metrics, readiness
def test_metrics_count_requests_across_workers(server, stub) -> None:
    before = metric_values(server)
    text = cif(rocksalt())
    for _ in range(10):  # new connection each: spread over both workers
        assert predict_http(server, {"ion": "Mg", "structure": text})[0] == 200
    for _ in range(4):
        stub.Predict(pb.PredictRequest(ion="Mg", structure=text))
    for _ in range(3):
        assert predict_http(server, {"ion": "Mg", "structure": "junk"})[0] == 400
    after = metric_values(server)

    def delta(metric: str, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    ok = {"endpoint": "predict", "ion": "Mg", "status": "ok"}
    assert delta("voltage_requests_total", protocol="http", **ok) == 10
    assert delta("voltage_requests_total", protocol="grpc", **ok) == 4
    assert delta("voltage_requests_total", endpoint="predict", protocol="http", ion="Mg",
                 status="client_error") == 3  # fmt: skip
    assert delta("voltage_errors_total", kind="parse", protocol="http") == 3
    assert delta("voltage_predicted_volts_count", ion="Mg") == 14
    assert (
        delta("voltage_request_duration_seconds_count", endpoint="predict", protocol="http") == 13
    )
    assert delta("voltage_request_duration_seconds_count", endpoint="predict", protocol="grpc") == 4
    for stage in ("parse", "graph", "inference"):
        assert sample(after, "voltage_stage_duration_seconds_count", stage=stage) > 0
    assert sample(after, "voltage_model_loaded", ion="Li") == 1
    assert sample(after, "voltage_model_loaded", ion="Na") == 0
    assert ("voltage_model_loaded", (("ion", "K"),)) not in after  # disabled: no series
    assert sample(after, "voltage_model_version", ion="Mg") == 1
    assert (
        sample(after, "voltage_model_info", ion="Mg", name="electrode-voltage-Mg", version="1") == 1
    )
    assert (
        sample(after, "voltage_model_reloads_total", ion="Li", result="success") == 2
    )  # 2 workers
    assert ("voltage_model_reloads_total", (("ion", "Na"), ("result", "failure"))) in after
    assert sample(after, "voltage_drift_window_requests", ion="Mg") > 0
    assert ("voltage_drift_psi", (("ion", "Mg"),)) in after
    assert all(lbl != ("ion", "Xx") for _, labels in after for lbl in labels)


def test_readyz_503_while_an_ion_has_no_champion(server) -> None:
    status, body = http_json(f"{server.url}/readyz", method="GET")
    assert status == 503 and body["missing"] == ["Na"] and "Na" in body["error"]
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc_target))
    resp = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


def _promtest() -> ModuleType:
    name = "monitoring_promtest"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "monitoring" / "promtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_prometheus_fires_no_champion_alert(server, tmp_path) -> None:
    promtest = _promtest()
    if promtest.prometheus_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus not installed; CI must run monitoring/setup_prometheus.sh")
        pytest.skip("prometheus not installed (monitoring/setup_prometheus.sh)")
    target = server.url.removeprefix("http://")
    with promtest.run_prometheus(None, tmp_path, target, for_override="1s") as prom:
        alerts = prom.wait_for_alert("VoltageNoChampion", state="firing", timeout=60)
        firing = {a["labels"]["ion"] for a in alerts if a["state"] == "firing"}
        assert firing == {"Na"}
        assert prom.query_values('sum(voltage_requests_total{protocol="grpc"})')[0] > 0


# ------------------------------------------------------------------------------ registry changes
def test_failed_reload_keeps_the_old_model(server, store) -> None:
    def failures() -> float:
        m = metric_values(server)
        return sample(m, "voltage_model_reloads_total", ion="Li", result="failure")

    with store.active():
        bad = store.publish("Li", seed=9, alias="candidate")
        corrupt_version("Li", bad.version)
        before = failures()
        store.set_champion("Li", bad.version)
        try:
            # Each of the 2 workers tries, fails, counts, and keeps v1.
            wait_until(lambda: failures() >= before + 2, 30, what="reload failures counted")
            for _ in range(6):
                status, body = predict_http(server, {"ion": "Li", "structure": cif(rocksalt())})
                assert status == 200 and body["model"]["version"] == 1
        finally:
            store.set_champion("Li", 1)
    assert sample(metric_values(server), "voltage_model_version", ion="Li") == 1


class _Load(threading.Thread):
    """Keeps sending Mg predictions over HTTP and gRPC, recording versions and failures, until
    stopped or for at most ``max_seconds`` (bounded by time, not by a count: on a fast machine a
    count ran out before a slow registry swap finished, and the test then saw no answers after
    the swap)."""

    def __init__(self, server: Server, max_seconds: float = 240.0) -> None:
        super().__init__(daemon=True)
        self.server, self.max_seconds = server, max_seconds
        self.versions: list[int] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        text = cif(rocksalt())
        channel = grpc.insecure_channel(self.server.grpc_target)
        stub = rpc.VoltageServiceStub(channel)
        i, deadline = 0, time.monotonic() + self.max_seconds
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if i % 2:
                    self.versions.append(
                        stub.Predict(pb.PredictRequest(ion="Mg", structure=text)).model.version
                    )
                else:
                    status, body = predict_http(self.server, {"ion": "Mg", "structure": text})
                    if status != 200:
                        self.failures.append(f"HTTP {status}: {body}")
                    else:
                        self.versions.append(body["model"]["version"])
            except Exception as exc:
                self.failures.append(repr(exc))
            i += 1
        channel.close()


def test_promotion_is_picked_up_under_load_with_zero_failures(server, store) -> None:
    def reloads(ion: str) -> float:
        m = metric_values(server)
        return sample(m, "voltage_model_reloads_total", ion=ion, result="success")

    mg_before = reloads("Mg")
    load = _Load(server)
    load.start()
    try:
        wait_until(lambda: len(load.versions) >= 10, 30, what="first answers")
        with store.active():
            v2 = store.publish("Mg", seed=22, alias="candidate", test_mae=0.3)
            store.set_champion("Mg", v2.version)
            store.publish("Na", seed=4)  # Na gets its first champion
        # Each of the 2 workers swaps on its own poll: wait for both, then keep the load on.
        wait_until(lambda: reloads("Mg") >= mg_before + 2, 60, what="both workers swapped Mg")
        after = len(load.versions)
        wait_until(lambda: len(load.versions) >= after + 20, 30, what="answers after the swap")
    finally:
        load.stop.set()
        load.join(30)
    assert load.failures == []
    assert 1 in load.versions and v2.version in load.versions
    assert set(load.versions[after:]) == {v2.version}

    wait_until(lambda: http_json(f"{server.url}/readyz", method="GET")[0] == 200, 30,
               what="ready once Na has a champion")  # fmt: skip
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(server.grpc_target))
    wait_until(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="")).status
        == health_pb2.HealthCheckResponse.SERVING,
        10, what="gRPC health SERVING",
    )  # fmt: skip
    wait_until(
        lambda: sample(metric_values(server), "voltage_model_loaded", ion="Na") == 1,
        30, what="Na loaded in every worker (the gauge is the minimum over workers)",
    )  # fmt: skip
    m = metric_values(server)
    assert sample(m, "voltage_model_version", ion="Mg") == v2.version
    assert sample(m, "voltage_model_info", ion="Mg", name="electrode-voltage-Mg", version="1") == 0


# ------------------------------------------------------------------------------ command line
def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_predict_local_and_remote(server, store, workdir) -> None:
    path = workdir / "cell.cif"
    path.write_text(cif(rocksalt()))
    env = serve_env(workdir / "cli_home", store, VOLTAGE_IONS="Li,Mg")
    remote = _cli("predict", str(path), "--ion", "Mg", "--url", server.url, "--json", env=env)
    assert remote.returncode == 0, remote.stderr
    local = _cli("predict", str(path), "--ion", "Mg", "--json", env=env)
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout) == json.loads(remote.stdout)
    table = _cli("predict", str(path), "--ion", "Mg", "--url", server.url, env=env)
    assert "voltage" in table.stdout and "electrode-voltage-Mg" in table.stdout

    bad = workdir / "bad.cif"
    bad.write_text("garbage")
    for extra in ([], ["--url", server.url]):
        out = _cli("predict", str(bad), "--ion", "Mg", *extra, env=env)
        assert out.returncode == 2 and "parse" in out.stderr
    out = _cli("predict", str(path), "--ion", "Xx", env=env)
    assert out.returncode == 2 and "unknown ion" in out.stderr
    out = _cli("predict", str(workdir / "missing.cif"), "--ion", "Li", env=env)
    assert out.returncode == 2 and "cannot read" in out.stderr


# ------------------------------------------------------------------------------ built Bento
def test_built_bento_serves_packaged_models_without_registry(store, workdir, local) -> None:
    if shutil.which("bentoml", path=str(VENV_BIN)) is None:
        pytest.skip("bentoml CLI not found")
    home = workdir / "bento_home"
    env = serve_env(home, store, VOLTAGE_IONS="Li,Mg")
    out = _cli("export-models", "--ion", "Li", "--ion", "Mg", env=env)
    assert out.returncode == 0, out.stderr
    assert "electrode-voltage-Li v1" in out.stdout
    build = subprocess.run(
        [str(VENV_BIN / "bentoml"), "build", "--output", "tag"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr + build.stdout
    bento = build.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    no_registry = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'nowhere' / 'x.db'}",
                   "VOLTAGE_DRIFT_REFERENCE": "", "VOLTAGE_WORKERS": "1"}  # fmt: skip
    srv = start_bento(workdir, no_registry, target=bento, wait_ready=True, cwd=workdir)
    try:
        text = cif(rocksalt())
        status, body = predict_http(srv, {"ion": "Li", "structure": text})
        assert status == 200, body
        assert body["model"] == {"name": "electrode-voltage-Li", "version": 1, "source": "bento"}
        want = local.predict_sync(PredictRequest("Li", text))
        assert body["voltage"] == pytest.approx(want.voltage, rel=1e-5)
        models = {r["ion"]: r for r in http_json(f"{srv.url}/models", method="GET")[1]["models"]}
        with store.active():
            mg = by_alias("electrode-voltage-Mg", "champion")  # v1, or v2 after the promotion
        assert models["Mg"]["source"] == "bento" and models["Mg"]["version"] == mg.version
        assert models["Mg"]["test_mae"] == pytest.approx(mg.test_mae)
    finally:
        srv.stop()
    assert not (workdir / "nowhere").exists()  # no empty store was created
