"""The partial file ``<out>.partial.jsonl``: append-only progress of a screen (header, one line per
id, tier-2 lines, completion line), read back tolerating a torn tail."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PARTIAL_FORMAT = "screen-partial-v1"


def partial_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".partial.jsonl")


def read_partial(path: Path) -> tuple[dict[str, Any] | None, dict[str, dict], dict | None]:
    """(header, records by id, last completion line) of a partial file, tolerating a torn tail.

    A crash can leave half a line at the end; it is cut off (the file is truncated to its last
    newline) so appending goes on from a clean line boundary. Tier-2 lines are merged into their
    id's record under ``"tier2"`` (ion -> figure or error).
    """
    if not path.is_file():
        return None, {}, None
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        cut = raw.rfind(b"\n") + 1
        with path.open("r+b") as fh:
            fh.truncate(cut)
        raw = raw[:cut]
    header, done, records = None, None, {}
    for line in raw.decode("utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "_header" in obj:
            header = header or obj["_header"]
        elif "_done" in obj:
            done = obj["_done"]
        elif "tier2" in obj:
            if obj.get("id") in records:  # (always: tier 2 follows its id's tier-1 line)
                records[obj["id"]].setdefault("tier2", {}).update(obj["tier2"])
        elif "id" in obj:
            records[obj["id"]] = obj
    return header, records, done


def check_header(found: dict[str, Any] | None, expected: dict[str, Any], path: Path) -> None:
    if found is None:
        return
    for key in ("ions", "models", "shard"):
        if found.get(key) != expected.get(key):
            raise ValueError(
                f"{path} was written with other {key} ({found.get(key)} vs {expected.get(key)}); "
                "resume only continues the same screen: use --no-resume or another output"
            )


def append_lines(fh: io.TextIOBase, objs: Iterable[dict[str, Any]]) -> None:
    fh.write("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs))
    fh.flush()
