"""The pretrained release: every ion's served model, small enough to live in git, with a card.

Why: a fresh checkout should predict in seconds without running the 1.5 h pipeline or an MLflow
registry. ``voltage release`` (run on purpose, never by ``dvc repro``) copies each ion's served
artifact (``models/ions/<Ion>.pt``) into ``release/<Ion>.pt`` in a compact, weights-only form and
writes ``release/manifest.json`` (sha256 of every file, data hash, git commit, date, metrics) and
``release/MODEL_CARD.md``. The service and ``voltage-serve predict`` fall back to it when the
registry has no champion (``serving.models.load_release_model``).

Why compact: a GP head stores its posterior as float64 tensors, among them the Cholesky factor of
its n x n kernel matrix (20 MB per head for Li's 1578 training crystals; 68 MB in all for Li).
The release drops that factor and recomputes it at load time from the training inputs and the
kernel hyperparameters exactly as scikit-learn built it (:func:`gp_cholesky`; agreement ~1e-12).
The training inputs are stored losslessly but smaller: a column that is a standardised float32
value (the pooled CGCNN vectors, and many descriptors) is stored as that float32 value and
re-standardised at load, bit for bit; every other column stays float64; a column several heads
share (an ion's members see the same descriptors) is stored once. The writer checks that each
head's inputs come back bit-identical and its Cholesky factor within ``CHOL_RTOL`` (a head that
does not is stored whole), and that every model predicts the same voltages and stds as its source
artifact on real test-split crystals; it refuses to write a release that does not. Measured on
the pipeline's models: 168 MB of artifacts -> 16 MB, predictions and stds identical.
``float32_inputs`` (``voltage release --float32-inputs``, or by itself when the exact release
would exceed ``--max-mb``) also rounds the remaining float64 input columns: ~20% smaller again,
predictions then within ~1e-6 V of the source (checked, against 1e-4 V by default).

Loading recomputes the factors; the distances over input columns that several heads share are
computed once (:func:`shared_sqdists`). Li's three CGCNN GP heads of 1578 crystals take about
0.5 s on one core; that and importing torch and the featuriser are most of a cold start.

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
import logging
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from training.inference import VoltageModel
from training.model.artifact import CheckpointError, LoadedModel

if TYPE_CHECKING:
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

RELEASE_FORMAT = "electrode-voltage-release"
RELEASE_VERSION = 1
MANIFEST_NAME = "manifest.json"
CARD_NAME = "MODEL_CARD.md"
#: scikit-learn's ``GaussianProcessRegressor(alpha=1e-10)`` default, added to K's diagonal before
#: the Cholesky factorisation (``training.model.gp_head._fit_sklearn`` keeps the default).
GPR_JITTER = 1e-10
#: Largest |L_recomputed - L_stored| / max|L_stored| accepted when dropping a Cholesky factor.
CHOL_RTOL = 1e-9
#: Largest |difference| (V) in voltage or std between a release model and its source artifact.
CHECK_TOL_V = 1e-6
#: Crystals of each ion's test split the writer predicts with both models.
DEFAULT_CHECK_N = 16

_GP_DROPPED = ("x_train", "chol")


class ReleaseError(ValueError):
    """A release that cannot be written or read as asked; the message says which and why."""


class ReleaseTooLarge(ReleaseError):
    """The release would exceed its size limit (nothing was replaced)."""


# ------------------------------------------------------------------------------ GP posterior
def gp_cholesky(x_train: Tensor, kernel: Tensor, sqdist: np.ndarray | None = None) -> Tensor:
    """Lower Cholesky factor of ``amplitude * Matern(d / length_scale) + noise * I + jitter * I``
    over the training inputs, computed as scikit-learn's GaussianProcessRegressor computed it
    when the head was fitted (``kernel`` = [amplitude, length_scale, noise, nu]).

    ``sqdist``: the inputs' condensed squared distances when already known (heads that share
    input columns share that part of the work, :func:`shared_sqdists`); the result then differs
    from scikit-learn's in rounding only (~1e-13)."""
    from scipy.linalg import cholesky
    from scipy.spatial.distance import pdist, squareform

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
    gram = squareform(k)
    gram *= amplitude  # ConstantKernel * Matern; the white noise is diagonal only
    gram[np.diag_indices_from(gram)] = (amplitude + noise) + GPR_JITTER
    return torch.from_numpy(cholesky(gram, lower=True, overwrite_a=True, check_finite=False))


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


class _Pools:
    """Distinct training-input columns, grouped by row count and dtype (shared ones once)."""

    def __init__(self) -> None:
        self.columns: dict[tuple[int, str], list[Tensor]] = {}
        self.index: dict[tuple[int, str, bytes], int] = {}

    def add(self, column: Tensor, kind: str) -> int:
        n = int(column.shape[0])
        key = (n, kind, column.contiguous().numpy().tobytes())
        if key not in self.index:
            cols = self.columns.setdefault((n, kind), [])
            self.index[key] = len(cols)
            cols.append(column.contiguous())
        return self.index[key]

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {}
        for n in sorted({n for n, _ in self.columns}):
            out[str(n)] = {
                "f32": _stack(self.columns.get((n, "f32"), []), n, torch.float32),
                "f64": _stack(self.columns.get((n, "f64"), []), n, torch.float64),
            }
        return out


def _stack(cols: list[Tensor], n: int, dtype: torch.dtype) -> Tensor:
    return torch.stack(cols) if cols else torch.zeros(0, n, dtype=dtype)


def _compact_state(
    state: Mapping[str, Tensor], pools: _Pools, where: str, float32_inputs: bool = False
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One GP head state with x_train as pool references (chol: see ``compact_checkpoint``)."""
    x = state["x_train"].to(torch.float64)
    n, width = x.shape
    d = _standardised(state)
    mean, scale = state["x_mean"].to(torch.float64), state["x_scale"].to(torch.float64)
    raw = x.clone()
    raw[:, :d] = x[:, :d] * scale + mean
    raw32 = raw.to(torch.float32)
    probe = dict(state)
    probe["x_cols"] = torch.arange(width, dtype=torch.int64)
    probe["x_rows"] = torch.tensor([n], dtype=torch.int64)
    back = _expand_x(
        probe,
        {str(n): {"f32": raw32.T.contiguous(), "f64": torch.zeros(0, n, dtype=torch.float64)}},
        where,
    )
    exact = (back == x).all(dim=0)  # bit-identical after the float32 round trip
    cols = torch.empty(width, dtype=torch.int64)
    for j in range(width):
        if float32_inputs or bool(exact[j]):  # float32_inputs: the rest rounded, knowingly
            cols[j] = pools.add(raw32[:, j], "f32")
        else:
            cols[j] = -1 - pools.add(x[:, j], "f64")
    out = {k: v for k, v in state.items() if k not in _GP_DROPPED}
    out["x_cols"] = cols
    out["x_rows"] = torch.tensor([n], dtype=torch.int64)
    return out, {"n": n, "columns": width, "float32_columns": int(exact.sum()),
                 "rounded_columns": int((~exact).sum()) if float32_inputs else 0}  # fmt: skip


def compact_checkpoint(
    payload: Mapping[str, Any], float32_inputs: bool = False
) -> tuple[dict[str, Any], dict[str, Any], dict]:
    """(checkpoint with compact GP heads, column pools, per-head report). ``float32_inputs``:
    also round the GP training inputs that float32 does not hold exactly (smaller; the posterior
    then is that of the rounded inputs, so the factor is recomputed from them, never kept)."""
    out = _copy_payload(payload)
    pools = _Pools()
    report: dict[str, Any] = {}
    slots = list(_gp_slots(out))
    for where, container, key in slots:
        state = container[key]
        if "x_train" not in state or "chol" not in state:
            raise ReleaseError(f"{where}: GP head state lacks x_train or chol")
    originals = [container[key] for _, container, key in slots]
    for where, container, key in slots:
        container[key], report[where] = _compact_state(container[key], pools, where,
                                                       float32_inputs)  # fmt: skip
    # The factor as loading will recompute it (shared distance blocks included), compared with
    # the fitted one: a head fitted some other way keeps its factor rather than serve another
    # posterior.
    xs = [st["x_train"].to(torch.float64) for st in originals]
    for (where, container, key), st, x, sq in zip(slots, originals, xs, shared_sqdists(xs),
                                                  strict=True):  # fmt: skip
        chol = st["chol"].to(torch.float64)
        again = gp_cholesky(x, st["kernel"], sq)
        rel = float((again - chol).abs().max()) / max(float(chol.abs().max()), 1e-300)
        kept = rel > CHOL_RTOL and not report[where]["rounded_columns"]
        report[where].update(chol_rel_diff=rel, chol_kept=kept)
        if kept:
            log.warning("%s: recomputed Cholesky factor differs by %.2e (relative): kept",
                        where, rel)  # fmt: skip
            container[key]["chol"] = chol
    return out, pools.tensors(), report


def expand_checkpoint(compact: Mapping[str, Any], pools: Mapping[str, Any]) -> dict[str, Any]:
    """The full checkpoint payload (``training.model.artifact`` layout) of a compact one."""
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
    """A checkpoint payload brought to life with ``load_checkpoint``'s own checks.

    ``training.model.artifact`` reads checkpoints from files only; rather than write the expanded
    payload to a temporary file, this runs the same steps on the dict (its helpers, in its order).
    """
    from training.model import artifact as art
    from training.model.cgcnn import CGCNN, CGCNNConfig, EnsembleHead
    from training.train.normalizer import Normalizer

    load_payload = getattr(art, "load_payload", None)  # /tmp/patches: artifact.load_payload
    if load_payload is not None:
        return load_payload(payload, Path(where))
    path = Path(where)
    if not isinstance(payload, dict) or payload.get("format") != art.CHECKPOINT_FORMAT:
        raise CheckpointError(f"{where} is not a {art.CHECKPOINT_FORMAT} checkpoint")
    version = payload.get("schema_version")
    if version not in art.SUPPORTED_SCHEMA_VERSIONS:
        raise CheckpointError(f"{where}: checkpoint schema_version {version!r} is not supported "
                              f"(supported: {sorted(art.SUPPORTED_SCHEMA_VERSIONS)})")  # fmt: skip
    config = CGCNNConfig.from_dict(art._require(payload, "model_config", dict))
    normalizer = Normalizer.from_dict(art._require(payload, "normalizer", dict))
    if not (math.isfinite(normalizer.mean) and normalizer.std > 0):
        raise CheckpointError(f"{where}: invalid normaliser {normalizer}")
    model = CGCNN(config)
    model.load_state_dict(art._require(payload, "state_dict", dict))
    model.eval()
    heads = art._load_heads(config, payload.get("heads"))
    ensemble = EnsembleHead(model, heads).eval() if heads else None
    members = []
    for i, member in enumerate(payload.get("members") or []):
        m = CGCNN(config)
        m.load_state_dict(art._require(member, "state_dict", dict))
        members.append((m.eval(), art._load_heads(config, member.get("heads"), f"member {i}")))
    loaded = LoadedModel(
        model=model, model_config=config,
        converter_dict=dict(art._require(payload, "converter", dict)), normalizer=normalizer,
        extra=dict(payload.get("extra") or {}), ensemble=ensemble, schema_version=int(version),
        members=members, chgnet=art._load_chgnet(payload.get("chgnet"), path),
    )  # fmt: skip
    art._check_descriptors(loaded, path)
    return loaded


# ------------------------------------------------------------------------------ reading
def _fingerprint(table: np.ndarray) -> str:
    """``training.graphs.encoding.encoding_fingerprint`` of a given table."""
    return hashlib.sha256(np.ascontiguousarray(table, dtype=np.float32).tobytes()).hexdigest()[:16]


class ReleasedModel(VoltageModel):
    """A ``VoltageModel`` read from a release file.

    The only difference: the element encoding comes from the file (the table the model was
    trained with, checked against the checkpoint's recorded fingerprint) instead of being rebuilt
    from mendeleev, which costs about 2 s of a cold start and can only be less faithful.
    ``tests/test_release.py`` pins the attributes to ``VoltageModel``'s.
    """

    def __init__(self, loaded: LoadedModel, encoding: np.ndarray) -> None:
        from training.graphs.converter import GraphConverter

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


# ------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class ReleaseInputs:
    """Where the writer reads models, reports and check crystals."""

    models_dir: Path = Path("models/ions")
    reports_dir: Path = Path("reports")
    records: Path | None = Path("data/clean/records.jsonl.gz")
    splits: Path | None = Path("data/splits.json")
    root: Path = Path(".")


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_structures(inputs: ReleaseInputs, ion: str, n: int) -> list[Structure]:
    """The first ``n`` crystals of the ion's test split (real structures the model never saw)."""
    if n <= 0 or inputs.records is None or inputs.splits is None:
        return []
    from training.datasets import load_ion_data

    data = load_ion_data(inputs.records, inputs.splits, ion)
    return [r.structure() for r in data.parts["test"][:n]]


def compare_models(
    a: VoltageModel, b: VoltageModel, structures: Sequence[Structure]
) -> dict[str, float]:
    """Largest |difference| of voltages and stds of two models on the same crystals (V)."""
    if not structures:
        return {"n": 0, "max_abs_voltage_diff": float("nan"), "max_abs_std_diff": float("nan")}
    inputs = a.graphs(structures)
    ma, sa = a.predict_graphs(inputs)
    mb, sb = b.predict_graphs(inputs)
    return {"n": len(structures), "max_abs_voltage_diff": float(np.abs(ma - mb).max()),
            "max_abs_std_diff": float(np.abs(sa - sb).max())}  # fmt: skip


def _registry_ref(reports_dir: Path, ion: str, run_ids: Sequence[str | None],
                  prefix: str) -> tuple[str, int]:  # fmt: skip
    """(registered name, version) of the artifact when the register stage's receipt names its
    run (the ``ion_model`` report's run, or the one the checkpoint records); else version 0."""
    row = _json(reports_dir / "registry.json").get(ion) or {}
    if row.get("run_id") and row.get("run_id") in {r for r in run_ids if r}:
        return str(row.get("name") or f"{prefix}-{ion}"), int(row.get("version") or 0)
    return f"{prefix}-{ion}", 0


def _cv_summary(cv: Mapping[str, Any], served: str) -> dict[str, Any]:
    """Per CV grouping: folds, crystals scored, the served method's MAE +- SE and coverage."""
    out: dict[str, Any] = {}
    for grouping, g in (cv.get("groupings") or {}).items():
        method = (g.get("methods") or {}).get(served) or {}
        unc = ((g.get("uncertainty") or {}).get(served) or {}).get("as_served") or {}
        out[grouping] = {"folds": g.get("folds"), "n_scored": g.get("n_scored"),
                         "method": served, "mae": method.get("mae"), "se": method.get("se"),
                         "coverage_90": unc.get("coverage_90"),
                         "mean_std": unc.get("mean_std")}  # fmt: skip
    return out


def _metrics(inputs: ReleaseInputs, ion: str) -> dict[str, Any]:
    """The card's figures of one ion from the pipeline's reports (absent ones are left out)."""
    report = _json(inputs.reports_dir / "metrics" / f"ion_{ion}.json")
    cv = _json(inputs.reports_dir / "cv" / f"{ion}.json")
    protocol = (_json(inputs.reports_dir / "protocol.json").get("ions") or {}).get(ion) or {}
    served = protocol.get("served")
    if served is None and cv.get("served"):
        served = cv["served"]
    cv_column = cv.get("served") or "transfer_gp"
    unc = report.get("uncertainty") or {}
    return {
        "served": served or report.get("served_variant") or report.get("head"),
        "n": report.get("n"),
        "test_mae": report.get("test_mae"),
        "uncertainty": {k: unc.get(k) for k in ("coverage_90", "val_coverage_90", "mean_std",
                                                "spearman_err_std", "std_scale") if k in unc},
        "cv": {} if cv.get("not_applicable") else _cv_summary(cv, cv_column),
        "cv_note": cv.get("not_applicable"),
        "best_baseline": protocol.get("best_baseline"),
        "test_mae_best_baseline": (protocol.get("test") or {}).get("mae_baseline"),
    }  # fmt: skip


def _release_payload(
    ion: str, payload: Mapping[str, Any], src: Path, sha: str, float32_inputs: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The release file's payload of one artifact, and the per-GP-head compaction report."""
    from training.graphs.encoding import encoding_table

    table = np.array(encoding_table(), dtype=np.float32)
    recorded = (payload.get("extra") or {}).get("encoding_fingerprint")
    if recorded and recorded != _fingerprint(table):
        raise ReleaseError(
            f"{src}: trained with element encoding {recorded}, but the installed one is "
            f"{_fingerprint(table)}: check the mendeleev version"
        )
    compact, pools, heads = compact_checkpoint(payload, float32_inputs)
    out = {"format": RELEASE_FORMAT, "release_version": RELEASE_VERSION, "ion": ion,
           "checkpoint": compact, "x_pools": pools, "encoding_table": torch.from_numpy(table),
           "source": {"file": str(src), "sha256": sha}}  # fmt: skip
    return out, heads


def write_release(
    ions: Sequence[str], out_dir: Path, inputs: ReleaseInputs = ReleaseInputs(),
    name_prefix: str = "electrode-voltage", check_n: int = DEFAULT_CHECK_N,
    tol: float = CHECK_TOL_V, now: datetime | None = None, max_bytes: int | None = None,
    float32_inputs: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Write ``out_dir`` (replaced whole, only once every ion's file is written and checked);
    returns the manifest. Raises ReleaseError when a model is missing, does not round-trip, or
    the files add up to more than ``max_bytes``."""
    from training.model.artifact import load_checkpoint
    from training.tracking import dataset_version, git_commit

    out_dir = Path(out_dir)
    stage = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    now = now or datetime.now(UTC)
    models: dict[str, Any] = {}
    try:
        for ion in ions:
            src = inputs.models_dir / f"{ion}.pt"
            if not src.is_file():
                raise ReleaseError(f"no served model for {ion} at {src} (run the pipeline first)")
            data = src.read_bytes()
            sha = sha256_bytes(data)
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            release, heads = _release_payload(ion, payload, src, sha, float32_inputs)
            path = stage / f"{ion}.pt"
            torch.save(release, path)
            entry_sha = sha256_file(path)
            released = read_release_file(path, entry_sha)
            check = compare_models(VoltageModel(load_checkpoint(src)), released,
                                   _check_structures(inputs, ion, check_n))  # fmt: skip
            check = _as_model_check(check, src, ion)
            if check["n"] and max(check["max_abs_voltage_diff"], check["max_abs_std_diff"]) > tol:
                raise ReleaseError(f"{ion}: the release model differs from {src} by "
                                   f"{check['max_abs_voltage_diff']:.2e} V (voltage) / "
                                   f"{check['max_abs_std_diff']:.2e} V (std) on "
                                   f"{check['n']} test crystals (limit {tol:g} V)")  # fmt: skip
            extra = payload.get("extra") or {}
            report_run = _json(inputs.reports_dir / "metrics" / f"ion_{ion}.json").get("run_id")
            name, version = _registry_ref(
                inputs.reports_dir, ion, (report_run, extra.get("mlflow_run_id")), name_prefix
            )
            models[ion] = {
                "file": path.name, "sha256": entry_sha, "bytes": path.stat().st_size,
                "name": name, "version": version, "mlflow_run_id": extra.get("mlflow_run_id"),
                # checkpoint_sha256: the registry's tag of the version registered from this file
                "source": {"file": str(src), "sha256": sha, "bytes": len(data),
                           "checkpoint_sha256": sha[:16]},
                "backbone": released.backbone, "gp_heads": heads, "check": check,
                **_metrics(inputs, ion),
            }  # fmt: skip
            log.info("%s: %.1f MB -> %.1f MB, check %s", ion, len(data) / 1e6,
                     models[ion]["bytes"] / 1e6, check)  # fmt: skip
        data_hash = dataset_version(inputs.root, ("data/clean/records.jsonl.gz",))
        manifest = {
            "format": RELEASE_FORMAT, "release_version": RELEASE_VERSION,
            "created": now.isoformat(timespec="seconds"), "git_commit": git_commit(inputs.root),
            "data": {"data/clean/records.jsonl.gz": data_hash.get("data/clean/records.jsonl.gz",
                                                                  "unknown")},
            "total_bytes": sum(m["bytes"] for m in models.values()),
            "check_tolerance_v": tol, "float32_inputs": float32_inputs, "models": models,
        }  # fmt: skip
        if max_bytes is not None and manifest["total_bytes"] > max_bytes:
            sizes = ", ".join(f"{i} {m['bytes'] / 1e6:.1f}" for i, m in models.items())
            raise ReleaseTooLarge(f"the release would be {manifest['total_bytes'] / 1e6:.1f} MB, "
                               f"over the {max_bytes / 1e6:.1f} MB limit ({sizes} MB)")  # fmt: skip
        (stage / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        (stage / CARD_NAME).write_text(model_card(manifest))
        _swap(stage, out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return manifest


def _as_model_check(check: dict[str, Any], src: Path, ion: str) -> dict[str, Any]:
    """The check as recorded: against which artifact, on which crystals."""
    crystals = f"first {check['n']} of the {ion} test split" if check["n"] else "none"
    return {**check, "against": str(src), "crystals": crystals}


def _swap(stage: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``stage`` (the old release is removed only after the rename)."""
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    stage.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ model card
def _f(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}"


def _cv_cell(cv: Mapping[str, Any], grouping: str) -> str:
    g = cv.get(grouping) or {}
    if g.get("mae") is None:
        return "–"
    return f"{_f(g['mae'])} ± {_f(g.get('se'))} (n={g.get('n_scored')})"


def model_card(manifest: Mapping[str, Any]) -> str:
    """The release's MODEL_CARD.md, from the manifest alone (so it can be regenerated)."""
    models = manifest["models"]
    total = manifest["total_bytes"] / 1e6
    lines = [
        "# Electrode voltage: pretrained release",
        "",
        "One model per working ion: the pipeline's served models (`models/ions/<Ion>.pt`) in the "
        "compact form of `training/release.py`. Written by `voltage release` (never by "
        "`dvc repro`); the service and `voltage-serve predict` use it for an ion whose MLflow "
        'registry has no `champion` (answers say `"source": "release"`).',
        "",
        f"- created: {manifest['created']}",
        f"- git commit: `{manifest['git_commit']}`",
        "- training data (DVC md5 of `data/clean/records.jsonl.gz`): "
        f"`{manifest['data'].get('data/clean/records.jsonl.gz', 'unknown')}`",
        f"- size: {total:.1f} MB in {len(models)} files; sha256 of each in `{MANIFEST_NAME}` "
        "(loading refuses a file that does not match)",
        "",
        "```bash",
        "voltage-serve predict tests/fixtures/CoO2.cif --ion Li",
        "```",
        "",
        "## Accuracy (V, average voltage vs. the metal)",
        "",
        "Test: the grouped test split (hosts never in any training set), scored once per pipeline "
        "run. CV: leak-free grouped 5-fold CV over the ion's data by host and by chemical system, "
        "scoring only crystals on hosts the Li backbones never saw (MAE ± SE; not for Li, whose "
        "backbones trained on its crystals). Coverage: fraction of test targets inside the "
        "served 90 % interval (mean ± 1.645 std).",
        "",
        "| ion | served model | n train/val/test | test MAE | best baseline (test MAE) | "
        "CV host | CV chemsys | 90 % coverage test | mean std | registry version |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ion, m in models.items():
        n = m.get("n") or {}
        counts = "/".join(str(n.get(k, "–")) for k in ("train", "val", "test")) if n else "–"
        unc = m.get("uncertainty") or {}
        base = m.get("best_baseline")
        base_cell = f"{base} ({_f(m.get('test_mae_best_baseline'))})" if base else "–"
        version = f"{m['name']} v{m['version']}" if m.get("version") else "not registered"
        lines.append(
            f"| {ion} | {m.get('served') or '–'} | {counts} | {_f(m.get('test_mae'))} | "
            f"{base_cell} | {_cv_cell(m.get('cv') or {}, 'host')} | "
            f"{_cv_cell(m.get('cv') or {}, 'chemsys')} | {_f(unc.get('coverage_90'), 2)} | "
            f"{_f(unc.get('mean_std'))} | {version} |"
        )
    lines += [
        "",
        "## Files and checks",
        "",
        "Each file equals its source artifact in what it predicts: the writer predicted the first "
        "test-split crystals with both and refused differences above "
        f"{manifest.get('check_tolerance_v', CHECK_TOL_V):g} V. GP training inputs are stored "
        + (
            "rounded to float32 (`--float32-inputs`)."
            if manifest.get("float32_inputs")
            else "losslessly (float32 only where that is exact)."
        ),
        "",
        "| ion | file | MB | source MB | backbone | GP heads (n train) | crystals checked | "
        "max ΔV | max Δstd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ion, m in models.items():
        heads = m.get("gp_heads") or {}
        sizes = ", ".join(map(str, sorted({h["n"] for h in heads.values()}))) or "–"
        chk = m.get("check") or {}
        dv, ds = ("–", "–")
        if chk.get("n"):
            dv, ds = f"{chk['max_abs_voltage_diff']:.1e}", f"{chk['max_abs_std_diff']:.1e}"
        lines.append(
            f"| {ion} | `{m['file']}` | {m['bytes'] / 1e6:.1f} | "
            f"{m['source']['bytes'] / 1e6:.1f} | {m.get('backbone', '–')} | "
            f"{len(heads)} ({sizes}) | {chk.get('n', 0)} | {dv} | {ds} |"
        )
    lines += [
        "",
        "## Limits",
        "",
        "- Trained on Materials Project insertion electrodes (2020 snapshot): charged hosts with "
        "up to a few hundred sites; crystals far from that chemistry get larger stds and a "
        "warning naming unseen elements.",
        "- The multivalent ions (Mg, Ca, Zn, Al) have 100-400 training crystals; read their "
        "stds and the CV figures above before trusting a single number.",
        "- The voltage is the electrode's average voltage over its whole insertion range, not a "
        "voltage profile.",
        "",
    ]
    return "\n".join(lines)
