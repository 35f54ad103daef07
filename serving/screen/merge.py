"""``merge_screen``: the shards of one screen (``--shard i/n``, i = 0..n-1) as one ranked table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.screen import tiers
from serving.screen.outputs import throughput, write_outputs
from serving.screen.partial import partial_path, read_partial


def merge_screen(
    parts: Sequence[Path],
    out_csv: Path,
    summary_json: Path,
    threshold: float = 3.0,
    require_complete: bool = True,
) -> dict[str, Any]:
    """Merge shard outputs (their ``.csv`` or ``.partial.jsonl`` paths) into one ranked table.

    Refuses shards of different screens (ions, models), a set of shards that is not exactly
    0..n-1, ids present in two shards, and (unless ``require_complete=False``) shards that did
    not finish, tier 2 included: a silently missing shard would understate every count in the
    summary. Each shard re-scored its own top-k, whose union contains the global top-k.
    """
    if not parts:
        raise ValueError("nothing to merge")
    headers, dones, merged = [], [], {}
    for p in parts:
        path = p if p.name.endswith(".partial.jsonl") else partial_path(p)
        header, records, done = read_partial(path)
        if header is None:
            raise ValueError(f"{path}: not a screening partial file (no header)")
        if require_complete:
            _check_complete(path, header, records, done)
        overlap = merged.keys() & records.keys()
        if overlap:
            raise ValueError(
                f"{path}: {len(overlap)} ids also in another part, e.g. {min(overlap)}"
            )
        headers.append(header)
        dones.append(done or {})
        merged.update(records)
    _check_shards(headers)
    ions = headers[0]["ions"]
    extra = {
        "shard": None,
        "merged_shards": len(parts),
        "ions": ions,
        "models": headers[0]["models"],
        "tiers": _merged_tiers(dones),
    }
    backbones = headers[0].get("backbones")  # (absent in partial files from before tier 2)
    return write_outputs(merged, ions, out_csv, summary_json, threshold, extra, backbones)


def _check_complete(path: Path, header: dict, records: dict, done: dict | None) -> None:
    """A shard is complete when every selected id has a record and, for the re-scoring its
    completion line states, every selected (id, ion) pair has a tier-2 line."""
    if done is None or len(records) < done["n_selected"]:
        raise ValueError(f"{path}: shard {header['shard']} is incomplete; rerun it (resume)")
    t2 = done.get("tier2")
    if t2 and tiers.missing(records, t2["ions"], t2["rescore_top"], t2["rescore_uncertain"]):
        raise ValueError(f"{path}: shard {header['shard']} has not finished tier 2; rerun it "
                         "(resume)")  # fmt: skip


def _merged_tiers(dones: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both tiers' structures and seconds summed over the shards (the rate is per shard
    process, i.e. per node, not of the whole array)."""
    out: dict[str, Any] = {}
    for tier in ("tier1", "tier2"):
        found = [d[tier] for d in dones if d.get(tier)]
        n = sum(t["structures"] for t in found)
        out[tier] = throughput(n, sum(t["seconds"] for t in found))
    settings = next((d["tier2"] for d in dones if d.get("tier2")), {})
    out["tier2"].update({k: settings[k] for k in ("ions", "rescore_top", "rescore_uncertain")
                         if k in settings})  # fmt: skip
    return out


def _check_shards(headers: Sequence[dict[str, Any]]) -> None:
    first = headers[0]
    for h in headers[1:]:
        if h["ions"] != first["ions"] or h["models"] != first["models"]:
            raise ValueError("shards come from different screens (ions or models differ)")
    shards = [tuple(h["shard"]) if h["shard"] else None for h in headers]
    if None in shards:
        if len(shards) > 1:
            raise ValueError("an unsharded screen cannot be merged with other parts")
        return
    counts = {n for _, n in shards}  # type: ignore[misc]
    if len(counts) != 1:
        raise ValueError(f"shards of different partitions: n in {sorted(counts)}")
    n = counts.pop()
    seen = Counter(i for i, _ in shards)  # type: ignore[misc]
    missing = sorted(set(range(n)) - set(seen))
    dupes = sorted(i for i, c in seen.items() if c > 1)
    if missing or dupes:
        raise ValueError(
            f"shards must be 0..{n - 1} once each: missing {missing}, repeated {dupes}"
        )
