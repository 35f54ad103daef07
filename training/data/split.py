"""Seeded train/val/test split per ion, grouped by ``charged_id`` across all ions.

Host structures are shared between ions (609 charged ids in the snapshot appear under several
ions). Transfer learning starts from a Li backbone, so a host in *any* ion's validation or test set
must not be in *any* training set, Li's included. Each host (group) is therefore assigned to exactly
one split, globally; per-ion fractions are then balanced greedily, smallest ion first, so that the
scarce ions get close to the requested 80/10/10.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from training.data.records import Record

SPLITS = ("train", "val", "test")


def assign_groups(records: list[Record], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each charged_id to one split, balancing every ion's split sizes toward ``fractions``."""
    rows_by_ion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for rec in records:
        rows_by_ion[rec.working_ion][rec.charged_id] += 1
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for ion in sorted(rows_by_ion, key=lambda i: (len(rows_by_ion[i]), i)):
        groups = rows_by_ion[ion]
        total = sum(groups.values())
        counts = dict.fromkeys(SPLITS, 0)
        for gid, n in groups.items():
            if gid in assignment:
                counts[assignment[gid]] += n
        free = sorted(g for g in groups if g not in assignment)
        for idx in rng.permutation(len(free)):
            gid = free[idx]
            deficit = {s: fractions[s] * total - counts[s] for s in SPLITS}
            best = max(SPLITS, key=lambda s: (deficit[s], fractions[s]))
            assignment[gid] = best
            counts[best] += groups[gid]
    return assignment


def make_splits(
    records: list[Record], fractions: dict[str, float], seed: int
) -> dict[str, dict[str, list[str]]]:
    """Per ion, the battery ids of each split (sorted, so the file diff is stable)."""
    assignment = assign_groups(records, fractions, seed)
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: {s: [] for s in SPLITS})
    for rec in records:
        out[rec.working_ion][assignment[rec.charged_id]].append(rec.battery_id)
    return {ion: {s: sorted(ids[s]) for s in SPLITS} for ion, ids in sorted(out.items())}


def write_splits(path: Path, splits: dict[str, dict[str, list[str]]], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"seed": seed, "group_by": "charged_id", "ions": splits}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def load_splits(path: Path) -> dict[str, dict[str, list[str]]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"splits file not found: {path} (run the split stage)")
    return json.loads(Path(path).read_text())["ions"]


def leakage(records: list[Record], splits: dict[str, dict[str, list[str]]]) -> set[str]:
    """charged_ids in any ion's val/test that also appear in any ion's train (should be empty)."""
    host = {r.battery_id: r.charged_id for r in records}
    train = {host[b] for ion in splits.values() for b in ion["train"]}
    held_out = {host[b] for ion in splits.values() for s in ("val", "test") for b in ion[s]}
    return train & held_out
