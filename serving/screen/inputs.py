"""Screening inputs: which files of a folder / archive are structures, reading their bytes in
storage order, and sharding the ids (a shard depends on the id alone)."""

from __future__ import annotations

import hashlib
import re
import tarfile
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

SUFFIX_FORMATS = {".cif": "cif", ".json": "json", ".vasp": "poscar", ".poscar": "poscar"}
POSCAR_NAMES = ("POSCAR", "CONTCAR")


# =============================================================================== file names
def structure_format(name: str) -> str | None:
    """Format of a file from its name (None: not a structure file, e.g. a README)."""
    base = name.rsplit("/", 1)[-1]
    if not base or base.startswith(".") or "__MACOSX" in name:
        return None
    if base.upper().startswith(POSCAR_NAMES):
        return "poscar"
    dot = base.rfind(".")
    return SUFFIX_FORMATS.get(base[dot:].lower()) if dot > 0 else None


# =============================================================================== inputs
def _is_tar(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2"))


def _is_zip(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".zip"


def list_inputs(inputs: Path) -> dict[str, str]:
    """id -> format of every structure file; the id is the path inside the folder/archive."""
    if inputs.is_dir():
        names = [p.relative_to(inputs).as_posix() for p in inputs.rglob("*") if p.is_file()]
    elif _is_tar(inputs):
        with tarfile.open(inputs, "r:*") as tar:
            names = [m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()]
    elif _is_zip(inputs):
        with zipfile.ZipFile(inputs) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
    elif inputs.is_file():
        names = [inputs.name]
    else:
        raise FileNotFoundError(f"screening input not found: {inputs}")
    found = {n: structure_format(n) for n in names}
    return {n: fmt for n, fmt in sorted(found.items()) if fmt is not None}


def iter_contents(inputs: Path, wanted: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(id, raw bytes) of the wanted ids, in storage order (tar streams are read front to back)."""
    wanted = set(wanted)
    if inputs.is_dir():
        for key in sorted(wanted):
            yield key, (inputs / key).read_bytes()
    elif _is_tar(inputs):
        left = len(wanted)
        with tarfile.open(inputs, "r:*") as tar:
            for member in tar:
                key = member.name.removeprefix("./")
                if member.isfile() and key in wanted:
                    yield key, tar.extractfile(member).read()  # type: ignore[union-attr]
                    left -= 1
                    if left == 0:  # stop decompressing once everything wanted was read
                        return
    elif _is_zip(inputs):
        with zipfile.ZipFile(inputs) as zf:
            for key in sorted(wanted):
                yield key, zf.read(key)
    elif inputs.name in wanted:
        yield inputs.name, inputs.read_bytes()


def storage_order(inputs: Path, ids: Iterable[str]) -> list[str]:
    """The ids in the order ``iter_contents`` yields them (a tar's storage order, else sorted).

    The local run cuts its batches from that stream; an engine that plans the batches before
    reading (``serving.screen.ray_engine``) cuts the same ones from this list, so every structure is
    predicted in the same batch by both and the figures are bit-identical. One pass over a tar's
    headers (a ``.tar.gz`` is decompressed once)."""
    wanted = set(ids)
    if not _is_tar(inputs):
        return sorted(wanted)
    order: dict[str, None] = {}
    with tarfile.open(inputs, "r:*") as tar:
        for member in tar:
            key = member.name.removeprefix("./")
            if member.isfile() and key in wanted:
                order.setdefault(key)
    return list(order)


# =============================================================================== sharding
def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (0-based i, as Slurm array ids and Kubernetes completion indexes are) or None."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--shard must look like i/n (e.g. 3/8), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return i, n


def shard_of(key: str, n: int) -> int:
    """Bucket of an id among n shards: a function of the id alone (stable as inputs grow)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n


def select_shard(ids: Iterable[str], shard: tuple[int, int] | None) -> list[str]:
    """The sorted ids that belong to ``shard`` (all of them when None)."""
    ids = sorted(ids)
    if shard is None:
        return ids
    i, n = shard
    return [k for k in ids if shard_of(k, n) == i]
