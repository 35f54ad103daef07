"""``"explain": true``: per-site local voltages from the ion's fitted local-voltage head."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from serving.config import ServingConfig
from serving.metrics import ServiceMetrics
from serving.models import ServedModel
from serving.predictor import Predictor, PredictRequest
from tests.serving_fixtures import build_checkpoint, cif, sample_structures
from training.interpret.local_fit import fit_local_head
from voltage_model.graphs.batch import collate
from voltage_model.local_voltage import backbone_fingerprint, member_atom_vectors
from voltage_model.predict import VoltageModel


def _fit_head(model: VoltageModel):
    """Fit a head on the model's own per-crystal mean atom vectors (what the stage does)."""
    structures = sample_structures(12)
    graphs = model.graphs(structures)
    batch = collate(graphs, model.converter, model.encoding)
    atoms = member_atom_vectors(model.loaded, batch)
    idx = batch.crystal_idx.numpy()
    pooled = [
        np.stack([a.numpy()[idx == i].mean(axis=0) for i in range(len(graphs))]) for a in atoms
    ]
    targets = np.linspace(1.0, 4.0, len(graphs))
    return fit_local_head(pooled, targets, backbone_fingerprint(model.loaded), ridge=1e-3)


@pytest.fixture
def setup(tmp_path):
    model = VoltageModel.from_checkpoint(build_checkpoint(tmp_path / "li.pt", "Li", 1))
    other = VoltageModel.from_checkpoint(build_checkpoint(tmp_path / "li2.pt", "Li", 2))
    heads = tmp_path / "heads"
    head = _fit_head(model)
    head.save(heads / "Li.json")
    config = ServingConfig(ions=("Li",), drift_reference=None, records_path=None,
                           local_voltage_dir=heads)  # fmt: skip
    p = Predictor(config, ServiceMetrics(CollectorRegistry(), config.ions)).start()
    yield p, model, other, head
    p.stop()


def test_explain_returns_site_voltages_whose_mean_is_the_head_prediction(setup):
    p, model, _, head = setup
    p.set_model("Li", ServedModel("Li", model, "electrode-voltage-Li", 1, "registry"))
    s = sample_structures(3)[2]
    res = p.predict_sync(PredictRequest("Li", cif(s), explain=True))
    rows = res.to_dict()["local_voltages"]
    assert [r["site"] for r in rows] == list(range(len(s)))
    assert [r["element"] for r in rows] == [site.specie.symbol for site in s]
    graph = model.graphs([s])
    batch = collate(graph, model.converter, model.encoding)
    pooled = [a.mean(dim=0, keepdim=True) for a in member_atom_vectors(model.loaded, batch)]
    crystal = float(head.crystal(pooled)[0])
    assert np.mean([r["local_voltage"] for r in rows]) == pytest.approx(crystal, abs=1e-4)
    # Without explain, no local voltages are computed or returned.
    plain = p.predict_sync(PredictRequest("Li", cif(s))).to_dict()
    assert plain["local_voltages"] is None
    assert plain["voltage"] == pytest.approx(res.voltage)


def test_head_of_other_backbones_is_refused_with_a_warning(setup):
    p, _, other, _ = setup
    p.set_model("Li", ServedModel("Li", other, "electrode-voltage-Li", 2, "registry"))
    res = p.predict_sync(PredictRequest("Li", cif(sample_structures(1)[0]), explain=True))
    assert res.local_voltages is None
    assert any("fitted on other backbones" in w for w in res.warnings)


def test_explain_must_be_boolean():
    from serving.errors import ServingError

    with pytest.raises(ServingError, match="explain"):
        PredictRequest.from_mapping({"ion": "Li", "structure": "x", "explain": "yes"})


def test_grpc_explain_returns_the_same_site_voltages(setup):
    """gRPC ``explain`` is the HTTP field's twin: a real ``grpc.aio`` server on 127.0.0.1 answers
    with the predictor's own local voltages, site by site."""
    import asyncio

    import grpc

    from serving import voltage_pb2, voltage_pb2_grpc
    from serving.grpc_server import GrpcServer

    p, model, _, _ = setup
    p.set_model("Li", ServedModel("Li", model, "electrode-voltage-Li", 1, "registry"))
    s = sample_structures(3)[1]
    direct = p.predict_sync(PredictRequest("Li", cif(s), explain=True)).to_dict()

    async def call(explain: bool) -> voltage_pb2.Prediction:
        server = GrpcServer(p, port=0)
        port = await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = voltage_pb2_grpc.VoltageServiceStub(channel)
                req = voltage_pb2.PredictRequest(ion="Li", structure=cif(s), explain=explain)
                return await stub.Predict(req, timeout=60)
        finally:
            await server.stop(grace=0)

    got = asyncio.run(call(True))
    rows = [(r.site, r.element, r.local_voltage) for r in got.local_voltages]
    want = [(r["site"], r["element"], r["local_voltage"]) for r in direct["local_voltages"]]
    assert [r[:2] for r in rows] == [r[:2] for r in want]
    np.testing.assert_allclose([r[2] for r in rows], [r[2] for r in want], atol=1e-6)
    assert got.voltage == pytest.approx(direct["voltage"], abs=1e-6)
    assert len(asyncio.run(call(False)).local_voltages) == 0


@pytest.mark.parametrize("folder", ["local_voltage_head", "interpret"])  # current, legacy
def test_champion_older_than_the_sidecar_is_explained_from_its_own_run(tmp_path, folder):
    """The sidecar holds the newest model's head; a champion kept by the promotion gate finds
    the head its interpret run logged in MLflow (real sqlite store), checked like any other."""
    import mlflow

    model = VoltageModel.from_checkpoint(build_checkpoint(tmp_path / "old.pt", "Li", 1))
    newest = VoltageModel.from_checkpoint(build_checkpoint(tmp_path / "new.pt", "Li", 2))
    sidecar = tmp_path / "sidecar"
    _fit_head(newest).save(sidecar / "Li.json")
    logged = tmp_path / "logged" / "Li.json"
    head = _fit_head(model)
    head.save(logged)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    model_run = client.create_run(exp, tags={"stage": "train"}).info.run_id
    interp = client.create_run(exp, tags={"stage": "interpret", "model_run_id": model_run})
    client.log_artifact(interp.info.run_id, str(logged), folder)
    config = ServingConfig(ions=("Li",), drift_reference=None, records_path=None,
                           local_voltage_dir=sidecar, tracking_uri=uri)  # fmt: skip
    p = Predictor(config, ServiceMetrics(CollectorRegistry(), config.ions)).start()
    try:
        s = sample_structures(2)[1]
        served = ServedModel("Li", model, "electrode-voltage-Li", 2, "registry", run_id=model_run)
        p.warm(served)  # what the watcher does before a swap: the registry is asked here, ...
        p.set_model("Li", served)
        (tmp_path / "mlflow.db").rename(tmp_path / "gone.db")  # ... not on the request path
        res = p.predict_sync(PredictRequest("Li", cif(s), explain=True))
        assert res.local_voltages is not None and not res.warnings
        (tmp_path / "gone.db").rename(tmp_path / "mlflow.db")
        batch = collate(model.graphs([s]), model.converter, model.encoding)
        pooled = [a.mean(dim=0, keepdim=True) for a in member_atom_vectors(model.loaded, batch)]
        mean = np.mean([r["local_voltage"] for r in res.local_voltages])
        assert mean == pytest.approx(float(head.crystal(pooled)[0]), abs=1e-4)
        # A version whose run logged no head: both places are named in the warning.
        p.set_model("Li", ServedModel("Li", model, "electrode-voltage-Li", 3, "registry",
                                      run_id=interp.info.run_id))  # fmt: skip
        res = p.predict_sync(PredictRequest("Li", cif(s), explain=True))
        assert res.local_voltages is None
        (note,) = [w for w in res.warnings if "local voltages unavailable" in w]
        assert "fitted on other backbones" in note and "registry" in note
    finally:
        p.stop()
