"""Reading the pretrained release (``release/``, written by ``training/release.py``,
``voltage release``): one compact, weights-only file per ion plus ``manifest.json``.

The service (``serving.models.load_release_model``) and ``voltage-serve predict`` load it when the
registry has no champion; every file is checked against the manifest's sha256 before it is read.

A GP head in a release file normally lacks its Cholesky factor (the writer keeps it only when
recomputing it would not reproduce it): loading recomputes it from the head's training inputs and
kernel hyperparameters as scikit-learn built it (:func:`gp_cholesky`). The distances over input
columns that several heads share are computed once (:func:`shared_sqdists`). Li's three CGCNN GP
heads of 1578 crystals take about 0.5 s on one core; that and importing torch and the featuriser
are most of a cold start.

Layout of ``release/<Ion>.pt`` (``torch.save``; only tensors and plain values, so it loads with
``weights_only=True``)::

    {"format": "electrode-voltage-release", "release_version": 1, "ion": "Li",
     "checkpoint": {...the source checkpoint; each GP head state without x_train and chol,
                    with x_cols (int64: >= 0 a float32 pool column, < 0 float64 column -1-k)
                    and x_rows (int64 [n])...},
     "x_pools": {"<n>": {"f32": (k32, n) float32, "f64": (k64, n) float64}},
     "encoding_table": (101, 92) float32,   # the element encoding the model was trained with
     "source": {"file": "models/ions/Li.pt", "sha256": "..."}}

The element encoding travels with the model (checked against the checkpoint's recorded
fingerprint), so loading a release does not rebuild it from mendeleev (about 2 s).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voltage_model.artifact import CheckpointError, LoadedModel
from voltage_model.predict import VoltageModel

RELEASE_FORMAT = "electrode-voltage-release"
RELEASE_VERSION = 1
MANIFEST_NAME = "manifest.json"
#: scikit-learn's ``GaussianProcessRegressor(alpha=1e-10)`` default, added to K's diagonal before
#: the Cholesky factorisation (``voltage_model.models.gp_head._fit_sklearn`` keeps the default).
GPR_JITTER = 1e-10


class ReleaseError(ValueError):
    """A release that cannot be written or read as asked; the message says which and why."""


# ------------------------------------------------------------------------------ GP posterior
def gp_cholesky(x_train: Tensor, kernel: Tensor, sqdist: np.ndarray | None = None) -> Tensor:
    """Lower Cholesky factor of ``amplitude * Matern(d / length_scale) + noise * I + jitter * I``
    over the training inputs, computed as scikit-learn's GaussianProcessRegressor computed it
    when the head was fitted (``kernel`` = [amplitude, length_scale, noise, nu]).

    ``sqdist``: the inputs' condensed squared distances when already known (heads that share
    input columns share that part of the work, :func:`shared_sqdists`); the result then differs
    from scikit-learn's in rounding only (~1e-13)."""
    from scipy.linalg import cholesky
    from scipy.spatial.distance import pdist

    amplitude, length_scale, noise, nu = (float(v) for v in kernel.reshape(-1)[:4])
    if sqdist is None:
        x = x_train.detach().to(torch.float64).numpy()
        d = pdist(x / length_scale, metric="euclidean")
    else:
        d = np.sqrt(sqdist) / length_scale
    if nu == 0.5:
        k = np.exp(-d)
    elif nu == 1.5:
        k = d * math.sqrt(3)
        k = (1.0 + k) * np.exp(-k)
    elif nu == 2.5:
        k = d * math.sqrt(5)
        k = (1.0 + k + k**2 / 3.0) * np.exp(-k)
    else:
        raise ReleaseError(f"GP head Matern nu {nu} not supported")
    k *= amplitude  # ConstantKernel * Matern; the white noise is diagonal only
    gram = _lower_gram(k, x_train.shape[0])
    gram[np.diag_indices_from(gram)] = (amplitude + noise) + GPR_JITTER
    return torch.from_numpy(cholesky(gram, lower=True, overwrite_a=True, check_finite=False))


def _lower_gram(condensed: np.ndarray, n: int) -> np.ndarray:
    """The (n, n) Fortran-ordered matrix whose strict lower triangle holds the condensed pairs
    (the upper one stays zero): all that LAPACK's lower Cholesky reads, in the layout it takes
    without a copy. Why not ``squareform``: it writes both triangles in C order, which LAPACK
    then copies again; this fills one triangle a row slice at a time, same values and factor."""
    gram = np.zeros((n, n))  # C order; its transpose is the Fortran-ordered result
    start = 0
    for i in range(n - 1):  # pair (i, j > i): row i's tail, i.e. column i of the transpose
        stop = start + n - 1 - i
        gram[i, i + 1 :] = condensed[start:stop]
        start = stop
    return gram.T


def shared_sqdists(xs: Sequence[Tensor]) -> list[np.ndarray | None]:
    """Condensed squared distances of each head's inputs, a block of columns that several heads
    share (an ion's members read the same descriptors) computed once for all of them; None for
    a head that shares no column (:func:`gp_cholesky` then follows scikit-learn exactly)."""
    from scipy.spatial.distance import pdist

    holders: dict[tuple[int, bytes], list[tuple[int, int]]] = {}
    for h, x in enumerate(xs):
        keys = [(x.shape[0], x[:, j].numpy().tobytes()) for j in range(x.shape[1])]
        for j, key in enumerate(keys):
            holders.setdefault(key, []).append((h, j))
    blocks: dict[tuple[int, ...], list[int]] = {}  # heads sharing -> columns of the first one
    own: list[list[int]] = [[] for _ in xs]
    for found in holders.values():
        heads = tuple(h for h, _ in found)
        if len(heads) > 1 and len(set(heads)) == len(heads):
            blocks.setdefault(heads, []).append(found[0][1])
        else:  # one head's own column (or repeated within a head): no sharing to be had
            for h, j in found:
                own[h].append(j)
    if not blocks:
        return [None] * len(xs)
    acc: list[np.ndarray | None] = [None] * len(xs)

    def add(h: int, part: np.ndarray) -> None:
        if acc[h] is None:
            acc[h] = part.copy()
        else:
            np.add(acc[h], part, out=acc[h])

    for heads, cols in blocks.items():
        part = pdist(xs[heads[0]][:, cols].numpy(), metric="sqeuclidean")
        for h in heads:
            add(h, part)
    for h, cols in enumerate(own):
        if cols and acc[h] is not None:
            add(h, pdist(xs[h][:, sorted(cols)].numpy(), metric="sqeuclidean"))
    return acc


def _gp_slots(payload: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(label, container, key) of every GP head state in a checkpoint payload."""
    heads = payload.get("heads") or []
    for i, state in enumerate(heads):
        if isinstance(state, dict) and "alpha" in state and "kernel" in state:
            yield f"heads[{i}]", heads, i
    for m, member in enumerate(payload.get("members") or []):
        for i, state in enumerate(member.get("heads") or []):
            if isinstance(state, dict) and "alpha" in state and "kernel" in state:
                yield f"members[{m}].heads[{i}]", member["heads"], i
    chgnet = payload.get("chgnet")
    if isinstance(chgnet, dict) and isinstance(chgnet.get("head"), dict):
        yield "chgnet.head", chgnet, "head"


def _copy_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Containers copied (so slots can be replaced), tensors shared."""
    out = dict(payload)
    out["heads"] = None if payload.get("heads") is None else list(payload["heads"])
    out["members"] = [
        {**m, "heads": None if m.get("heads") is None else list(m["heads"])}
        for m in payload.get("members") or []
    ]
    if isinstance(payload.get("chgnet"), dict):
        out["chgnet"] = dict(payload["chgnet"])
    return out


def _standardised(state: Mapping[str, Tensor]) -> int:
    """How many leading columns of x_train are standardised (the rest are ion columns)."""
    return int(state["x_mean"].numel())


def _expand_x(state: Mapping[str, Tensor], pools: Mapping[str, Any], where: str) -> Tensor:
    """The head's float64 training inputs from its column references."""
    cols = state.get("x_cols")
    rows = state.get("x_rows")
    if not isinstance(cols, Tensor) or not isinstance(rows, Tensor):
        raise ReleaseError(f"{where}: compact GP head lacks x_cols/x_rows")
    n = int(rows.reshape(-1)[0])
    pool = pools.get(str(n))
    if not isinstance(pool, dict):
        raise ReleaseError(f"{where}: no column pool for {n} training rows")
    f32, f64 = pool.get("f32"), pool.get("f64")
    cols = cols.to(torch.int64)
    is32 = cols >= 0
    idx32, idx64 = cols[is32], -1 - cols[~is32]
    if (idx32.numel() and int(idx32.max()) >= f32.shape[0]) or (
        idx64.numel() and int(idx64.max()) >= f64.shape[0]
    ):
        raise ReleaseError(f"{where}: column reference outside its pool")
    x = torch.empty(n, cols.numel(), dtype=torch.float64)
    x[:, is32] = f32[idx32].T.to(torch.float64)
    x[:, ~is32] = f64[idx64].T
    d = _standardised(state)
    std = is32.clone()
    std[d:] = False  # ion columns are stored as they are, not standardised
    if bool(std.any()):
        j = std.nonzero().reshape(-1)
        x[:, j] = (x[:, j] - state["x_mean"][j]) / state["x_scale"][j]
    return x


def expand_checkpoint(compact: Mapping[str, Any], pools: Mapping[str, Any]) -> dict[str, Any]:
    """The full checkpoint payload (``voltage_model.artifact`` layout) of a compact one."""
    out = _copy_payload(compact)
    slots = list(_gp_slots(out))
    states = []
    for where, container, key in slots:
        state = dict(container[key])
        state["x_train"] = _expand_x(state, pools, where)
        state.pop("x_cols")
        state.pop("x_rows")
        states.append(state)
    todo = [i for i, st in enumerate(states) if st.get("chol") is None]
    sq = shared_sqdists([states[i]["x_train"] for i in todo])
    for i, sqdist in zip(todo, sq, strict=True):
        states[i]["chol"] = gp_cholesky(states[i]["x_train"], states[i]["kernel"], sqdist)
    for (_, container, key), state in zip(slots, states, strict=True):
        container[key] = state
    return out


def loaded_from_payload(payload: dict[str, Any], where: str) -> LoadedModel:
    """A checkpoint payload brought to life by ``voltage_model.artifact``'s own loader and checks
    (the expanded release is never written to a temporary file)."""
    from voltage_model.artifact import load_payload

    return load_payload(payload, Path(where))


# ------------------------------------------------------------------------------ reading
def _fingerprint(table: np.ndarray) -> str:
    """``voltage_model.graphs.encoding.encoding_fingerprint`` of a given table."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()[:16]


class ReleasedModel(VoltageModel):
    """A ``VoltageModel`` read from a release file.

    The only difference: the element encoding comes from the file (the table the model was
    trained with, checked against the checkpoint's recorded fingerprint) instead of being rebuilt
    from mendeleev, which costs about 2 s of a cold start and can only be less faithful.
    ``tests/training/test_release.py`` pins the attributes to ``VoltageModel``'s.
    """

    def __init__(self, loaded: LoadedModel, encoding: np.ndarray) -> None:
        from voltage_model.graphs.converter import GraphConverter

        table = np.ascontiguousarray(encoding, dtype=np.float32)
        recorded = loaded.extra.get("encoding_fingerprint")
        if recorded and recorded != _fingerprint(table):
            raise CheckpointError(
                f"release element encoding {_fingerprint(table)} is not the one the model "
                f"records ({recorded})"
            )
        self.loaded = loaded
        self.converter = GraphConverter.from_dict(loaded.converter_dict)
        self.encoding = torch.from_numpy(table.copy())
        self.std_scale = float(loaded.extra.get("std_scale", 1.0))
        self.train_elements = frozenset(loaded.extra.get("train_elements", []))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_release_file(path: Path, sha256: str | None = None) -> ReleasedModel:
    """Load one release file, refusing it when its sha256 is not ``sha256`` (the manifest's)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"cannot read release file {path}: {exc}") from exc
    if sha256 is not None:
        got = sha256_bytes(data)
        if got != sha256:
            raise ReleaseError(
                f"{path}: sha256 {got[:16]}... does not match the release manifest "
                f"({sha256[:16]}...): the file was changed after the release was written; "
                "refusing to load it (restore it with git, or write a new release)"
            )
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses code objects; a torn file fails to unzip
        raise ReleaseError(f"cannot read release file {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != RELEASE_FORMAT:
        raise ReleaseError(f"{path} is not an {RELEASE_FORMAT} file")
    if payload.get("release_version") != RELEASE_VERSION:
        raise ReleaseError(f"{path}: release_version {payload.get('release_version')!r} is not "
                           f"supported by this code ({RELEASE_VERSION})")  # fmt: skip
    pools = payload.get("x_pools")
    table = payload.get("encoding_table")
    if not isinstance(pools, dict) or not isinstance(table, Tensor):
        raise ReleaseError(f"{path}: x_pools or encoding_table missing")
    full = expand_checkpoint(payload["checkpoint"], pools)
    return ReleasedModel(loaded_from_payload(full, str(path)), table.numpy())


def read_manifest(release_dir: Path) -> dict[str, Any]:
    path = Path(release_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReleaseError(f"no release at {release_dir} ({MANIFEST_NAME} missing)") from None
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"{path} unreadable: {exc}") from exc
    if manifest.get("format") != RELEASE_FORMAT or not isinstance(manifest.get("models"), dict):
        raise ReleaseError(f"{path} is not an {RELEASE_FORMAT} manifest")
    return manifest


def release_entry(release_dir: Path, ion: str) -> dict[str, Any]:
    """The manifest's entry of ``ion`` (ReleaseError when the release has no such model)."""
    manifest = read_manifest(release_dir)
    entry = manifest["models"].get(ion)
    if not isinstance(entry, dict):
        have = ", ".join(sorted(manifest["models"])) or "none"
        raise ReleaseError(f"the release at {release_dir} has no model for {ion} (has: {have})")
    return entry


def load_release(release_dir: Path, ion: str) -> tuple[ReleasedModel, dict[str, Any]]:
    """(model, manifest entry) of one ion, the file checked against the manifest's sha256."""
    entry = release_entry(release_dir, ion)
    name = str(entry.get("file", ""))
    if not name or Path(name).name != name:
        raise ReleaseError(f"{release_dir}/{MANIFEST_NAME}: suspicious file name {name!r}")
    model = read_release_file(Path(release_dir) / name, str(entry.get("sha256", "")) or None)
    if model.ion not in (None, ion):
        raise ReleaseError(f"{release_dir}/{name} is a model of {model.ion}, not {ion}")
    return model, entry


def verify_release(release_dir: Path) -> list[str]:
    """Problems of a release on disk (missing or changed files); empty when it is intact."""
    manifest = read_manifest(release_dir)
    problems = []
    for ion, entry in manifest["models"].items():
        path = Path(release_dir) / str(entry.get("file", ""))
        if not path.is_file():
            problems.append(f"{ion}: {path} missing")
        elif sha256_file(path) != entry.get("sha256"):
            problems.append(f"{ion}: {path} changed since the release was written")
    return problems
