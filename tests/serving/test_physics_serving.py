"""``discharged_structure`` -> ``physics_voltage`` through the predictor, the command line, and a
real ``bentoml serve`` over HTTP and gRPC (real CHGNet throughout).

The predictor tests are fast (a tiny CGCNN, CoO2/LiCoO2 built here). The server tests start one
``bentoml serve`` (1 worker, Li champion in a real MLflow store); they are marked slow like
tests/serving/test_service.py, whose module server they do not share so they can run alone.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from pymatgen.core import Structure
from typer.testing import CliRunner

from serving import voltage_pb2 as pb
from serving import voltage_pb2_grpc as rpc
from serving.config import ServingConfig
from serving.errors import ServingError
from serving.metrics import ServiceMetrics
from serving.models import ServedModel
from serving.predictor import Predictor, PredictRequest
from tests.serving_fixtures import (
    MlflowStore,
    build_checkpoint,
    cif,
    http_json,
    serve_env,
    served,
)
from tests.voltage_model.test_physics import layered
from voltage_model.models import physics
from voltage_model.predict import VoltageModel

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ends() -> dict[str, Structure]:
    return {"charged": layered(ion=None), "discharged": layered(), "other": layered("Ni")}


@pytest.fixture(scope="module")
def expected(ends: dict[str, Structure]) -> float:
    return physics.physics_voltage(ends["charged"], ends["discharged"], "Li").voltage


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_checkpoint(tmp_path_factory.mktemp("ckpt") / "li.pt", "Li", seed=1)
    served = ServedModel("Li", VoltageModel.from_checkpoint(path), "electrode-voltage-Li", 1,
                         "registry", test_mae=0.4)  # fmt: skip
    config = ServingConfig(ions=("Li",), drift_reference=None, records_path=None)
    pred = Predictor(config, ServiceMetrics(CollectorRegistry(), config.ions)).start()
    pred.set_model("Li", served)
    yield pred
    pred.stop()


def _request(ends: dict[str, Structure], discharged: str = "discharged", **extra: Any) -> dict:
    body = {"ion": "Li", "structure": cif(ends["charged"]), "format": "cif"}
    if discharged:
        body.update(discharged_structure=cif(ends[discharged]))
    return {**body, **extra}


def _refusal(predictor: Predictor, body: dict) -> ServingError:
    with pytest.raises(ServingError) as err:
        predictor.predict_sync(PredictRequest.from_mapping(body))
    return err.value


# ------------------------------------------------------------------------------ predictor
def test_physics_voltage_is_added_and_nothing_else_changes(predictor, ends, expected) -> None:
    plain = predictor.predict_sync(PredictRequest.from_mapping(_request(ends, "")))
    both = predictor.predict_sync(PredictRequest.from_mapping(_request(ends)))
    assert plain.physics_voltage is None and plain.to_dict()["physics_voltage"] is None
    assert both.physics_voltage == pytest.approx(expected, abs=1e-4)
    assert 2.0 < both.physics_voltage < 6.0
    rest = {k: v for k, v in both.to_dict().items() if k != "physics_voltage"}
    assert rest == {k: v for k, v in plain.to_dict().items() if k != "physics_voltage"}


def test_discharged_format_defaults_to_format(predictor, ends, expected) -> None:
    poscar = {"structure": ends["charged"].to(fmt="poscar"), "format": "poscar",
              "discharged_structure": ends["discharged"].to(fmt="poscar")}  # fmt: skip
    res = predictor.predict_sync(PredictRequest.from_mapping({"ion": "Li", **poscar}))
    assert res.physics_voltage == pytest.approx(expected, abs=1e-4)
    as_json = _request(ends, discharged_structure=ends["discharged"].as_dict(),
                       discharged_format="json")  # fmt: skip
    res = predictor.predict_sync(PredictRequest.from_mapping(as_json))
    assert res.physics_voltage == pytest.approx(expected, abs=1e-4)


def test_refusals_are_client_errors_naming_the_problem(predictor, ends) -> None:
    err = _refusal(predictor, _request(ends, "other"))
    assert (err.kind, err.http_status, err.grpc_code_name) == ("physics", 400, "INVALID_ARGUMENT")
    assert "CoO2" in err.message and "NiO2" in err.message
    err = _refusal(predictor, _request(ends, "charged"))
    assert err.kind == "physics" and "must hold more Li" in err.message
    err = _refusal(predictor, _request(ends, discharged_structure="garbage"))
    assert err.kind == "parse" and err.message.startswith("discharged structure:")
    err = _refusal(predictor, _request(ends, discharged_format="xyz"))
    assert err.kind == "format" and err.message.startswith("discharged structure:")
    err = _refusal(predictor, _request(ends, discharged_structure=5))
    assert err.kind == "parse" and "'discharged_structure' must be a string" in err.message


# ------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> MlflowStore:
    return MlflowStore.published(tmp_path_factory.mktemp("physics-mlflow"), {"Li": 1})


@pytest.fixture(scope="module")
def env(store: MlflowStore, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("bentoml_home")
    return serve_env(home, store, VOLTAGE_IONS="Li", VOLTAGE_WORKERS="1",
                     VOLTAGE_DRIFT_REFERENCE="", VOLTAGE_RECORDS="")  # fmt: skip


@pytest.fixture(scope="module")
def server(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Any:
    with served(tmp_path_factory.mktemp("physics-serve"), env=env, wait_ready=True) as srv:
        yield srv


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_http_and_grpc_carry_physics_voltage(server, ends, expected) -> None:
    status, body = http_json(f"{server.url}/predict", _request(ends), timeout=120)
    assert status == 200, body
    assert body["physics_voltage"] == pytest.approx(expected, abs=1e-4)
    status, plain = http_json(f"{server.url}/predict", _request(ends, ""))
    assert status == 200 and plain["physics_voltage"] is None
    assert plain["voltage"] == pytest.approx(body["voltage"], abs=1e-6)
    status, err = http_json(f"{server.url}/predict", _request(ends, "other"))
    assert status == 400 and err["kind"] == "physics" and "NiO2" in err["error"]

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = rpc.VoltageServiceStub(channel)
        msg = stub.Predict(pb.PredictRequest(**_request(ends)), timeout=120)
        assert msg.HasField("physics_voltage")
        assert msg.physics_voltage == pytest.approx(expected, abs=1e-4)
        plain_msg = stub.Predict(pb.PredictRequest(**_request(ends, "")))
        assert not plain_msg.HasField("physics_voltage")
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(**_request(ends, "other")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["voltage-error-kind"] == "physics"
    assert "NiO2" in info.value.details()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_prints_physics_voltage_and_exits_2_on_mismatch(server, env, ends, tmp_path) -> None:
    from serving.cli import app

    files = {}
    for name in ("charged", "discharged", "other"):
        files[name] = tmp_path / f"{name}.cif"
        files[name].write_text(cif(ends[name]))
    base = ["predict", str(files["charged"]), "--ion", "Li"]
    runner = CliRunner()
    for where in ([], ["--url", server.url]):
        ok = runner.invoke(app, [*base, *where, "--discharged", str(files["discharged"]),
                                 "--json"], env=env)  # fmt: skip
        assert ok.exit_code == 0, ok.output
        assert json.loads(ok.stdout)["physics_voltage"] is not None
        bad = runner.invoke(app, [*base, *where, "--discharged", str(files["other"])], env=env)
        assert bad.exit_code == 2 and "physics" in bad.stderr and "NiO2" in bad.stderr
    table = runner.invoke(app, [*base, "--discharged", str(files["discharged"])], env=env)
    assert table.exit_code == 0 and "physics voltage" in table.stdout
    missing = runner.invoke(app, [*base, "--discharged", str(tmp_path / "none.cif")], env=env)
    assert missing.exit_code == 2 and "cannot read discharged structure" in missing.stderr
