"""Graph-construction throughput: vectorised ``GraphConverter`` vs the reference CGCNN way.

Usage::

    python bench/graph_throughput.py                      # all unique charged structures
    python bench/graph_throughput.py --limit 500 --naive 100
    python bench/graph_throughput.py --workers 2          # also time the multiprocess build

CIFs are read straight from the snapshot tarballs (``MP_SNAPSHOT_DIR`` or ../shared/data/...).
Three timings are printed separately, because they answer different questions:

* CIF parse (pymatgen ``Structure.from_str``): paid once per cache build, not per epoch;
* fast graph construction over every parsed structure (single process, and optionally through
  ``GraphStore.build(workers=N)``);
* fast vs naive on the *same* subset, the naive construction being the reference CGCNN's
  ``structure.get_all_neighbors(r)`` (one Python ``Neighbor`` object per pair), per-site sort by
  distance and truncation to M.  The ratio of the two is the speed-up.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python bench/graph_throughput.py` without installing
    sys.path.insert(0, str(ROOT))

from training.graphs.store import GraphStore  # noqa: E402
from voltage_model.graphs.converter import GraphConverter  # noqa: E402

TARBALLS = ("cifs_r.tar.gz", "cifs_f_supplement.tar.gz")


def snapshot_dir() -> Path:
    env = os.environ.get("MP_SNAPSHOT_DIR")
    return Path(env) if env else ROOT.parent / "shared/data/mp_electrodes_2020"


def charged_cifs(snap: Path, limit: int | None) -> dict[str, str]:
    """charged_id -> CIF member path, unique ids in CSV order, first ``limit`` of them."""
    wanted: dict[str, str] = {}
    with (snap / "electrodes.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            wanted.setdefault(row["charged_id"], row["charged_cif"])
            if limit is not None and len(wanted) >= limit:
                break
    return wanted


def read_members(snap: Path, members: set[str]) -> dict[str, str]:
    """CIF texts of the wanted tarball members (no unpacking to disk)."""
    texts: dict[str, str] = {}
    for name in TARBALLS:
        path = snap / name
        if not path.is_file():
            continue
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                key = member.name.removeprefix("./")
                if member.isfile() and key in members:
                    texts[key] = tar.extractfile(member).read().decode()  # type: ignore[union-attr]
    return texts


def parse_all(ids_to_member: dict[str, str], texts: dict[str, str]) -> tuple[list, float]:
    """Parse every CIF, returning ([(id, Structure)], seconds)."""
    from pymatgen.core import Structure

    out = []
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF rounding chatter
        for key, member in ids_to_member.items():
            if member in texts:
                out.append((key, Structure.from_str(texts[member], fmt="cif")))
    return out, time.perf_counter() - t0


def naive_graph(structure, radius: float = 8.0, max_nbr: int = 12) -> tuple[np.ndarray, ...]:
    """The reference CGCNN construction (cgcnn/data.py ``CIFData.__getitem__``), sans features."""
    all_nbrs = structure.get_all_neighbors(radius, include_index=True)
    all_nbrs = [sorted(nbrs, key=lambda x: x[1]) for nbrs in all_nbrs]
    idx, dist = [], []
    for nbr in all_nbrs:
        if len(nbr) < max_nbr:
            pad = max_nbr - len(nbr)
            idx.append([x[2] for x in nbr] + [0] * pad)
            dist.append([x[1] for x in nbr] + [radius + 1.0] * pad)
        else:
            idx.append([x[2] for x in nbr[:max_nbr]])
            dist.append([x[1] for x in nbr[:max_nbr]])
    return np.array(idx), np.array(dist)


def time_fast(structures: list, converter: GraphConverter, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _, s in structures:
            converter.convert(s)
        best = min(best, time.perf_counter() - t0)
    return best


def time_naive(structures: list, converter: GraphConverter) -> float:
    t0 = time.perf_counter()
    for _, s in structures:
        naive_graph(s, converter.radius, converter.max_neighbors)
    return time.perf_counter() - t0


def check_agreement(structures: list, converter: GraphConverter) -> float:
    """Max |d_fast - d_naive| over real neighbour slots: both must find the same distances."""
    worst = 0.0
    for _, s in structures:
        g = converter.convert(s)
        _, d = naive_graph(s, converter.radius, converter.max_neighbors)
        worst = max(worst, float(np.abs(np.where(g.nbr_mask, g.nbr_dist - d, 0.0)).max()))
    return worst


def time_loader(structures: list, converter: GraphConverter, n_items: int, epochs: int = 5) -> None:
    """Per-epoch overhead of ``GraphLoader`` (shuffled, batch 256): what training pays per epoch."""
    from training.graphs.store import GraphLoader

    store = GraphStore.build(structures[:n_items], converter)
    items = [(key, 1.0) for key in store.ids]
    t0 = time.perf_counter()
    loader = GraphLoader(store, items, batch_size=256, shuffle=True, seed=0)
    t_init = time.perf_counter() - t0
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n_batches = sum(1 for _ in loader)
        times.append(time.perf_counter() - t0)
    print(
        f"GraphLoader over {len(items)} crystals: init {t_init:.3f} s (once), "
        f"epoch {min(times) * 1e3:.1f} ms best / {np.median(times) * 1e3:.1f} ms median "
        f"({n_batches} shuffled batches of 256)"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--limit", type=int, default=None, help="first N unique charged structures")
    p.add_argument("--naive", type=int, default=300, help="subset size timed both ways")
    p.add_argument("--workers", type=int, default=0, help="also time GraphStore.build(workers)")
    p.add_argument(
        "--loader", type=int, default=1600, help="crystals in the loader timing (0: skip)"
    )
    args = p.parse_args(argv)

    snap = snapshot_dir()
    converter = GraphConverter()
    wanted = charged_cifs(snap, args.limit)
    t0 = time.perf_counter()
    texts = read_members(snap, set(wanted.values()))
    t_read = time.perf_counter() - t0
    structures, t_parse = parse_all(wanted, texts)
    n = len(structures)
    n_atoms = sum(len(s) for _, s in structures)
    print(f"structures: {n} ({n_atoms} sites, mean {n_atoms / max(n, 1):.1f}/crystal)")
    print(f"tar read : {t_read:7.2f} s")
    print(f"CIF parse: {t_parse:7.2f} s  {n / t_parse:8.1f} crystals/s  (one-off, cache build)")

    converter.convert(structures[0][1])  # warm-up (imports, caches)
    t_fast = time_fast(structures, converter)
    print(f"fast graph (1 process): {t_fast:7.2f} s  {n / t_fast:8.1f} crystals/s")
    if args.workers > 1:
        t0 = time.perf_counter()
        GraphStore.build(structures, converter, workers=args.workers)
        t_pool = time.perf_counter() - t0
        print(
            f"GraphStore.build(workers={args.workers}): {t_pool:7.2f} s  "
            f"{n / t_pool:8.1f} crystals/s  (validation in parent, arrays shipped to workers)"
        )

    subset = structures[: args.naive]
    k = len(subset)
    t_fast_sub = time_fast(subset, converter, repeat=3)
    t_naive_sub = time_naive(subset, converter)
    print(f"same {k}-crystal subset:")
    print(f"  fast : {t_fast_sub:7.3f} s  {k / t_fast_sub:8.1f} crystals/s")
    print(f"  naive: {t_naive_sub:7.3f} s  {k / t_naive_sub:8.1f} crystals/s  (get_all_neighbors)")
    print(f"  speed-up: {t_naive_sub / t_fast_sub:.1f}x")
    worst = check_agreement(subset[:50], converter)
    print(
        f"  max |distance difference| per slot, fast vs naive: {worst:.1e} A (1e-5 A tie rounding)"
    )
    if args.loader > 0:
        time_loader(structures, converter, args.loader)


if __name__ == "__main__":
    main()
