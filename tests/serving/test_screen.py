"""Screening: bad files are reported, results are ranked, resume skips done work, shards merge.

A tiny random checkpoint (real ``save_checkpoint``) screens a folder of small pymatgen-built
structures written as CIF, POSCAR and JSON, plus deliberately broken files.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from pymatgen.io.vasp import Poscar

from serving.screen.inputs import list_inputs, parse_shard, select_shard
from serving.screen.merge import merge_screen
from serving.screen.partial import partial_path, read_partial
from serving.screen.run import run_screen
from voltage_model.artifact import save_checkpoint
from voltage_model.cif import fast_p1_cif
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, Head
from voltage_model.normalizer import Normalizer
from voltage_model.predict import VoltageModel
from voltage_model.structures import parse_structure

torch.set_num_threads(1)

CFG = CGCNNConfig(atom_fea_len=8, h_fea_len=8, n_conv=1)
GOOD_CIFS = 6
BAD = {
    "bad/garbage.cif": "parse",
    "bad/overlap.cif": "overlapping_atoms",
    "bad/binary.cif": "parse",
}


def tiny_model(path: Path, seed: int = 0) -> VoltageModel:
    torch.manual_seed(seed)
    model = CGCNN(CFG)
    save_checkpoint(
        path, model, CFG, GraphConverter(), Normalizer(3.0, 1.0),
        {"ion": "Li", "train_elements": ["Li", "Mn", "Fe", "Co", "O"], "std_scale": 2.0},
        heads=[Head(CFG), Head(CFG)],
    )  # fmt: skip
    return VoltageModel.from_checkpoint(path)


def structures() -> list[Structure]:
    """Triclinic-ish and cubic cells, coordinates at 1/3 and 2/3 included (pymatgen rounds them)."""
    metals = ["Mn", "Fe", "Co", "Ni", "Ti", "V", "Mn", "Fe"]
    out = []
    for i, m in enumerate(metals):
        lat = Lattice.from_parameters(4.0 + 0.1 * i, 4.3, 4.6 + 0.05 * i, 88.0, 95.0 + i, 119.0)
        coords = [[0, 0, 0], [1 / 3, 2 / 3, 0.5], [0.5, 0.2, 0.25], [0.1, 0.6, 0.8]]
        out.append(Structure(lat, ["Li", m, "O", "O"], coords))
    return out


def write_inputs(root: Path) -> dict[str, Structure]:
    """CIFs, one POSCAR, one JSON, broken files and a README; returns the good ones by id."""
    root.mkdir(parents=True)
    good = {}
    ss = structures()
    for i, s in enumerate(ss[:GOOD_CIFS]):
        good[f"cif/s{i}.cif"] = s
    good["poscar/POSCAR_7"] = ss[6]
    good["json/s8.json"] = ss[7]
    for key, s in good.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if key.endswith(".cif"):
            path.write_text(str(CifWriter(s)))
        elif key.endswith(".json"):
            path.write_text(json.dumps(s.as_dict()))
        else:
            path.write_text(Poscar(s).get_str())
    (root / "bad").mkdir()
    (root / "bad/garbage.cif").write_text("data_x\n_cell_length_a 4\nthis is not a cif\n")
    overlap = Structure(Lattice.cubic(4.0), ["Mn", "O"], [[0, 0, 0], [0.01, 0, 0]])
    (root / "bad/overlap.cif").write_text(str(CifWriter(overlap)))
    (root / "bad/binary.cif").write_bytes(b"\xff\xfe\x00garbage")
    (root / "README.txt").write_text("not a structure")
    return good


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, dict[str, Structure]]:
    root = tmp_path / "inputs"
    return root, write_inputs(root)


@pytest.fixture
def model(tmp_path: Path) -> VoltageModel:
    return tiny_model(tmp_path / "li.pt")


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def screen(inputs: Path, models: dict, out: Path, **kw):
    kw.setdefault("progress", False)
    return run_screen(inputs, list(models), models, out, out.with_suffix(".json"), **kw)


# =============================================================================== parsing
def test_fast_cif_path_equals_pymatgen(model):
    for s in structures():
        text = str(CifWriter(s))
        assert fast_p1_cif(text) is not None
        fast = run_one(text, model)
        slow = model.predict([parse_structure(text, "cif")])[0].voltage
        assert fast == pytest.approx(slow, abs=1e-5)
    # A CIF with real symmetry operations is not "plain": it must go through pymatgen.
    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    rocksalt = Structure(
        Lattice.cubic(4.4), ["Mn"] * 4 + ["O"] * 4, fcc + [[(x + 0.5) % 1, y, z] for x, y, z in fcc]
    )
    symmetrized = str(CifWriter(rocksalt, symprec=0.01))
    assert "Fm-3m" in symmetrized and fast_p1_cif(symmetrized) is None
    expected = model.predict([parse_structure(symmetrized, "cif")])[0].voltage
    assert run_one(symmetrized, model) == pytest.approx(expected, abs=1e-5)
    assert run_one(str(CifWriter(rocksalt)), model) == pytest.approx(expected, abs=1e-5)


def run_one(text: str, model: VoltageModel) -> float:
    from serving.screen.predictor import Predictor
    from serving.screen.prepare import init_worker, prepare

    init_worker(Predictor(["Li"], {"Li": model}), 500)
    res = prepare("x.cif", "cif", text.encode())
    return float(model.predict_graphs([res.graphs[0]])[0][0])  # type: ignore[union-attr]


def test_list_inputs_finds_structure_files_only(inputs):
    root, good = inputs
    assert set(list_inputs(root)) == set(good) | set(BAD)


# =============================================================================== screening
def test_screen_ranks_predictions_and_reports_bad_files(inputs, model, tmp_path):
    root, good = inputs
    out = tmp_path / "out" / "screen.csv"
    summary = screen(root, {"Li": model}, out, threshold=3.0, batch_size=3)
    rows = read_csv(out)
    assert [r["id"] for r in rows] != [] and len(rows) == len(good)
    volts = [float(r["voltage"]) for r in rows]
    assert volts == sorted(volts, reverse=True)
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    expected = {k: p.voltage for k, p in zip(good, model.predict(list(good.values())), strict=True)}
    for r in rows:
        assert float(r["voltage"]) == pytest.approx(expected[r["id"]], abs=1e-3)
        assert float(r["uncertainty"]) > 0
    flagged = {r["id"]: r["warnings"] for r in rows}
    assert flagged["cif/s3.cif"] == "unseen_elements:Ni"  # Ni not among the train elements
    errors = {r["id"]: r["kind"] for r in read_csv(out.with_suffix(".errors.csv"))}
    assert errors == BAD
    li = summary["per_ion"]["Li"]
    assert li["n"] == len(good) and li["n_above"] == sum(v > 3.0 for v in expected.values())
    assert summary["n_errors"] == len(BAD) and summary["n_inputs"] == len(good) + len(BAD)
    assert json.loads(out.with_suffix(".json").read_text())["per_ion"]["Li"] == li


def test_resume_skips_done_ids_and_survives_a_torn_line(inputs, model, tmp_path):
    root, _ = inputs
    fresh = tmp_path / "fresh.csv"
    screen(root, {"Li": model}, fresh, resume=False)
    out = tmp_path / "resumed.csv"
    first = screen(root, {"Li": model}, out, limit=4)
    assert first["n_new"] == 4
    with partial_path(out).open("a") as fh:
        fh.write('{"id": "cif/s5.cif", "pred"')  # a crash mid-write
    second = screen(root, {"Li": model}, out)
    total = len(list_inputs(root))
    assert second["n_new"] == total - 4  # the torn record is redone, the 4 done ones are not
    assert read_csv(out) == read_csv(fresh)
    assert read_csv(out.with_suffix(".errors.csv")) == read_csv(fresh.with_suffix(".errors.csv"))
    third = screen(root, {"Li": model}, out)
    assert third["n_new"] == 0 and third["per_ion"] == second["per_ion"]
    _, records, done = read_partial(partial_path(out))
    assert len(records) == total and done["n_selected"] == total


def test_resume_refuses_results_of_another_model(inputs, model, tmp_path):
    root, _ = inputs
    out = tmp_path / "s.csv"
    screen(root, {"Li": model}, out, limit=2)
    other = tiny_model(tmp_path / "other.pt", seed=3)
    with pytest.raises(ValueError, match="other models"):
        screen(root, {"Li": other}, out)
    screen(root, {"Li": other}, out, resume=False)  # explicit restart is allowed


def test_two_ions_sharing_a_backbone_match_single_ion_screens(inputs, model, tmp_path):
    root, _ = inputs
    both = screen(root, {"Li": model, "Na": model}, tmp_path / "both.csv")
    single = screen(root, {"Li": model}, tmp_path / "li.csv")
    assert both["per_ion"]["Li"] == single["per_ion"]["Li"] == both["per_ion"]["Na"]
    rows = read_csv(tmp_path / "both.csv")
    assert {r["ion"] for r in rows} == {"Li", "Na"}


def test_process_pool_gives_identical_results(inputs, model, tmp_path):
    root, _ = inputs
    screen(root, {"Li": model}, tmp_path / "w1.csv", workers=1, batch_size=2)
    screen(root, {"Li": model}, tmp_path / "w2.csv", workers=2, batch_size=2)
    assert read_csv(tmp_path / "w1.csv") == read_csv(tmp_path / "w2.csv")


def tar_of(root: Path, path: Path, reverse: bool = False) -> Path:
    """A .tar.gz of every file under ``root`` ("./"-prefixed names), stored in sorted order of
    path (``reverse``: the opposite, so storage order differs from id order)."""
    files = sorted((p for p in root.rglob("*") if p.is_file()), reverse=reverse)
    with tarfile.open(path, "w:gz") as tar:
        for p in files:
            data = p.read_bytes()
            info = tarfile.TarInfo("./" + p.relative_to(root).as_posix())
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_archives_are_read_in_place(inputs, model, tmp_path):
    root, _ = inputs
    screen(root, {"Li": model}, tmp_path / "dir.csv")
    tgz, zpath = tmp_path / "in.tar.gz", tmp_path / "in.zip"
    files = sorted(p for p in root.rglob("*") if p.is_file())
    tar_of(root, tgz)
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in files:
            zf.write(p, p.relative_to(root).as_posix())
    for archive in (tgz, zpath):
        out = tmp_path / f"{archive.name}.csv"
        screen(archive, {"Li": model}, out)
        assert read_csv(out) == read_csv(tmp_path / "dir.csv")


# =============================================================================== sharding
def test_shards_partition_exactly_and_merge_to_the_unsharded_result(inputs, model, tmp_path):
    root, _ = inputs
    ids = list(list_inputs(root))
    parts = [select_shard(ids, (i, 3)) for i in range(3)]
    assert sorted(k for p in parts for k in p) == sorted(ids)  # every id in exactly one shard
    assert select_shard(ids, (1, 3)) == parts[1]  # deterministic
    whole = tmp_path / "whole.csv"
    screen(root, {"Li": model}, whole)
    outs = []
    for i in range(3):
        out = tmp_path / f"shard-{i}-of-3.csv"
        s = screen(root, {"Li": model}, out, shard=(i, 3))
        assert s["n_inputs"] == len(parts[i])
        outs.append(out)
    merged = tmp_path / "merged.csv"
    summary = merge_screen(outs, merged, tmp_path / "merged.json")
    assert read_csv(merged) == read_csv(whole)
    assert read_csv(merged.with_suffix(".errors.csv")) == read_csv(whole.with_suffix(".errors.csv"))
    assert summary["per_ion"] == json.loads(whole.with_suffix(".json").read_text())["per_ion"]
    with pytest.raises(ValueError, match="missing \\[2\\]"):
        merge_screen(outs[:2], merged, tmp_path / "m.json")
    with pytest.raises(ValueError, match="also in another part"):
        merge_screen([*outs, outs[0]], merged, tmp_path / "m.json")


def test_merge_refuses_an_unfinished_shard(inputs, model, tmp_path):
    root, _ = inputs
    outs = []
    for i in range(2):
        out = tmp_path / f"p{i}.csv"
        screen(root, {"Li": model}, out, shard=(i, 2))
        outs.append(out)
    lines = partial_path(outs[1]).read_text().splitlines()
    partial_path(outs[1]).write_text("\n".join(lines[:2]) + "\n")  # header + 1 record, no _done
    with pytest.raises(ValueError, match="incomplete"):
        merge_screen(outs, tmp_path / "m.csv", tmp_path / "m.json")


@pytest.mark.parametrize(
    ("text", "expected"), [("0/1", (0, 1)), ("3/8", (3, 8)), (None, None), (" 2 / 4 ", (2, 4))]
)
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["8/8", "-1/4", "1/0", "a/b", "3"])
def test_parse_shard_rejects(text):
    with pytest.raises(ValueError):
        parse_shard(text)


def test_uncertainty_uses_the_models_std_scale(inputs, model, tmp_path):
    root, good = inputs
    screen(root, {"Li": model}, tmp_path / "u.csv")
    rows = {r["id"]: float(r["uncertainty"]) for r in read_csv(tmp_path / "u.csv")}
    expected = {
        k: p.uncertainty for k, p in zip(good, model.predict(list(good.values())), strict=True)
    }
    np.testing.assert_allclose([rows[k] for k in good], [expected[k] for k in good], atol=1e-3)


def test_champions_are_read_from_the_checkpoint_not_the_logged_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Screening loads registry champions with the service's loader: the logged pyfunc (its
    ``python_model`` and its copy of the code) is never loaded; the model predicts exactly what
    its checkpoint does, and an ion without a champion is a clear error."""
    import mlflow.pyfunc

    from serving.screen.models import champion_models
    from tests.serving_fixtures import PREFIX, MlflowStore, build_checkpoint
    from voltage_model.registry import ModelLoadError

    store = MlflowStore.create(tmp_path / "mlflow")
    ckpt = build_checkpoint(tmp_path / "Li.pt", "Li", 4)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the logged pyfunc code must not be loaded")

    with store.active():
        store.publish("Li", checkpoint=ckpt)
        store.publish("Na", seed=5, alias=None)
        monkeypatch.setattr(mlflow.pyfunc, "load_model", refuse)
        models = champion_models(["Li"], PREFIX)
        with pytest.raises(ModelLoadError, match="no 'champion'"):
            champion_models(["Na"], PREFIX)
    text = str(CifWriter(structures()[0]))
    assert run_one(text, models["Li"]) == run_one(text, VoltageModel.from_checkpoint(ckpt))


# =============================================================================== command line
def test_cli_screens_and_merges_and_refuses_what_the_user_can_fix(inputs, model, tmp_path):
    """``voltage-serve screen`` reads its ions from ``params.yaml`` (``--params``) as the service
    does; a problem the user can fix exits 2 naming it."""
    from typer.testing import CliRunner

    from serving.cli import app

    root, good = inputs
    params = tmp_path / "params.yaml"
    params.write_text("ions:\n  Li: {}\n  Na: {}\n")
    ckpt = f"Li={tmp_path / 'li.pt'}"
    base = ["screen", str(root), "--out", str(tmp_path / "s.csv"), "--summary",
            str(tmp_path / "s.json"), "--params", str(params), "--workers", "1",
            "--no-progress"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--ions", "Li", "--checkpoint", ckpt, "--shard", "0/1"])
    assert res.exit_code == 0, res.output
    assert f"{len(good)} predicted, {len(BAD)} unusable" in res.output
    assert "Li: " in res.output and "tier 1 (CGCNN fast path)" in res.output
    merged = tmp_path / "m.csv"
    merge = ["screen-merge", "--out", str(merged), "--summary", str(merged.with_suffix(".json"))]
    res = runner.invoke(app, [*merge, str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert read_csv(merged) == read_csv(tmp_path / "s.csv")
    for bad, says in (
        (["--ions", "Mg", "--checkpoint", "Mg=x.pt"], "ion 'Mg' is not enabled"),
        (["--ions", "Li", "--checkpoint", "Na=x.pt"], "--checkpoint wants ION=PATH"),
        (["--ions", "Li", "--checkpoint", ckpt, "--shard", "2/2"], "--shard"),
        (["--ions", "Li", "--checkpoint", f"Li={tmp_path / 'none.pt'}"], "not found"),
        (["--ions", "Li", "--checkpoint", ckpt, "--params", str(tmp_path / "no.yaml")],
         "params file not found"),
    ):  # fmt: skip
        res = runner.invoke(app, [*base, *bad])
        assert res.exit_code == 2 and says in res.output, (bad, res.output)
    res = runner.invoke(app, ["screen", str(tmp_path / "nowhere"), "--out", str(tmp_path / "n.csv"),
                              "--summary", str(tmp_path / "n.json"), "--params", str(params),
                              "--ions", "Li", "--checkpoint", ckpt])  # fmt: skip
    assert res.exit_code == 2 and "not found" in res.output
    res = runner.invoke(app, [*merge, str(tmp_path / "nothing.csv")])
    assert res.exit_code == 2 and "no header" in res.output


def test_cli_screen_without_a_champion_is_no_answer_not_a_traceback(inputs, tmp_path, monkeypatch):
    """An ion with neither ``--checkpoint`` nor a registered champion: exit 3 (no answer, as
    ``voltage-serve predict``), one line naming the model, nothing written."""
    from typer.testing import CliRunner

    from serving.cli import app

    root, _ = inputs
    params = tmp_path / "params.yaml"
    params.write_text("ions:\n  Li: {}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty' / 'mlflow.db'}")
    res = CliRunner().invoke(app, ["screen", str(root), "--out", str(tmp_path / "s.csv"),
                                   "--summary", str(tmp_path / "s.json"), "--params", str(params),
                                   "--ions", "Li", "--workers", "1", "--no-progress"])  # fmt: skip
    assert res.exit_code == 3, res.output
    assert "electrode-voltage-Li has no 'champion' version" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "s.csv").exists()
