"""Interpretation: the local-voltage head's algebra, its storage, the analyses and the stage.

Models are tiny random CGCNNs saved with the real ``save_checkpoint`` (the maths under test does
not need a trained model); structures are small hand-built oxides.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from training.interpret.activations import compute_activations
from training.interpret.elements import embedding_analysis, spearman
from training.interpret.environments import element_medians, oxygen_neighbour_counts
from training.interpret.local_fit import fit_linear, fit_local_head
from voltage_model.artifact import save_checkpoint
from voltage_model.graphs.converter import GraphConverter
from voltage_model.local_voltage import EXTRA_KEY, LocalVoltageHead, backbone_fingerprint, explain
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, Head
from voltage_model.normalizer import Normalizer
from voltage_model.predict import VoltageModel

torch.set_num_threads(1)

CFG = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1)


def tiny_checkpoint(path: Path, n_members: int = 2, seed: int = 0, extra: dict | None = None):
    """A random ensemble checkpoint: ``n_members`` backbones with 2 heads each."""
    torch.manual_seed(seed)
    models = [CGCNN(CFG) for _ in range(n_members)]
    heads = [[Head(CFG), Head(CFG)] for _ in models]
    return save_checkpoint(
        path, models[0], CFG, GraphConverter(), Normalizer(3.0, 1.0),
        {"ion": "Li", "train_elements": ["Li", "Mn", "O"], **(extra or {})},
        heads=heads[0], members=list(zip(models[1:], heads[1:], strict=True)),
    )  # fmt: skip


def rocksalt(metal: str, a: float) -> Structure:
    """Conventional rocksalt MO cell (8 sites), written out: from_spacegroup costs ~2 s."""
    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    shifted = [[(x + 0.5) % 1, y, z] for x, y, z in fcc]
    return Structure(Lattice.cubic(a), [metal] * 4 + ["O"] * 4, fcc + shifted)


def oxides(n: int, seed: int = 0) -> list[Structure]:
    """Rocksalt MO (8 sites) and perovskite AMO3 (5 sites) cells with varied metals."""
    rng = np.random.default_rng(seed)
    metals = ["Mn", "Fe", "Co", "Ni", "Ti", "V", "Mg", "Li"]
    out = []
    for i in range(n):
        m = metals[i % len(metals)]
        if i % 2:
            a = rng.uniform(4.1, 4.6)
            out.append(rocksalt(m, a))
        else:
            a = rng.uniform(3.8, 4.1)
            coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
            out.append(Structure(Lattice.cubic(a), ["Li", m, "O", "O", "O"], coords))
    return out


@pytest.fixture
def model(tmp_path: Path) -> VoltageModel:
    return VoltageModel.from_checkpoint(tiny_checkpoint(tmp_path / "m.pt"))


def activations(vm: VoltageModel, structures: list[Structure]):
    graphs = vm.graphs(structures)
    ids = [f"s{i}" for i in range(len(graphs))]
    return compute_activations(vm.loaded, graphs, ids, vm.converter, vm.encoding, batch_size=3)


# =============================================================================== the head
def test_local_voltages_average_to_the_crystal_voltage_they_were_fitted_to(model):
    structures = oxides(6)  # 6 crystals <= F + 1 = 9 unknowns: least squares interpolates
    act = activations(model, structures)
    target = np.linspace(2.0, 4.5, 6)
    head = fit_local_head(act.pooled, target, backbone_fingerprint(model.loaded))
    np.testing.assert_allclose(head.crystal(act.pooled), target, atol=1e-4)
    for s, v in zip(structures, target, strict=True):
        sites = explain(model, s, head)
        assert [d["site"] for d in sites] == list(range(len(s)))
        assert [d["element"] for d in sites] == [site.specie.symbol for site in s]
        assert np.mean([d["local_voltage"] for d in sites]) == pytest.approx(v, abs=1e-4)


def test_explain_mean_equals_head_prediction_for_any_structure(model):
    act = activations(model, oxides(12))  # over-determined now: a genuine least-squares fit
    head = fit_local_head(act.pooled, act.predictions, backbone_fingerprint(model.loaded))
    new = oxides(4, seed=7)
    crystal = head.crystal(activations(model, new).pooled)
    for s, v in zip(new, crystal, strict=True):
        local = [d["local_voltage"] for d in explain(model, s, head)]
        assert np.mean(local) == pytest.approx(v, abs=1e-5)


def test_activations_predictions_match_the_service_path(model):
    structures = oxides(5)
    act = activations(model, structures)
    direct = [p.voltage for p in model.predict(structures)]
    np.testing.assert_allclose(act.predictions, direct, atol=1e-5)
    assert len(act.atom_vectors) == 2 and act.atom_vectors[0].shape == (
        sum(map(len, structures)),
        8,
    )


def test_head_round_trips_through_json_and_checkpoint_extra(model, tmp_path):
    act = activations(model, oxides(6))
    head = fit_local_head(
        act.pooled, np.arange(6.0), backbone_fingerprint(model.loaded), info={"ion": "Li"}
    )
    assert LocalVoltageHead.load(head.save(tmp_path / "h.json")) == head
    torch.save({"extra": {EXTRA_KEY: head.to_dict()}}, tmp_path / "x.pt")
    extra = torch.load(tmp_path / "x.pt", weights_only=True)["extra"]
    assert LocalVoltageHead.from_extra(extra) == head


def test_head_refuses_a_model_it_was_not_fitted_on(model, tmp_path):
    act = activations(model, oxides(6))
    head = fit_local_head(act.pooled, np.arange(6.0), backbone_fingerprint(model.loaded))
    other = VoltageModel.from_checkpoint(tiny_checkpoint(tmp_path / "o.pt", seed=1))
    with pytest.raises(ValueError, match="other backbones"):
        explain(other, oxides(1)[0], head)
    single = VoltageModel.from_checkpoint(tiny_checkpoint(tmp_path / "s.pt", n_members=1))
    with pytest.raises(ValueError, match="backbone"):
        head.check_matches(single.loaded)


def test_fit_linear_exact_and_ridge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + 3.0
    w, b = fit_linear(x, y)
    np.testing.assert_allclose(w, [1.0, -2.0, 0.5, 0.0], atol=1e-9)
    assert b == pytest.approx(3.0)
    w_r, _ = fit_linear(x, y, ridge=1e3)
    assert np.linalg.norm(w_r) < np.linalg.norm(w)  # shrunk, bias still free


# =============================================================================== analyses
def test_element_pca_has_one_row_per_element(model):
    zs = [26, 3, 8, 15, 25, 8]  # duplicates and order must not matter
    out = embedding_analysis(model.loaded.model, model.encoding, zs)
    assert out["elements"] == ["Li", "O", "P", "Mn", "Fe"]
    assert np.asarray(out["pc"]).shape == (5, 2)
    assert len(out["explained_variance_ratio"]) == 2
    assert set(out["spearman"]) == {"PC1", "PC2"}
    assert set(out["spearman"]["PC2"]) == {
        "covalent_radius", "electronegativity", "first_ionization_energy", "atomic_radius",
    }  # fmt: skip
    assert out["groups"] == [1, 16, 15, 7, 8]


def test_spearman_ignores_missing_values():
    a = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    r = spearman(a, np.array([10.0, 20.0, 30.0, 40.0, 0.0]))
    assert r["rho"] == pytest.approx(1.0) and r["n"] == 4


def test_oxygen_coordination_from_the_graph():
    mno = rocksalt("Mn", 4.44)
    graph = GraphConverter().convert(mno)
    counts = oxygen_neighbour_counts(graph)
    is_mn = graph.atomic_numbers == 25
    assert (counts[is_mn] == 6).all()  # octahedral Mn-O at 2.22 A
    assert (counts[~is_mn] == 0).all()  # O-O at 3.14 A is no bond


def test_element_medians_respect_mask_and_minimum():
    z = np.array([25, 25, 25, 26, 26, 8])
    local = np.array([1.0, 2.0, 9.0, 3.0, 5.0, 0.0])
    crystal = np.array([0, 0, 1, 1, 1, 1])
    mask = np.array([True, True, True, True, True, False])
    out = element_medians(z, local, crystal, mask, min_sites=3)
    assert set(out) == {"Mn"}
    assert out["Mn"]["median"] == 2.0 and out["Mn"]["n_structures"] == 2


# =============================================================================== the stage
def test_interpret_stage_writes_figures_json_head_and_mlflow(tiny_data, tmp_path, monkeypatch):
    from training.data.ion_inputs import IonInputs
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.stages.interpret import InterpretPaths, InterpretSettings, run_interpret
    from training.tracking import MlflowSettings, setup_mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mls = MlflowSettings(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="exp",
        artifact_location=(tmp_path / "art").as_uri(),
    )  # fmt: skip
    try:
        setup_mlflow(mls)
        with mlflow.start_run(run_name="train-Li") as parent:
            pass
        ckpt = tiny_checkpoint(tmp_path / "li.pt", extra={"mlflow_run_id": parent.info.run_id})
        baselines = tmp_path / "baselines_Li.json"
        baselines.write_text(json.dumps({
            "rf_importance_top15": [["MagpieData mean CovalentRadius", 0.25], ["x", 0.1]],
            "rf_importance_by_property": [["CovalentRadius", 0.36]],
        }))  # fmt: skip
        paths = InterpretPaths(tmp_path / "plots", tmp_path / "interpret.json", tmp_path / "h.json")
        settings = InterpretSettings(tsne_max_points=200, tsne_perplexity=5, batch_size=16)
        data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
        inputs = IonInputs(data, GraphStore.load(tiny_data["graphs"]), "Li")
        report = run_interpret(inputs, ckpt, baselines, paths, settings, mls)
        names = {"element_pca", "local_voltage", "environments", "rf_importance"}
        assert {p.stem for p in paths.plots_dir.glob("*.png")} == names
        saved = json.loads(paths.metrics.read_text())
        assert set(saved["claims"]) >= {"covalent_radius_tracks_pc2", "rf_covalent_radius_first"}
        assert saved["claims"]["rf_covalent_radius_first"]["held"] is True
        assert saved["model"]["mlflow_run_id"] == parent.info.run_id
        head = LocalVoltageHead.load(paths.head)
        head.check_matches(VoltageModel.from_checkpoint(ckpt).loaded)  # fitted on this model
        assert head.info["n_train"] == report["local_voltage"]["head"]["train"][
            "linear_head_vs_dft"
        ]["n"]  # fmt: skip
        runs = mlflow.search_runs(filter_string="tags.stage = 'interpret'", output_format="list")
        assert len(runs) == 1
        tags = runs[0].data.tags
        assert tags["model_run_id"] == parent.info.run_id
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert "spearman_PC2_covalent_radius" in runs[0].data.metrics
        arts = {
            a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "interpret")
        }
        assert "interpret/local_voltage.png" in arts and "interpret/interpret.json" in arts
        # The head in its own folder, named for the ion, loadable and fitted on this model.
        client = mlflow.MlflowClient()
        got = client.download_artifacts(runs[0].info.run_id, "local_voltage_head/Li.json",
                                        str(tmp_path / "dl"))  # fmt: skip
        LocalVoltageHead.load(Path(got)).check_matches(VoltageModel.from_checkpoint(ckpt).loaded)
    finally:
        mlflow.set_tracking_uri(None)
