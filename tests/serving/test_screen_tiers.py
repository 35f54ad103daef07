"""Two-tier screening (issue 16.4) with real CHGNet-serving artifacts.

The artifacts are built as the ``ion_model`` stage builds them: ``evaluate_target`` (transfer from
the session's Li source, CHGNet head, variant CV) and ``save_transfer_checkpoint``; the CHGNet
sections of the variants the CV did not pick are fitted with ``fit_chgnet_head`` +
``served_part``. Tier-2 figures must be the served champion's answer (``VoltageModel.predict``)
exactly; tier-1 figures of a CGCNN-only champion its answer up to the partial file's rounding.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter
from typer.testing import CliRunner

from serving.screen import tiers
from serving.screen.merge import merge_screen
from serving.screen.models import model_ident
from serving.screen.outputs import ranked_rows
from serving.screen.partial import partial_path, read_partial
from serving.screen.run import Rescore, run_screen
from voltage_model.cif import served_structure
from voltage_model.graphs.batch import collate
from voltage_model.predict import VoltageModel
from voltage_model.structures import parse_structure

N_GOOD = 12
ISOLATED = "cif/z_isolated.cif"  # CGCNN graphs it (8 A radius); CHGNet refuses (6 A cutoff)


# =============================================================================== fixtures
@pytest.fixture(scope="module")
def champions(
    tiny_data: dict[str, Path], source: Path, chgnet_features: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, VoltageModel]:  # fmt: skip
    """Mg champions of the three kinds from one transfer run: ``blend`` (weight 0.5), ``chgnet``
    (weight 1) and ``cgcnn`` (no CHGNet section)."""
    from training.chgnet_heads import fit_chgnet_head, served_part
    from training.data.ion_inputs import IonInputs
    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.stages.ion_model import evaluate_target, save_transfer_checkpoint
    from training.train.settings import gp_config
    from training.transfer import TransferSettings

    # The settings of conftest's ``transfer_cfg`` (function-scoped, so not usable here).
    cfg = TransferSettings(seeds=[0, 1], n_heads=2, epochs=80, patience=20,
                           scratch={"epochs": 3, "batch_size": 8, "optimizer": "adamw",
                                    "lr": 2e-3, "scheduler": "none"})  # fmt: skip
    mg, na, li = (load_ion_data(tiny_data["clean"], tiny_data["splits"], i)
                  for i in ("Mg", "Na", "Li"))  # fmt: skip
    store = GraphStore.load(tiny_data["graphs"])
    hosts = frozenset(li.host_ids("train"))
    inputs = IonInputs(mg, store, "Li", [na], hosts, chgnet_features)
    target = evaluate_target(inputs, source, cfg)
    picked = target.chgnet
    fit = fit_chgnet_head(mg, store, chgnet_features, gp_config(cfg.chgnet.gp))
    parts = {"blend": served_part("average", fit), "chgnet": served_part("chgnet", fit),
             "cgcnn": None}  # fmt: skip
    if picked is not None:  # the CV's own choice, as the stage would serve it
        parts["blend" if picked.weight < 1 else "chgnet"] = picked
    tmp = tmp_path_factory.mktemp("tier_champions")
    out = {}
    for name, part in parts.items():
        served = target._replace(chgnet=part)
        save_transfer_checkpoint(tmp / f"{name}.pt", served, source, mg, run_id="run")
        out[name] = VoltageModel.from_checkpoint(tmp / f"{name}.pt")
        out[name].path = tmp / f"{name}.pt"  # type: ignore[attr-defined]
    return out


def candidates() -> dict[str, Structure]:
    """Perturbed perovskite cells (varied A, B and lattice) CHGNet and CGCNN both take, plus one
    cell CHGNet refuses."""
    rng = np.random.default_rng(11)
    coords = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    out = {}
    for i in range(N_GOOD):
        a, b = ["Ca", "Sr", "Ba", "La"][i % 4], ["Ti", "Mn", "Fe", "Co", "Ni", "V"][i % 6]
        lat = Lattice.orthorhombic(3.8 + 0.03 * i, 3.9 + 0.02 * i, 4.0 - 0.01 * i)
        s = Structure(lat, [a, b, "O", "O", "O"], coords)
        s.perturb(0.05 + 0.1 * rng.random())
        out[f"cif/s{i:02d}.cif"] = s
    out[ISOLATED] = Structure(Lattice.cubic(7.0), ["Mn", "O"], [[0, 0, 0], [0.5] * 3])
    return out


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, dict[str, Structure]]:
    root = tmp_path / "in"
    structures = candidates()
    for key, s in structures.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_text(str(CifWriter(s)))
    return root, structures


def screen(root: Path, models: dict, out: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("progress", False)
    return run_screen(root, list(models), models, out, out.with_suffix(".json"), **kw)


def rows_of(out: Path, backbones: dict[str, str]) -> dict[tuple[str, str], dict[str, Any]]:
    """(id, ion) -> unrounded final row, from the partial file (the source of truth)."""
    _, records, _ = read_partial(partial_path(out))
    return {(r["id"], r["ion"]): r for r in ranked_rows(records.values(), backbones)}


def served(model: VoltageModel, root: Path, ids: list[str]) -> dict[str, tuple[float, float]]:
    """``VoltageModel.predict`` on the files as the service parses them, in one call."""
    structures = [parse_structure((root / k).read_text(), "cif") for k in ids]
    return {k: (p.voltage, p.uncertainty)
            for k, p in zip(ids, model.predict(structures), strict=True)}  # fmt: skip


def attempted(out: Path, ion: str) -> set[str]:
    """Ids with a tier-2 line for ``ion`` (a figure or an error)."""
    _, records, _ = read_partial(partial_path(out))
    return {k for k, r in records.items() if ion in r.get("tier2", {})}


def tier1_records(out: Path, ion: str) -> dict[str, dict[str, float]]:
    _, records, _ = read_partial(partial_path(out))
    return {k: r["pred"][ion] for k, r in records.items() if "pred" in r}


# =============================================================================== tier 2
@pytest.mark.parametrize("kind", ["blend", "chgnet"])
def test_tier2_rows_are_the_served_champion_exactly(champions, inputs, tmp_path, kind):
    root, _ = inputs
    mg, na = champions[kind], champions["cgcnn"]
    assert mg.backbone == ("cgcnn+chgnet" if kind == "blend" else "chgnet")
    out = tmp_path / "s.csv"
    summary = screen(root, {"Mg": mg, "Na": na}, out, rescore=Rescore(3, 2))
    rows = rows_of(out, {"Mg": mg.backbone, "Na": "cgcnn"})
    t1 = tier1_records(out, "Mg")
    chosen = sorted(tiers.select_ion({k: {"pred": {"Mg": v}} for k, v in t1.items()}, "Mg", 3, 2))
    assert 3 <= len(chosen) <= 5
    ok = [k for k in chosen if k != ISOLATED]  # CHGNet refuses that one (its own test below)
    expected = served(mg, root, ok)
    for key, row in ((k, r) for (k, ion), r in rows.items() if ion == "Mg"):
        if key in ok:
            assert (row["tier"], row["figure"]) == (2, tiers.SERVED)
            assert row["voltage"] == pytest.approx(expected[key][0], abs=1e-9, rel=0)
            assert row["uncertainty"] == pytest.approx(expected[key][1], abs=1e-9, rel=0)
        else:
            assert (row["tier"], row["figure"]) == (1, tiers.ESTIMATE)
            assert row["voltage"] == row["tier1_voltage"]
        assert row["tier1_voltage"] == t1[key]["voltage"]  # kept beside the final figure
    assert summary["per_ion"]["Mg"]["n_tier2"] == len(ok)
    assert summary["tiers"]["tier2"]["structures"] == len(chosen)  # attempted
    assert summary["tiers"]["tier2"]["ions"] == ["Mg"]
    assert summary["tiers"]["tier1"]["structures_per_second"] > 0
    assert summary["tiers"]["tier2"]["structures_per_second"] > 0


def test_tier1_of_a_chgnet_champion_is_its_stored_cgcnn_ensemble(champions, inputs, tmp_path):
    """Never a silent CGCNN figure: it is the artifact's CGCNN ensemble, labelled an estimate,
    and differs from what the champion serves."""
    root, structures = inputs
    mg = champions["chgnet"]
    out = tmp_path / "s.csv"
    screen(root, {"Mg": mg}, out, rescore=Rescore(0, 0))
    rows = rows_of(out, {"Mg": mg.backbone})
    ids = sorted(k for k in structures if k != ISOLATED)
    graphs = [mg.converter.convert(parse_structure((root / k).read_text(), "cif")) for k in ids]
    with torch.inference_mode():
        mean, std = mg.loaded.predict_with_std(collate(graphs, mg.converter, mg.encoding))
    truth = served(mg, root, ids)
    for k, m, s in zip(ids, mean.double().numpy(), std.double().numpy(), strict=True):
        row = rows[(k, "Mg")]
        assert (row["tier"], row["figure"]) == (1, tiers.ESTIMATE)
        assert row["voltage"] == pytest.approx(m, abs=2e-5)
        assert row["uncertainty"] == pytest.approx(s * mg.std_scale, abs=2e-5)
    assert max(abs(rows[(k, "Mg")]["voltage"] - truth[k][0]) for k in ids) > 1e-3
    with (out).open(newline="") as fh:
        assert {r["figure"] for r in csv.DictReader(fh)} == {tiers.ESTIMATE}


def test_tier1_of_a_cgcnn_champion_is_its_answer(champions, inputs, tmp_path):
    root, structures = inputs
    na = champions["cgcnn"]
    out = tmp_path / "s.csv"
    summary = screen(root, {"Na": na}, out)
    assert summary["tiers"]["tier2"]["structures"] == 0 and summary["tiers"]["tier2"]["ions"] == []
    ids = sorted(structures)
    truth = served(na, root, ids)
    rows = rows_of(out, {"Na": "cgcnn"})
    for k in ids:
        row = rows[(k, "Na")]
        assert (row["tier"], row["figure"]) == (1, tiers.SERVED)
        assert row["voltage"] == pytest.approx(truth[k][0], abs=1e-5)  # 5-decimal records
        assert row["uncertainty"] == pytest.approx(truth[k][1], abs=1e-5)
    with out.open(newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [int(r["rank"]) for r in csv_rows] == list(range(1, len(ids) + 1))
    for r in csv_rows:
        assert float(r["voltage"]) == pytest.approx(truth[r["id"]][0], abs=1e-4)
        assert r["tier"] == "1" and r["tier1_voltage"] == r["voltage"]


def test_a_structure_chgnet_refuses_keeps_its_labelled_tier1_figure(champions, inputs, tmp_path):
    root, structures = inputs
    mg = champions["blend"]
    out = tmp_path / "s.csv"
    summary = screen(root, {"Mg": mg}, out, rescore=Rescore(len(structures), 0))
    row = rows_of(out, {"Mg": mg.backbone})[(ISOLATED, "Mg")]
    assert (row["tier"], row["figure"]) == (1, tiers.ESTIMATE)
    assert "tier2_failed:chgnet_graph" in row["warnings"]
    assert summary["per_ion"]["Mg"]["n_tier2"] == len(structures) - 1
    assert summary["per_ion"]["Mg"]["n_tier2_failed"] == 1


def test_tier2_reads_files_as_the_service_does(inputs):
    """The fast P1 route of tier 2 gives ``parse_structure``'s structure exactly."""
    root, structures = inputs
    for key in structures:
        text = (root / key).read_text()
        a, b = served_structure(text, "cif", 500), parse_structure(text, "cif")
        assert [str(x) for x in a.species] == [str(x) for x in b.species]
        assert np.array_equal(a.frac_coords, b.frac_coords)
        assert np.array_equal(a.lattice.matrix, b.lattice.matrix)
    poscar = structures["cif/s00.cif"].to(fmt="poscar")
    assert served_structure(poscar, "poscar", 500) == parse_structure(poscar, "poscar")


# =============================================================================== selection
def test_selection_is_top_k_by_voltage_plus_the_most_uncertain():
    recs = {f"id{i}": {"pred": {"Mg": {"voltage": v, "uncertainty": u}}}
            for i, (v, u) in enumerate([(3.0, 0.1), (4.0, 0.2), (2.0, 0.9), (4.0, 0.1),
                                        (1.0, 0.5), (3.5, 0.3)])}  # fmt: skip
    recs["bad"] = {"error": {"kind": "parse", "message": "x"}}
    assert tiers.select_ion(recs, "Mg", 2, 0) == {"id1", "id3"}  # tie at 4.0: both
    assert tiers.select_ion(recs, "Mg", 3, 0) == {"id1", "id3", "id5"}
    assert tiers.select_ion(recs, "Mg", 0, 2) == {"id2", "id4"}
    assert tiers.select_ion(recs, "Mg", 1, 1) == {"id1", "id2"}  # tie broken by id
    assert tiers.select_ion(recs, "Mg", 0, 0) == set()
    assert tiers.select_ion(recs, "Mg", 100, 100) == {f"id{i}" for i in range(6)}
    recs["id1"]["tier2"] = {"Mg": {"voltage": 4.1, "uncertainty": 0.2}}
    assert tiers.plan(recs, ["Mg"], 2, 1) == {"id2": ("Mg",), "id3": ("Mg",)}  # id1 done


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 64, 65, 97])
def test_chunks_cover_everything_and_never_hold_a_lone_structure(n):
    sizes = tiers.chunk_sizes(n, 32)
    assert sum(sizes) == n and all(s > 0 for s in sizes)
    assert n == 1 or 1 not in sizes


def test_screen_rescores_exactly_the_selection(champions, inputs, tmp_path):
    root, _ = inputs
    mg = champions["blend"]
    for top, unc in ((2, 0), (0, 3), (0, 0)):
        out = tmp_path / f"s{top}{unc}.csv"
        screen(root, {"Mg": mg}, out, rescore=Rescore(top, unc))
        t1 = tier1_records(out, "Mg")
        by_v = sorted(t1, key=lambda k: (-t1[k]["voltage"], k))[:top]
        by_u = sorted(t1, key=lambda k: (-t1[k]["uncertainty"], k))[:unc]
        assert attempted(out, "Mg") == set(by_v) | set(by_u)


def test_process_pool_gives_identical_tiers(champions, inputs, tmp_path):
    root, _ = inputs
    models = {"Mg": champions["blend"], "Na": champions["cgcnn"]}
    one, two = tmp_path / "w1.csv", tmp_path / "w2.csv"
    screen(root, models, one, rescore=Rescore(3, 2), workers=1, batch_size=4)
    screen(root, models, two, rescore=Rescore(3, 2), workers=2, batch_size=4)
    assert one.read_text() == two.read_text()
    backbones = {"Mg": "cgcnn+chgnet", "Na": "cgcnn"}
    assert rows_of(one, backbones) == rows_of(two, backbones)  # full precision too


# =============================================================================== resume, shards
def test_resume_rescores_only_what_is_new_and_survives_a_torn_line(champions, inputs, tmp_path):
    root, _ = inputs
    mg, na = champions["blend"], champions["cgcnn"]
    models = {"Mg": mg, "Na": na}
    fresh = tmp_path / "fresh.csv"
    screen(root, models, fresh, rescore=Rescore(4, 1), resume=False)
    out = tmp_path / "resumed.csv"
    first = screen(root, models, out, rescore=Rescore(2, 0))
    with partial_path(out).open("a") as fh:
        fh.write('{"id": "cif/s00.cif", "tier2": {"Mg"')  # a crash mid-write
    second = screen(root, models, out, rescore=Rescore(4, 1))
    t1 = {k: {"pred": {"Mg": v}} for k, v in tier1_records(out, "Mg").items()}
    assert first["tiers"]["tier2"]["structures"] == 2
    assert second["n_new"] == 0  # tier 1 is not redone
    assert second["tiers"]["tier2"]["structures"] == len(tiers.select_ion(t1, "Mg", 4, 1)) - 2
    assert fresh.read_text() == out.read_text()
    third = screen(root, models, out, rescore=Rescore(4, 1))
    assert third["tiers"]["tier2"]["structures"] == 0
    assert third["per_ion"] == second["per_ion"]
    smaller = screen(root, models, out, rescore=Rescore(1, 0))  # keeps every tier-2 figure
    assert smaller["tiers"]["tier2"]["structures"] == 0
    assert smaller["per_ion"]["Mg"]["n_tier2"] == second["per_ion"]["Mg"]["n_tier2"]


def test_resume_refuses_another_chgnet_section(champions, inputs, tmp_path):
    """Same CGCNN part, other CHGNet share: another model for resume and merge."""
    root, _ = inputs
    assert model_ident(champions["blend"]) != model_ident(champions["chgnet"])
    assert model_ident(champions["blend"]) != model_ident(champions["cgcnn"])
    out = tmp_path / "s.csv"
    screen(root, {"Mg": champions["blend"]}, out, rescore=Rescore(1, 0))
    with pytest.raises(ValueError, match="other models"):
        screen(root, {"Mg": champions["chgnet"]}, out)


def test_shards_merge_with_tier2_columns_and_cover_the_global_selection(
    champions, inputs, tmp_path
):
    root, _ = inputs
    mg, na = champions["blend"], champions["cgcnn"]
    models, rescore = {"Mg": mg, "Na": na}, Rescore(2, 1)
    whole = tmp_path / "whole.csv"
    screen(root, models, whole, rescore=rescore)
    outs = []
    for i in range(3):
        outs.append(tmp_path / f"shard{i}.csv")
        screen(root, models, outs[-1], rescore=rescore, shard=(i, 3))
    merged = tmp_path / "merged.csv"
    summary = merge_screen(outs, merged, tmp_path / "merged.json")
    backbones = {"Mg": mg.backbone, "Na": "cgcnn"}
    a, b = rows_of(whole, backbones), {}
    for o in outs:
        b.update(rows_of(o, backbones))
    whole_t2 = {k for k, r in a.items() if r["tier"] == 2}
    merged_t2 = {k for k, r in b.items() if r["tier"] == 2}
    assert whole_t2 <= merged_t2  # every shard re-scored its own top-k
    for k in whole_t2:
        assert a[k]["voltage"] == b[k]["voltage"] and a[k]["tier1_voltage"] == b[k]["tier1_voltage"]
    for k in a.keys() - merged_t2:
        assert a[k]["voltage"] == b[k]["voltage"]
    with merged.open(newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert {"tier", "figure", "tier1_voltage", "tier1_uncertainty"} <= set(csv_rows[0])
    assert sum(r["tier"] == "2" for r in csv_rows) == len(merged_t2)
    assert summary["per_ion"]["Mg"]["n_tier2"] == len(merged_t2)
    tried: set[str] = set().union(*(attempted(o, "Mg") for o in outs))
    assert summary["tiers"]["tier2"]["structures"] == len(tried) >= len(merged_t2)
    # A shard whose tier 2 did not finish is refused.
    lines = partial_path(outs[0]).read_text().splitlines()
    kept = [ln for ln in lines if '"tier2"' not in ln or '"_done"' in ln]
    assert len(kept) < len(lines)
    partial_path(outs[0]).write_text("\n".join(kept) + "\n")
    with pytest.raises(ValueError, match="tier 2"):
        merge_screen(outs, merged, tmp_path / "m.json")
    merge_screen(outs, merged, tmp_path / "m.json", require_complete=False)


# =============================================================================== command line
def test_cli_prints_both_tiers_and_refuses_bad_counts(champions, inputs, tmp_path):
    from serving.cli import app

    root, _ = inputs
    runner = CliRunner()
    base = ["screen", str(root), "--out", str(tmp_path / "s.csv"), "--summary",
            str(tmp_path / "s.json"), "--ions", "Mg", "--checkpoint",
            f"Mg={champions['blend'].path}", "--workers", "1", "--no-progress"]  # fmt: skip
    res = runner.invoke(app, [*base, "--rescore-top", "2", "--rescore-uncertain", "1"])
    assert res.exit_code == 0, res.output
    assert "tier 1 (CGCNN fast path)" in res.output
    assert "tier 2 (champions as served: Mg)" in res.output
    tiers_json = json.loads((tmp_path / "s.json").read_text())["tiers"]
    assert tiers_json["tier2"]["rescore_top"] == 2 and tiers_json["tier2"]["structures"] >= 2
    for bad in (["--rescore-top", "-1"], ["--rescore-uncertain", "-5"],
                ["--rescore-top", "many"]):  # fmt: skip
        res = runner.invoke(app, [*base, *bad])
        assert res.exit_code == 2, (bad, res.output)
        assert bad[0] in res.output or "rescore" in res.output
    with pytest.raises(ValueError, match="rescore_top"):
        Rescore(-1, 0)
    with pytest.raises(ValueError, match="rescore_uncertain"):
        Rescore(0, 1.5)  # type: ignore[arg-type]


def test_partial_file_keeps_full_precision_for_tier2(champions, inputs, tmp_path):
    root, _ = inputs
    out = tmp_path / "s.csv"
    screen(root, {"Mg": champions["blend"]}, out, rescore=Rescore(2, 0))
    lines = [json.loads(x) for x in partial_path(out).read_text().splitlines()]
    t2 = [x for x in lines if "tier2" in x]
    assert len(t2) == 2
    assert all(np.isfinite(x["tier2"]["Mg"]["voltage"]) for x in t2 if x["id"] != ISOLATED)
    done = lines[-1]["_done"]
    assert done["tier2"]["rescore_top"] == 2 and done["tier1"]["structures"] == N_GOOD + 1
