"""Shared fixtures: small, self-built data so tests never depend on anything but pymatgen.

``mini_snapshot`` writes a snapshot folder with the real layout (``electrodes.csv`` + CIF tarballs)
from structures built here, including hosts shared between ions, as in the MP data.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymatgen.core import Lattice, Structure
from pymatgen.io.cif import CifWriter

REPO = Path(__file__).resolve().parents[1]
SNAPSHOT = Path(os.environ.get("MP_SNAPSHOT_DIR", REPO.parent / "shared/data/mp_electrodes_2020"))

CSV_COLUMNS = [
    "battery_id", "working_ion", "charged_id", "charged_formula", "discharged_id",
    "discharged_formula", "pair_voltage", "battery_avg_voltage", "charged_spacegroup_number",
    "charged_cif", "discharged_cif", "charged_nsites", "discharged_nsites", "capacity_grav",
    "capacity_vol", "energy_grav", "energy_vol", "max_delta_volume", "in_npj2022_clean_set",
]  # fmt: skip


def host_structures(n: int, seed: int = 0) -> list[Structure]:
    """Distinct small oxide hosts (rocksalt/rutile-like cells with varied metals and lattices)."""
    rng = np.random.default_rng(seed)
    metals = ["Mn", "Co", "Ni", "Fe", "V", "Ti", "Cr", "Cu", "Mo", "Nb"]
    out = []
    for i in range(n):
        a = 4.0 + 0.8 * rng.random()
        m = metals[i % len(metals)]
        m2 = metals[(i * 3 + 1) % len(metals)]
        species = [m, m2, "O", "O", "O", "O"] if i % 2 else [m, "O", "O"]
        coords = rng.random((len(species), 3))
        lat = Lattice.orthorhombic(a, a + rng.random(), a + 1.5 * rng.random())
        s = Structure(lat, species, coords)
        # Push atoms apart a bit so neighbour lists are physical.
        s.perturb(0.05)
        out.append(s)
    return out


def write_mini_snapshot(root: Path, n_hosts: int = 24, seed: int = 0) -> Path:
    """A snapshot folder with Li/Na/Mg rows; hosts 0..7 are shared between ions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hosts = host_structures(n_hosts, seed)
    rows, cifs = [], {}
    for i, s in enumerate(hosts):
        cid = f"mp-{1000 + i}"
        cifs[f"cifs_r/{cid}.cif"] = str(CifWriter(s))
        ions = ["Li"] + (["Mg", "Na"] if i < 8 else []) + (["Na"] if 8 <= i < 14 else [])
        for ion in ions:
            v = float(np.round(1.0 + 3.0 * rng.random(), 2))
            rows.append({
                "battery_id": f"{cid}_{ion}", "working_ion": ion, "charged_id": cid,
                "charged_formula": s.composition.reduced_formula,
                "discharged_id": f"mp-{5000 + i}", "discharged_formula": ion + s.formula,
                "pair_voltage": v + 0.05, "battery_avg_voltage": v,
                "charged_spacegroup_number": 1, "charged_cif": f"cifs_r/{cid}.cif",
                "discharged_cif": "", "charged_nsites": len(s), "discharged_nsites": "",
                "capacity_grav": 150.0, "capacity_vol": "", "energy_grav": "", "energy_vol": "",
                "max_delta_volume": "", "in_npj2022_clean_set": 1,
            })  # fmt: skip
    write_snapshot(root, rows, cifs)
    return root


def write_snapshot(root: Path, rows: list[dict], cifs: dict[str, str]) -> None:
    with (root / "electrodes.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with tarfile.open(root / "cifs_r.tar.gz", "w:gz") as tar:
        for name, text in cifs.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def mini_snapshot(tmp_path: Path) -> Path:
    return write_mini_snapshot(tmp_path / "snapshot")


@pytest.fixture
def real_snapshot() -> Path:
    if not (SNAPSHOT / "electrodes.csv").is_file():
        pytest.skip(f"shared snapshot not found at {SNAPSHOT}")
    return SNAPSHOT


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The real data stages (ingest, clean, split, graphs) run on the mini snapshot."""
    from training.config import Params
    from training.stages.clean import run_clean
    from training.stages.graphs import run_graphs
    from training.stages.ingest import run_ingest
    from training.stages.split import run_split

    root = tmp_path_factory.mktemp("tiny")
    snap = write_mini_snapshot(root / "snapshot", n_hosts=40)
    params = Params.model_validate(
        {
            "ions": {"Li": {"clean_k": None}, "Na": {"clean_k": None}, "Mg": {"clean_k": None}},
            "data": {"source": "snapshot", "snapshot_dir": str(snap), "workers": 1},
        }
    )
    paths = {
        "records": root / "records.jsonl.gz",
        "clean": root / "clean.jsonl.gz",
        "splits_all": root / "splits_all.json",
        "splits": root / "splits.json",
        "graphs": root / "graphs.pt",
        "params": root / "params.yaml",
    }
    run_ingest(params, paths["records"], root / "reports")
    run_split(params, paths["records"], paths["splits_all"], root / "split.json")
    run_clean(params, paths["records"], paths["splits_all"], paths["clean"], paths["splits"],
              root / "clean.json")  # fmt: skip
    run_graphs(params.graph, paths["records"], paths["graphs"], root / "graphs.json", workers=1)
    return paths


@pytest.fixture(scope="session")
def chgnet_features(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Real CHGNet features of every host of the mini snapshot (the ``chgnet_features`` stage)."""
    from training.chgnet_store import load
    from training.stages.chgnet_features import run_chgnet_features

    tmp = tmp_path_factory.mktemp("chgnet")
    run_chgnet_features(tiny_data["records"], tmp / "chgnet.npz", tmp / "chgnet.json")
    return load(tmp / "chgnet.npz")


@pytest.fixture(scope="session")
def source(tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small trained Li ensemble (2 members x 2 heads) as the transfer source."""
    import mlflow

    from training.datasets import load_ion_data
    from training.graphs.store import GraphStore
    from training.stages.train import TrainPaths, run_train_stage
    from training.tracking import MlflowSettings
    from training.train.heads import HeadConfig
    from training.train.loop import TrainConfig
    from training.train.settings import TrainSettings
    from voltage_model.models.cgcnn import CGCNNConfig

    tmp = tmp_path_factory.mktemp("src")
    settings = TrainSettings(
        model=CGCNNConfig(atom_fea_len=16, h_fea_len=16, n_conv=2),
        train=TrainConfig(epochs=15, batch_size=8, optimizer="adamw", lr=3e-3, scheduler="none"),
        heads=HeadConfig(n_heads=2, epochs=40),
        n_models=2,
    )
    data = load_ion_data(tiny_data["clean"], tiny_data["splits"], "Li")
    mls = MlflowSettings(tracking_uri=f"sqlite:///{tmp / 'm.db'}", experiment="src")
    try:
        store = GraphStore.load(tiny_data["graphs"])
        out = TrainPaths(tmp / "li.pt", tmp / "li.json", tmp / "li.png")
        run_train_stage(data, store, settings, mls, out, log_model=False)
    finally:
        mlflow.set_tracking_uri(None)
    return tmp / "li.pt"


@pytest.fixture
def transfer_cfg() -> Any:
    """Transfer settings small enough for tests (2 seeds, 2 heads, short training)."""
    from training.transfer import TransferSettings

    return TransferSettings(seeds=[0, 1], n_heads=2, epochs=80, patience=20,
                            scratch={"epochs": 3, "batch_size": 8, "optimizer": "adamw",
                                     "lr": 2e-3, "scheduler": "none"})  # fmt: skip
