"""The pretrained release (training/release.py) and serving from it (issue 17, parts 2 and 4).

Why these checks: the release drops each GP head's Cholesky factor and stores its training inputs
in a smaller form, so it must predict exactly what its source artifact predicts (voltages and
stds, on real crystals, with every kind of GP head the pipeline serves: descriptor columns, ion
columns of a pooled head, a CHGNet head); a changed file must be refused, never served; and the
service and command line must fall back to it when the registry has no champion, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.serving_fixtures import (
    REPO,
    MlflowStore,
    build_checkpoint,
    cif,
    rocksalt,
    sample_structures,
)

OMP = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# ------------------------------------------------------------------------------ fixtures
def _li_structures(tiny_data: dict[str, Path]) -> list[Any]:
    """Every real crystal of the mini snapshot's Li splits (train, val and test)."""
    from training.datasets import load_ion_data

    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    return [r.structure() for part in ("train", "val", "test") for r in data.parts[part]]


def _with_gp_heads(source: Path, tiny_data: dict[str, Path], out: Path) -> Path:
    """The source Li ensemble (two members) plus a GP head per member like the pipeline's: the
    first reads composition descriptors, the second also ion columns (a pooled head); and a
    CHGNet GP head served half-and-half with the CGCNN ensemble (schema 5)."""
    from training.datasets import load_ion_data
    from voltage_model.artifact import ChgnetPart, load_checkpoint, save_checkpoint
    from voltage_model.graphs.batch import collate
    from voltage_model.models import chgnet_backbone
    from voltage_model.models.descriptors import batch_descriptors
    from voltage_model.models.gp_head import GPConfig, fit_gp_head
    from voltage_model.predict import VoltageModel

    loaded = load_checkpoint(source)
    vm = VoltageModel(loaded)
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    structures = [r.structure() for r in data.parts["train"]]
    y = loaded.normalizer.norm(data.targets("train"))
    batch = collate([vm.prepare(s) for s in structures], vm.converter, vm.encoding)
    desc = batch_descriptors(batch.atomic_numbers, batch.crystal_idx, batch.n_crystals).numpy()
    tasks = np.zeros((len(y), 2))
    tasks[np.arange(len(y)) % 3 != 0, 0] = 1.0  # two "ions": the head serves column 0
    tasks[:, 1] = 1.0 - tasks[:, 0]
    backbones = loaded.backbones()
    gp_heads = []
    for i, (model, _) in enumerate(backbones):
        with torch.no_grad():
            pooled = model.pooled(batch)
        if i == 0:
            cfg = GPConfig(nu=1.5, descriptor_weights=(1.0,))
            gp_heads.append(fit_gp_head(pooled, y, cfg, desc).eval())
        else:
            cfg = GPConfig(nu=2.5, descriptor_weights=(0.5,), task_weights=(2.0,))
            gp_heads.append(fit_gp_head(pooled, y, cfg, desc, tasks).eval())
    feats, _ = chgnet_backbone.featurise(structures)
    chgnet = ChgnetPart(fit_gp_head(torch.from_numpy(feats), y, GPConfig()).eval(),
                        loaded.normalizer, chgnet_backbone.spec(), 0.5)  # fmt: skip
    (m0, h0), *rest = backbones
    return save_checkpoint(
        out, m0, loaded.model_config, loaded.converter_dict, loaded.normalizer,
        {**loaded.extra, "ion": "Li"}, heads=[*h0, gp_heads[0]],
        members=[(m, [*h, g]) for (m, h), g in zip(rest, gp_heads[1:], strict=True)],
        chgnet=chgnet,
    )  # fmt: skip


@pytest.fixture(scope="module")
def models_dir(
    source: Path, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Served artifacts as the pipeline leaves them: Li with GP heads, Na a plain MLP ensemble."""
    root = tmp_path_factory.mktemp("ions")
    _with_gp_heads(source, tiny_data, root / "Li.pt")
    build_checkpoint(root / "Na.pt", "Na", seed=5)
    return root


@pytest.fixture(scope="module")
def release(
    models_dir: Path, tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    from training.release import ReleaseInputs, ReleaseOptions, write_release

    root = tmp_path_factory.mktemp("release")
    reports = root / "reports"
    (reports / "metrics").mkdir(parents=True)
    (reports / "metrics" / "ion_Li.json").write_text(json.dumps({
        "test_mae": 0.31, "n": {"train": 30, "val": 4, "test": 4}, "run_id": "r-li",
        "uncertainty": {"coverage_90": 0.88, "mean_std": 0.4}}))  # fmt: skip
    (reports / "registry.json").write_text(json.dumps({
        "Li": {"name": "electrode-voltage-Li", "version": 3, "run_id": "r-li"}}))  # fmt: skip
    inputs = ReleaseInputs(models_dir, reports, tiny_data["clean"], tiny_data["splits"], REPO)
    out = root / "release"
    manifest = write_release(["Li", "Na"], out, inputs, ReleaseOptions(check_n=4))
    return {"dir": out, "manifest": manifest}


# ------------------------------------------------------------------------------ GP posterior
@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_gp_cholesky_is_scikit_learns(nu: float) -> None:
    from voltage_model.models.gp_head import GPConfig, fit_gp_head
    from voltage_model.release import gp_cholesky, shared_sqdists

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(60, 5)))
    y = np.sin(x[:, 0].numpy()) + 0.1 * rng.normal(size=60)
    head = fit_gp_head(x, y, GPConfig(nu=nu))
    again = gp_cholesky(head.x_train, head.kernel)
    assert torch.allclose(again, head.chol, rtol=0, atol=1e-12 * float(head.chol.abs().max()))
    # heads sharing input columns share that part of the distances: same factor
    other = head.x_train.clone()
    other[:, 0] = torch.from_numpy(rng.normal(size=60))
    sq = shared_sqdists([head.x_train, other])
    assert sq[0] is not None and sq[1] is not None
    shared = gp_cholesky(head.x_train, head.kernel, sq[0])
    assert torch.allclose(shared, head.chol, rtol=0, atol=1e-12 * float(head.chol.abs().max()))


# ------------------------------------------------------------------------------ round trip
def test_release_predicts_exactly_what_its_source_predicts(
    release: dict[str, Any], models_dir: Path, tiny_data: dict[str, Path]
) -> None:
    from voltage_model.artifact import load_checkpoint
    from voltage_model.predict import VoltageModel
    from voltage_model.release import load_release

    manifest = release["manifest"]
    li = manifest["models"]["Li"]
    assert li["check"]["n"] == 4 and li["check"]["max_abs_voltage_diff"] <= 1e-6
    assert len(li["gp_heads"]) == 3  # the two members' GP heads and the CHGNet head
    assert not any(h["chol_kept"] for h in li["gp_heads"].values())
    assert any(h["float32_columns"] for h in li["gp_heads"].values())
    assert li["bytes"] < li["source"]["bytes"]
    assert (li["name"], li["version"]) == ("electrode-voltage-Li", 3)  # the receipt's run
    assert manifest["models"]["Na"]["version"] == 0  # never registered

    model, _ = load_release(release["dir"], "Li")
    full = VoltageModel(load_checkpoint(models_dir / "Li.pt"))
    assert model.backbone == full.backbone == "cgcnn+chgnet"
    structures = [*_li_structures(tiny_data), *sample_structures(4, seed=3)]
    inputs = full.graphs(structures)
    m_full, s_full = full.predict_graphs(inputs)
    m_rel, s_rel = model.predict_graphs(model.graphs(structures))
    np.testing.assert_allclose(m_rel, m_full, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s_rel, s_full, rtol=0, atol=1e-6)
    assert s_full.min() > 0  # GP variances are in the comparison, not zeros

    # the release's own posterior equals the source's head by head
    for (_, heads_a), (_, heads_b) in zip(model.loaded.backbones(), full.loaded.backbones(),
                                          strict=True):  # fmt: skip
        for a, b in zip(heads_a, heads_b, strict=True):
            for name, tensor in b.state_dict().items():
                if name == "chol":
                    assert torch.allclose(a.state_dict()[name], tensor, rtol=0, atol=1e-10)
                else:
                    assert torch.equal(a.state_dict()[name], tensor), name


def test_float32_inputs_are_smaller_and_checked(
    release: dict[str, Any], models_dir: Path, tiny_data: dict[str, Path], tmp_path: Path
) -> None:
    """The rounded form (``--float32-inputs``, the fallback over the size limit) stays within
    its tolerance of the source, and its factors are recomputed, never kept."""
    from training.release import ReleaseInputs, ReleaseOptions, write_release

    inputs = ReleaseInputs(models_dir, tmp_path, tiny_data["clean"], tiny_data["splits"], REPO)
    options = ReleaseOptions(check_n=4, float32_inputs=True)  # tolerance: 1e-4 V when rounded
    manifest = write_release(["Li"], tmp_path / "f32", inputs, options)
    li, exact = manifest["models"]["Li"], release["manifest"]["models"]["Li"]
    assert manifest["float32_inputs"] is True
    assert li["bytes"] < exact["bytes"]
    assert sum(h["rounded_columns"] for h in li["gp_heads"].values()) > 0
    assert not any(h["chol_kept"] for h in li["gp_heads"].values())
    assert li["check"]["n"] == 4 and li["check"]["max_abs_voltage_diff"] <= 1e-4
    assert li["check"]["max_abs_std_diff"] <= 1e-4


def test_released_model_matches_voltage_model_attributes(
    release: dict[str, Any], models_dir: Path
) -> None:
    """``ReleasedModel`` skips mendeleev but must set up exactly what ``VoltageModel`` does."""
    from voltage_model.artifact import load_checkpoint
    from voltage_model.predict import VoltageModel
    from voltage_model.release import load_release

    model, _ = load_release(release["dir"], "Na")
    full = VoltageModel(load_checkpoint(models_dir / "Na.pt"))
    assert set(vars(model)) == set(vars(full))
    assert torch.equal(model.encoding, full.encoding)
    assert model.converter == full.converter and model.std_scale == full.std_scale
    assert model.train_elements == full.train_elements


def test_model_card_and_manifest(release: dict[str, Any]) -> None:
    from voltage_model.release import verify_release

    folder = release["dir"]
    card = (folder / "MODEL_CARD.md").read_text()
    assert "| Li |" in card and "0.310" in card and "electrode-voltage-Li v3" in card
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["git_commit"] and manifest["created"] and "data" in manifest
    assert set(manifest["models"]) == {"Li", "Na"}
    assert verify_release(folder) == []


def test_changed_release_file_is_refused(release: dict[str, Any], tmp_path: Path) -> None:
    from serving.models import ModelLoadError, load_release_model
    from voltage_model.release import ReleaseError, load_release, verify_release

    copy = tmp_path / "release"
    shutil.copytree(release["dir"], copy)
    path = copy / "Na.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ReleaseError, match="does not match the release manifest"):
        load_release(copy, "Na")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_release_model("Na", copy)
    assert verify_release(copy) == [f"Na: {path} changed since the release was written"]
    with pytest.raises(ReleaseError, match="has no model for K"):
        load_release(copy, "K")
    with pytest.raises(ReleaseError, match=r"manifest\.json missing"):
        load_release(tmp_path / "nowhere", "Li")


def test_release_over_the_size_limit_is_refused_and_nothing_is_replaced(
    release: dict[str, Any], models_dir: Path, tmp_path: Path
) -> None:
    from training.release import ReleaseInputs, ReleaseOptions, write_release
    from voltage_model.release import ReleaseError

    out = tmp_path / "release"
    out.mkdir()
    (out / "keep.txt").write_text("old release")
    inputs = ReleaseInputs(models_dir, tmp_path / "no-reports", None, None, REPO)
    with pytest.raises(ReleaseError, match="over the"):
        write_release(["Na"], out, inputs, ReleaseOptions(check_n=0, max_bytes=1000))
    assert (out / "keep.txt").read_text() == "old release"
    assert not (tmp_path / ".release.tmp").exists()


# ------------------------------------------------------------------------------ serving
def test_service_serves_the_release_where_the_registry_has_no_champion(
    release: dict[str, Any], tmp_path: Path
) -> None:
    """Registry champion for Li, none for Na: Li from the registry, Na from the release (and
    said so in answers and the model list); a later Na champion replaces the release."""
    from serving.config import ServingConfig
    from serving.predictor import PredictRequest
    from serving.runtime import ServingRuntime
    from voltage_model.registry import champion_in_store

    store = MlflowStore.create(tmp_path / "mlflow")
    with store.active():
        store.publish("Li", seed=1)
        store.publish("Na", seed=2, alias=None)  # registered, no champion
    assert champion_in_store(store.tracking_uri, "electrode-voltage-Li") is True
    assert champion_in_store(store.tracking_uri, "electrode-voltage-Na") is False
    assert champion_in_store(f"sqlite:///{tmp_path / 'none.db'}", "x") is False
    assert champion_in_store("http://127.0.0.1:1", "x") is None
    assert not (tmp_path / "none.db").exists()

    config = ServingConfig(ions=("Li", "Na"), tracking_uri=store.tracking_uri,
                           drift_reference=None, records_path=None,
                           release_dir=release["dir"])  # fmt: skip
    runtime = ServingRuntime(config).start(watch=False)
    try:
        models = {r["ion"]: r["model"] for r in runtime.predictor.list_models()}
        assert models["Li"]["source"] == "registry" and models["Li"]["version"] == 1
        assert models["Na"]["source"] == "release"
        answer = runtime.predictor.predict_sync(PredictRequest("Na", cif(rocksalt())))
        assert answer.to_dict()["model"]["source"] == "release"
        with store.active():
            store.publish("Na", seed=3)  # promoted: champion
        runtime.manager.poll_once()
        assert runtime.predictor.model_for("Na").source == "registry"
    finally:
        runtime.stop()

    strict = ServingConfig(ions=("Na",), tracking_uri=f"sqlite:///{tmp_path / 'none.db'}",
                           model_source="registry", drift_reference=None, records_path=None,
                           release_dir=release["dir"])  # fmt: skip
    runtime = ServingRuntime(strict).start(watch=False)
    try:  # registry only: the release never stands in
        assert runtime.predictor.model_for("Na") is None
    finally:
        runtime.stop()


def test_empty_registry_serves_the_release_without_mlflow(
    release: dict[str, Any], tmp_path: Path
) -> None:
    """No store at all (a fresh checkout): every ion from the release, MLflow never imported."""
    code = f"""
import sys
from serving.config import ServingConfig
from serving.runtime import ServingRuntime
c = ServingConfig(ions=("Li", "Na"), tracking_uri="sqlite:///{tmp_path / "none.db"}",
                  drift_reference=None, records_path=None, release_dir=r"{release["dir"]}")
rt = ServingRuntime(c).start(watch=False)
print(sorted((i, m.source) for i, m in rt.predictor.models().items()), "mlflow" in sys.modules)
rt.stop()
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300, env={**os.environ, **OMP})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[('Li', 'release'), ('Na', 'release')] False"


# ------------------------------------------------------------------------------ command line
_TRACE = (
    "import atexit, sys; atexit.register(lambda: print('IMPORTED', sorted(m for m in "
    "('torch', 'mlflow', 'voltage_model.predict', 'matminer') if m in sys.modules), "
    "file=sys.stderr)); from serving.cli import app; app()"
)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _TRACE, *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env={**os.environ, **OMP, **env},
    )  # fmt: skip


def test_cli_refuses_a_bad_file_before_anything_heavy_is_imported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n_cell_length_a 4\nnot a structure\n")
    out = _cli("predict", str(bad), "--ion", "Li", env={})
    assert out.returncode == 2, out.stderr
    assert "error: parse:" in out.stderr
    assert "IMPORTED []" in out.stderr  # no torch, MLflow or model code was imported
    overlapping = tmp_path / "two.poscar"
    overlapping.write_text("x\n1.0\n4 0 0\n0 4 0\n0 0 4\nMn O\n1 1\ndirect\n0 0 0\n0 0 0.01\n")
    out = _cli("predict", str(overlapping), "--ion", "Li", env={})
    assert out.returncode == 2 and "overlapping_atoms" in out.stderr
    assert "IMPORTED []" in out.stderr
    out = _cli("predict", str(tmp_path / "missing.cif"), "--ion", "Li", env={})
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_cli_predicts_from_the_release_without_mlflow(
    release: dict[str, Any], tmp_path: Path
) -> None:
    from voltage_model.release import load_release

    path = tmp_path / "cell.cif"
    path.write_text(cif(rocksalt(4.3, "Co")))
    env = {"VOLTAGE_RELEASE_DIR": str(release["dir"]),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'none.db'}"}  # fmt: skip
    out = _cli("predict", str(path), "--ion", "na", "--json", env=env)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["model"] == {"name": "electrode-voltage-Na", "version": 0, "source": "release"}
    assert "'mlflow'" not in out.stderr.split("IMPORTED")[-1]
    model, _ = load_release(release["dir"], "Na")
    want = model.predict([rocksalt(4.3, "Co")])[0]
    assert answer["voltage"] == pytest.approx(want.voltage, abs=1e-6)
    assert not (tmp_path / "none.db").exists()

    table = _cli("predict", str(path), "--ion", "Na", "--source", "release", env=env)
    assert table.returncode == 0 and "(release)" in table.stdout
    missing = _cli("predict", str(path), "--ion", "K", env=env)
    assert missing.returncode == 3 and "release" in missing.stderr
    wrong = _cli("predict", str(path), "--ion", "Na", "--source", "bento", env=env)
    assert wrong.returncode == 2 and "--source" in wrong.stderr
