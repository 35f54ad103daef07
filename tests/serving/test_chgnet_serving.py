"""A champion that serves a CHGNet head, through the in-process predictor and a real
``bentoml serve`` (HTTP and gRPC): same answers, ``/models`` names the backbone, ``explain``
gives CHGNet local voltages mixed by the served share (real CHGNet throughout)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from serving import voltage_pb2 as pb
from serving import voltage_pb2_grpc as rpc
from serving.config import ServingConfig
from serving.predictor import PredictRequest
from serving.runtime import ServingRuntime
from tests.serving_fixtures import (
    MlflowStore,
    cif,
    http_json,
    sample_structures,
    served,
)
from voltage_model.local_voltage import (
    ChgnetLocalHead,
    LocalVoltageHead,
    backbone_fingerprint,
)
from voltage_model.models import chgnet_backbone
from voltage_model.predict import VoltageModel

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chgnet-serve")


@pytest.fixture(scope="module")
def store(workdir: Path) -> MlflowStore:
    return MlflowStore.published(workdir / "mlflow", {
        "Ca": {"seed": 4, "chgnet_weight": 0.5},  # the average of CGCNN and CHGNet
        "Zn": {"seed": 5, "chgnet_weight": 1.0},  # the CHGNet head alone
    })  # fmt: skip


@pytest.fixture(scope="module")
def heads(workdir: Path, store: MlflowStore) -> Path:
    """Local-voltage sidecars of both champions: a CGCNN head of constant 1 V per site and a
    CHGNet head with known weights, so the mixed local voltages can be computed here."""
    folder = workdir / "local_voltage"
    for ion, seed in (("Ca", 4), ("Zn", 5)):
        model = VoltageModel.from_checkpoint(store.root / "checkpoints" / f"{ion}-{seed}.pt")
        n, dim = len(model.loaded.backbones()), model.loaded.model.config.atom_fea_len
        w = np.random.default_rng(seed).normal(scale=0.01, size=chgnet_backbone.ATOM_DIM)
        chg = ChgnetLocalHead(tuple(w), 2.0, dict(model.loaded.chgnet.spec))
        head = LocalVoltageHead(tuple((0.0,) * dim for _ in range(n)), (1.0,) * n,
                                backbone_fingerprint(model.loaded), chgnet=chg)  # fmt: skip
        head.save(folder / f"{ion}.json")
    return folder


@pytest.fixture(scope="module")
def server(workdir: Path, store: MlflowStore, heads: Path) -> Any:
    with served(
        workdir, store, wait_ready=True, VOLTAGE_IONS="Ca,Zn", VOLTAGE_WORKERS="1",
        VOLTAGE_LOCAL_VOLTAGE_DIR=str(heads), VOLTAGE_RELOAD_INTERVAL="60",
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def local(store: MlflowStore, heads: Path) -> Any:
    config = ServingConfig(ions=("Ca", "Zn"), tracking_uri=store.tracking_uri,
                           model_source="registry", drift_reference=None, records_path=None,
                           local_voltage_dir=heads)  # fmt: skip
    runtime = ServingRuntime(config).start(watch=False)
    yield runtime.predictor
    runtime.stop()


def test_http_and_grpc_serve_the_chgnet_champions_like_the_predictor(server, local) -> None:
    channel = grpc.insecure_channel(server.grpc_target)
    stub = rpc.VoltageServiceStub(channel)
    try:
        for ion in ("Ca", "Zn"):
            for s in sample_structures(3, seed=11):
                text = cif(s)
                status, body = http_json(f"{server.url}/predict", {"ion": ion, "structure": text})
                assert status == 200, body
                msg = stub.Predict(pb.PredictRequest(ion=ion, structure=text))
                want = local.predict_sync(PredictRequest(ion, text))
                for got in (body["voltage"], msg.voltage):
                    assert got == pytest.approx(want.voltage, rel=1e-5, abs=1e-5)
                assert body["uncertainty"] == pytest.approx(want.uncertainty, rel=1e-4, abs=1e-5)
    finally:
        channel.close()
    status, models = http_json(f"{server.url}/models", method="GET")
    assert status == 200
    backbones = {m["ion"]: m["backbone"] for m in models["models"]}
    assert backbones == {"Ca": "cgcnn+chgnet", "Zn": "chgnet"}


def test_explain_mixes_cgcnn_and_chgnet_local_voltages(server, heads) -> None:
    s = sample_structures(1, seed=3)[0]
    for ion, weight in (("Ca", 0.5), ("Zn", 1.0)):
        status, body = http_json(f"{server.url}/predict",
                                 {"ion": ion, "structure": cif(s), "explain": True})  # fmt: skip
        assert status == 200, body
        head = LocalVoltageHead.load(heads / f"{ion}.json")
        atoms = chgnet_backbone.atom_features(s)
        want = (1 - weight) * 1.0 + weight * head.chgnet.local(atoms)
        got = [site["local_voltage"] for site in body["local_voltages"]]
        assert got == pytest.approx(want.tolist(), abs=1e-4)



def test_grpc_list_models_names_the_backbone(server) -> None:
    channel = grpc.insecure_channel(server.grpc_target)
    try:
        res = rpc.VoltageServiceStub(channel).ListModels(pb.ListModelsRequest())
    finally:
        channel.close()
    assert {m.ion: m.backbone for m in res.models} == {"Ca": "cgcnn+chgnet", "Zn": "chgnet"}
