"""Screening: rank many candidate electrode structures by predicted voltage, per working ion.

``run_screen`` reads a folder or a ``.tar(.gz)``/``.zip`` of CIF / POSCAR / pymatgen-JSON files,
predicts voltage and uncertainty with one model per ion, and writes, next to ``out_csv``:

* ``<out>.partial.jsonl``: append-only progress, one JSON line per input id (prediction or error).
  It is the source of truth: a rerun with ``resume=True`` skips every id already in it, so an
  interrupted job (pre-empted Slurm task, evicted pod) loses at most one batch.
* ``<out>.csv``: the ranked table (rank within ion, id, formula, ion, voltage, uncertainty,
  out-of-domain warnings); ``<out>.errors.csv``: files that could not be used and why;
  ``summary_json``: count and share above the threshold per ion (the paper's headline numbers).

Sharding: ``shard=(i, n)`` keeps the ids whose sha256 falls in bucket i of n.  A hash, rather than
a stride over the sorted list, means a file's shard depends on its own name only: adding files
to the input never moves the others between shards, so every shard's partial file stays valid for
``resume``.  ``merge_screen`` checks the shards cover 0..n-1 exactly once and are complete.

Two tiers (``training.screen_tiers``): the fast path below reproduces the CGCNN ensemble only.
For an ion whose champion is CGCNN-only that is the champion's answer (tier 1, final). For an ion
whose champion serves a CHGNet head (alone or blended), the fast path gives the CGCNN ensemble
stored in the same artifact, labelled ``tier1_cgcnn_estimate``; after tier 1 the champion as
served re-scores that ion's ``rescore_top`` highest and ``rescore_uncertain`` most uncertain
structures (tier 2, appended to the partial file as ``{"id", "tier2": {ion: ...}}`` lines). Every
row says which tier produced its figure and keeps the tier-1 figure beside it.

Engines: ``run_screen`` owns what decides the outputs (selection, resume, partial file, tier-2
plan, CSVs, summary); where the batches run is an ``Engine``: ``LocalEngine`` (this machine, a
process pool) or ``training.screen_ray.RayEngine`` (a Ray cluster). Both run the same batches
through the same functions (``screen_chunk``, ``screen_tiers.Rescorer``), so the outputs do not
depend on the engine, and a partial file written by one is resumed by the other.

Throughput: pymatgen's CIF parser costs ~10 ms per structure, more than graph building and
inference together, so CIFs in the plain P1 layout that pymatgen and Materials Project write are
read by a small exact-path parser (``fast_p1_cif``, ``voltage_model/cif.py``) that falls back to
pymatgen for anything else; parsing and graph building run in a process pool while the parent
runs the model.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import re
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from training import screen_tiers as tiers
from voltage_model.artifact import ensemble_volts
from voltage_model.cif import element_numbers, fast_p1_cif, served_structure
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import CrystalGraph, GraphConverter, validate_structure
from voltage_model.graphs.encoding import MAX_Z, element_data
from voltage_model.models.gp_head import head_mean_var
from voltage_model.predict import VoltageModel
from voltage_model.structures import (
    MIN_DISTANCE,
    StructureInputError,
    parse_structure,
)

log = logging.getLogger(__name__)

PARTIAL_FORMAT = "screen-partial-v1"
CSV_COLUMNS = ("rank", "id", "formula", "ion", "voltage", "uncertainty", "tier", "figure",
               "tier1_voltage", "tier1_uncertainty", "warnings")  # fmt: skip
ERROR_COLUMNS = ("id", "kind", "message")
SUFFIX_FORMATS = {".cif": "cif", ".json": "json", ".vasp": "poscar", ".poscar": "poscar"}
POSCAR_NAMES = ("POSCAR", "CONTCAR")


# =============================================================================== file names
def partial_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".partial.jsonl")


def errors_path(out_csv: Path) -> Path:
    return out_csv.with_suffix(".errors.csv")


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


# =============================================================================== preparation
@dataclass(frozen=True)
class Prepared:
    """A parsed, checked structure with one graph per distinct converter of the models."""

    id: str
    formula: str
    n_sites: int
    elements: tuple[str, ...]
    graphs: tuple[CrystalGraph, ...]


@dataclass(frozen=True)
class Failed:
    """An input that cannot be screened; ``kind`` uses the service's error kinds."""

    id: str
    kind: str
    message: str


_WORKER: dict[str, Any] = {}


def _init_worker(predictor: _Predictor, max_sites: int) -> None:
    """Per-process state: the models and converters (inherited, not pickled, under fork)."""
    _WORKER["predictor"] = predictor
    _WORKER["converters"] = [conv for conv, _ in predictor.groups]
    _WORKER["max_sites"] = max_sites


def _init_pool_worker(predictor: _Predictor, max_sites: int) -> None:
    """Pool initializer: one torch thread per worker (the workers are the parallelism)."""
    torch.set_num_threads(1)
    _init_worker(predictor, max_sites)


def _formula(symbols: Sequence[str]) -> str:
    from pymatgen.core import Composition

    return Composition(Counter(symbols)).reduced_formula


Arrays = tuple[list[str], np.ndarray, np.ndarray, tuple[bool, bool, bool]]


def _arrays(text: str, fmt: str, max_sites: int) -> Arrays:
    """(symbols, cartesian coords, lattice, pbc) via the fast CIF path or pymatgen + checks."""
    if fmt == "cif":
        fast = _fast_checked(text, max_sites)
        if fast is not None:
            return fast
    structure = parse_structure(text, fmt, max_sites)
    numbers = validate_structure(structure)
    symbols = [element_data()[int(z) - 1].symbol for z in numbers]
    return symbols, structure.cart_coords, structure.lattice.matrix, structure.lattice.pbc


def _fast_checked(text: str, max_sites: int) -> Arrays | None:
    """The fast path plus the checks of ``check_structure`` that are cheap on arrays."""
    fast = fast_p1_cif(text)
    if fast is None:
        return None
    symbols, frac, lattice = fast
    if len(symbols) > max_sites:
        raise StructureInputError(
            "too_many_sites", f"structure has {len(symbols)} sites; the limit is {max_sites}"
        )
    if abs(float(np.linalg.det(lattice))) < 1e-3:
        return None  # let pymatgen name the degenerate lattice
    return symbols, frac @ lattice, lattice, (True, True, True)


def _check_overlap(graph: CrystalGraph) -> None:
    """Sites closer than MIN_DISTANCE are overlapping atoms (same rule as ``check_structure``)."""
    real = graph.nbr_dist[graph.nbr_mask]
    if real.size and float(real.min()) < MIN_DISTANCE:
        raise StructureInputError(
            "overlapping_atoms",
            f"two sites are {float(real.min()):.3f} A apart (minimum {MIN_DISTANCE} A)",
        )


def prepare(key: str, fmt: str, data: bytes) -> Prepared | Failed:
    """Bytes -> checked graphs, or the reason it failed (never raises: screening must go on)."""
    try:
        text = data.decode("utf-8")
        symbols, cart, lattice, pbc = _arrays(text, fmt, _WORKER["max_sites"])
        z_of = element_numbers()
        numbers = np.array([z_of[s] for s in symbols], dtype=np.int16)
        if numbers.max() > MAX_Z:
            raise StructureInputError("unknown_element", f"elements beyond Z={MAX_Z}")
        convs = _WORKER["converters"]
        graphs = tuple(c.convert_arrays(numbers, cart, lattice, pbc) for c in convs)
        _check_overlap(graphs[0])
        return Prepared(key, _formula(symbols), len(symbols), tuple(sorted(set(symbols))), graphs)
    except UnicodeDecodeError:
        return Failed(key, "parse", "file is not UTF-8 text")
    except StructureInputError as exc:
        return Failed(key, exc.kind, str(exc))
    except Exception as exc:  # one bad file must not stop a screen of millions
        return Failed(key, "parse", f"{type(exc).__name__}: {str(exc)[:200]}")


def screen_chunk(jobs: Sequence[tuple[str, str, bytes]]) -> list[dict[str, Any]]:
    """Parse, build graphs and predict one chunk of (id, format, bytes): one record per job.

    The whole chain runs in the worker so that inference, the costliest step for ensembles and
    multi-ion screens, is parallel too; the parent only reads inputs and writes results.
    """
    prepared, out = [], {}
    for job in jobs:
        res = prepare(*job)
        if isinstance(res, Failed):
            out[res.id] = _error_record(res)
        else:
            prepared.append(res)
    for rec in _WORKER["predictor"].records(prepared):
        out[rec["id"]] = rec
    return [out[key] for key, _, _ in jobs]


# =============================================================================== models
def model_ident(model: VoltageModel) -> str:
    """Short hash of every weight, the normaliser and the std scale: "same model" for resume."""
    digest = hashlib.sha256()
    loaded = model.loaded
    digest.update(json.dumps([loaded.normalizer.mean, loaded.normalizer.std]).encode())
    digest.update(repr(model.std_scale).encode())
    for k, (member, heads) in enumerate(loaded.backbones()):
        states = [member.state_dict(), *(h.state_dict() for h in heads)]
        for j, state in enumerate(states):
            for name, tensor in sorted(state.items()):
                digest.update(f"{k}.{j}.{name}".encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if loaded.chgnet is not None:  # (absent: the digest of a CGCNN-only model is unchanged)
        part = loaded.chgnet
        digest.update(json.dumps([part.weight, part.spec, part.normalizer.to_dict()],
                                 sort_keys=True).encode())  # fmt: skip
        for name, tensor in sorted(part.head.state_dict().items()):
            digest.update(f"chgnet.{name}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def champion_models(ions: Sequence[str], prefix: str = "electrode-voltage") -> dict[str, Any]:
    """Each ion's registered champion (MLflow alias), read as the service reads it: the
    checkpoint alone, weights-only (``voltage_model.registry``); no logged code is executed."""
    import mlflow

    from voltage_model.naming import model_name
    from voltage_model.registry import load_champion

    uri = mlflow.get_tracking_uri()
    return {ion: load_champion(uri, model_name(prefix, ion)) for ion in ions}


def checkpoint_models(paths: Mapping[str, Path]) -> dict[str, VoltageModel]:
    """Models from checkpoint files (tests, or screening before anything is registered)."""
    return {ion: VoltageModel.from_checkpoint(p) for ion, p in paths.items()}


def _converter_groups(
    ions: Sequence[str], models: Mapping[str, VoltageModel]
) -> list[tuple[GraphConverter, list[str]]]:
    """Ions grouped by graph converter: a structure's graph is built once per distinct one."""
    groups: dict[str, tuple[GraphConverter, list[str]]] = {}
    for ion in ions:
        conv = models[ion].converter
        key = json.dumps(conv.to_dict(), sort_keys=True)
        groups.setdefault(key, (conv, []))[1].append(ion)
    return list(groups.values())


# =============================================================================== prediction
def _backbone_key(model: torch.nn.Module) -> str:
    """Hash of a member's embedding + conv tensors: equal keys give equal atom vectors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("embedding.", "convs.")) and not name.endswith("num_batches_tracked"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Predictor:
    """Batches prepared structures through every ion's model and turns them into records.

    Reproduces ``LoadedModel.predict_with_std`` (``ensemble_volts`` over every member's heads,
    std times the model's ``std_scale``), but runs each distinct backbone once per batch:
    ions transferred with frozen BatchNorm share the source ion's backbones, and the backbone is
    nearly all of the cost, so a multi-ion screen costs little more than a single-ion one.
    """

    def __init__(self, ions: Sequence[str], models: Mapping[str, VoltageModel]) -> None:
        self.ions = list(ions)
        self.models = dict(models)
        self.groups = _converter_groups(ions, models)
        self.members = {
            ion: [(_backbone_key(m), m, heads) for m, heads in models[ion].loaded.backbones()]
            for ion in self.ions
        }

    @torch.inference_mode()
    def _predict(self, items: Sequence[Prepared]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for g, (conv, ions) in enumerate(self.groups):
            batch = collate([p.graphs[g] for p in items], conv, self.models[ions[0]].encoding)
            pooled: dict[str, torch.Tensor] = {}
            desc = None
            for ion in ions:
                means, variances = [], []
                if desc is None and self.models[ion].loaded.needs_descriptors:
                    desc = self.models[ion].loaded.descriptors(batch)
                for key, model, heads in self.members[ion]:
                    if key not in pooled:
                        pooled[key] = model.eval().pooled(batch)
                    for head in heads:
                        mean, var = head_mean_var(head, pooled[key], desc)
                        means.append(mean)
                        variances.append(var)
                    if not heads:
                        means.append(model.head(pooled[key]))
                vm = self.models[ion]
                mean, std = ensemble_volts(vm.loaded.normalizer, means, variances)
                out[ion] = (mean.double().numpy(), std.double().numpy() * vm.std_scale)
        return out

    def records(self, items: Sequence[Prepared]) -> list[dict[str, Any]]:
        """One JSON-able record per item; a batch that fails is retried item by item."""
        if not items:
            return []
        try:
            preds = self._predict(items)
        except Exception:
            if len(items) == 1:
                log.exception("prediction failed for %s", items[0].id)
                return [_error_record(Failed(items[0].id, "internal", "prediction failed"))]
            return [rec for item in items for rec in self.records([item])]
        return [self._record(k, item, preds) for k, item in enumerate(items)]

    def _record(self, k: int, item: Prepared, preds: Mapping[str, Any]) -> dict[str, Any]:
        per_ion = {}
        for ion in self.ions:
            mean, std = preds[ion]
            per_ion[ion] = {
                "voltage": round(float(mean[k]), 5),
                "uncertainty": round(float(std[k]), 5),
                "warnings": self._warnings(ion, item),
            }
        return {"id": item.id, "formula": item.formula, "n_sites": item.n_sites, "pred": per_ion}

    def _warnings(self, ion: str, item: Prepared) -> list[str]:
        """Out-of-domain flags: elements the ion's model never saw in training."""
        known = self.models[ion].train_elements
        unseen = sorted(set(item.elements) - known) if known else []
        return [f"unseen_elements:{'+'.join(unseen)}"] if unseen else []


def _error_record(f: Failed) -> dict[str, Any]:
    return {"id": f.id, "error": {"kind": f.kind, "message": f.message}}


# =============================================================================== partial file
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


def _check_header(found: dict[str, Any] | None, expected: dict[str, Any], path: Path) -> None:
    if found is None:
        return
    for key in ("ions", "models", "shard"):
        if found.get(key) != expected.get(key):
            raise ValueError(
                f"{path} was written with other {key} ({found.get(key)} vs {expected.get(key)}); "
                "resume only continues the same screen: use --no-resume or another output"
            )


def _append(fh: io.TextIOBase, objs: Iterable[dict[str, Any]]) -> None:
    fh.write("".join(json.dumps(o, separators=(",", ":")) + "\n" for o in objs))
    fh.flush()


# =============================================================================== outputs
def _two_tier(backbones: Mapping[str, str] | None, ion: str) -> bool:
    """Whether ``ion``'s champion serves a CHGNet head (its tier-1 figure is an estimate)."""
    return (backbones or {}).get(ion, "cgcnn") != "cgcnn"


def ranked_rows(
    records: Iterable[dict[str, Any]], backbones: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """One row per (id, ion) with its final figure (``screen_tiers.final``: tier 2 where there
    is one), ranked within the ion by that figure. ``backbones``: ion -> the champion's
    ``VoltageModel.backbone`` (missing: ``cgcnn``)."""
    rows = []
    for rec in records:
        for ion in rec.get("pred", {}):
            fig = tiers.final(rec, ion, _two_tier(backbones, ion))
            rows.append({"id": rec["id"], "formula": rec["formula"], "ion": ion,
                         **fig, "warnings": ";".join(fig["warnings"])})  # fmt: skip
    rows.sort(key=lambda r: (-r["voltage"], r["ion"], r["id"]))
    ranks: Counter[str] = Counter()
    for row in rows:
        ranks[row["ion"]] += 1
        row["rank"] = ranks[row["ion"]]
    return rows


def _ion_summary(
    records: Mapping[str, dict[str, Any]], ion: str, threshold: float, two_tier: bool
) -> dict[str, Any]:
    """One ion's counts on the final figures, and how many of them each tier produced."""
    figs = [tiers.final(r, ion, two_tier) for r in records.values() if "pred" in r]
    v = np.array([f["voltage"] for f in figs])
    above = v > threshold
    ood = sum(1 for r in records.values() if "pred" in r and r["pred"][ion]["warnings"])
    n_above = int(above.sum())
    return {
        "n": int(v.size), "n_above": n_above,
        "share_above": n_above / v.size if v.size else None,
        "mean": float(v.mean()) if v.size else None,
        "median": float(np.median(v)) if v.size else None,
        "max": float(v.max()) if v.size else None,
        "n_out_of_domain": ood,
        "two_tier": two_tier,
        "n_tier2": sum(f["tier"] == 2 for f in figs),
        "n_tier2_failed": sum(any(w.startswith("tier2_failed") for w in f["warnings"])
                              for f in figs),
        "n_above_tier1_estimate": int(sum(a and f["figure"] == tiers.ESTIMATE
                                          for a, f in zip(above, figs, strict=True))),
    }  # fmt: skip


def summarize(
    records: Mapping[str, dict[str, Any]], ions: Sequence[str], threshold: float,
    backbones: Mapping[str, str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Count and share of structures above ``threshold`` per ion (final figures), plus errors."""
    errors = Counter(r["error"]["kind"] for r in records.values() if "error" in r)
    per_ion = {
        ion: {"backbone": (backbones or {}).get(ion, "cgcnn"),
              **_ion_summary(records, ion, threshold, _two_tier(backbones, ion))}
        for ion in ions
    }  # fmt: skip
    return {
        "threshold": threshold,
        "n_inputs": len(records),
        "n_predicted": sum(1 for r in records.values() if "pred" in r),
        "n_errors": sum(errors.values()),
        "errors_by_kind": dict(sorted(errors.items())),
        "per_ion": per_ion,
    }


def write_outputs(
    records: Mapping[str, dict[str, Any]],
    ions: Sequence[str],
    out_csv: Path,
    summary_json: Path,
    threshold: float,
    extra: Mapping[str, Any] | None = None,
    backbones: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Ranked CSV, errors CSV and summary JSON from the records (rewritten whole, atomically)."""
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    rows = ranked_rows(records.values(), backbones)
    volts = ("voltage", "uncertainty", "tier1_voltage", "tier1_uncertainty")
    _write_csv(out_csv, CSV_COLUMNS, rows, dict.fromkeys(volts, "{:.4f}"))
    errs = [
        {"id": r["id"], **r["error"]} for _, r in sorted(records.items()) if "error" in r
    ]  # fmt: skip
    _write_csv(errors_path(out_csv), ERROR_COLUMNS, errs, {})
    summary = {**summarize(records, ions, threshold, backbones), **dict(extra or {})}
    summary_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = summary_json.with_name(summary_json.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(summary_json)
    return summary


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict], fmt: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for row in rows:
            w.writerow([fmt[c].format(row[c]) if c in fmt else row[c] for c in columns])
    tmp.replace(path)


# =============================================================================== the screen
def storage_order(inputs: Path, ids: Iterable[str]) -> list[str]:
    """The ids in the order ``iter_contents`` yields them (a tar's storage order, else sorted).

    The local run cuts its batches from that stream; an engine that plans the batches before
    reading (``training.screen_ray``) cuts the same ones from this list, so every structure is
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


def tier1_batches(order: Sequence[str], batch_size: int) -> list[list[str]]:
    """Tier-1 batches: consecutive ``batch_size`` ids of the storage order (as ``_chunks``)."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def tier2_batches(order: Sequence[str]) -> list[list[str]]:
    """Tier-2 batches: the storage order cut by ``tiers.chunk_sizes`` (as ``_tier2_jobs``)."""
    out, start = [], 0
    for size in tiers.chunk_sizes(len(order)):
        out.append(list(order[start : start + size]))
        start += size
    return out


def _chunks(
    inputs: Path, todo: Sequence[str], formats: Mapping[str, str], size: int
) -> Iterator[list[tuple[str, str, bytes]]]:
    chunk: list[tuple[str, str, bytes]] = []
    for key, data in iter_contents(inputs, todo):
        chunk.append((key, formats[key], data))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _record_stream(
    chunks: Iterator[list[tuple[str, str, bytes]]],
    predictor: _Predictor,
    max_sites: int,
    workers: int,
) -> Iterator[list[dict[str, Any]]]:
    """Records chunk by chunk, from a process pool (``workers`` > 1) or this process."""
    if workers <= 1:
        _init_worker(predictor, max_sites)
        yield from map(screen_chunk, chunks)
        return
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else None)  # fork: models are not copied
    with ctx.Pool(workers, _init_pool_worker, (predictor, max_sites)) as pool:
        yield from pool.imap(screen_chunk, chunks)


def _rate(n: int, seconds: float) -> dict[str, Any]:
    """A tier's structures, seconds and structures per second (wall clock)."""
    per_s = round(n / seconds, 2) if seconds > 0 and n else None
    return {"structures": n, "seconds": round(seconds, 3), "structures_per_second": per_s}


def _tier1(
    fh: io.TextIOBase, records: dict[str, dict], stream: Iterator[list[dict[str, Any]]],
    total: int, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Run the fast path over ``stream`` into the partial file and ``records``."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    with tqdm(total=total, unit="struct", disable=not progress, desc="tier 1") as bar:
        for recs in stream:
            _append(fh, recs)
            records.update((r["id"], r) for r in recs)
            bar.update(len(recs))
    return _rate(total, time.perf_counter() - t0)


def _tier2_jobs(
    inputs: Path, todo: Mapping[str, tuple[str, ...]], formats: Mapping[str, str]
) -> Iterator[list[tiers.Job]]:
    """Tier-2 jobs in storage order, cut by ``tiers.chunk_sizes``."""
    sizes = iter(tiers.chunk_sizes(len(todo)))
    size, chunk = next(sizes, 0), []
    for key, data in iter_contents(inputs, todo):
        chunk.append(tiers.Job(key, formats[key], data, todo[key]))
        if len(chunk) == size:
            yield chunk
            size, chunk = next(sizes, 0), []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Rescore:
    """Tier-2 settings: per ion, re-score the ``top`` highest and ``uncertain`` most uncertain
    tier-1 figures with the champion as served (0 and 0: no tier 2)."""

    top: int = 1000
    uncertain: int = 500

    def __post_init__(self) -> None:
        tiers.check_counts(self.top, self.uncertain)


@dataclass(frozen=True)
class Work:
    """What an engine needs to run a screen's batches: where the files are, their formats, the
    ions and their models, and the batch and size limits."""

    inputs: Path
    formats: Mapping[str, str]
    ions: Sequence[str]
    models: Mapping[str, VoltageModel]
    batch_size: int
    max_sites: int


class Engine(Protocol):
    """Where a screen's batches run. ``run_screen`` owns everything else (selection, resume,
    partial file, outputs), so every engine gives the same files for the same inputs.

    ``tier1`` yields the records of the ``todo`` ids batch by batch (``screen_chunk`` on
    consecutive ``batch_size`` ids of the storage order); ``tier2`` the tier-2 lines of
    ``todo`` (id -> ions to re-score; ``tiers.Rescorer.lines`` on the ``tier2_batches``), in
    any order of batches. ``report`` is what the summary keeps about the engine."""

    workers: int

    def tier1(self, work: Work, todo: Sequence[str]) -> Iterator[list[dict[str, Any]]]: ...

    def tier2(
        self, work: Work, todo: Mapping[str, tuple[str, ...]]
    ) -> Iterator[list[dict[str, Any]]]: ...

    def report(self) -> dict[str, Any]: ...


class LocalEngine:
    """This machine: the parent reads the inputs, ``workers`` processes (or the parent itself)
    parse, build graphs and predict."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def tier1(self, work: Work, todo: Sequence[str]) -> Iterator[list[dict[str, Any]]]:
        predictor = _Predictor(work.ions, work.models)
        chunks = _chunks(work.inputs, todo, work.formats, work.batch_size)
        return _record_stream(chunks, predictor, work.max_sites, self.workers)

    def tier2(
        self, work: Work, todo: Mapping[str, tuple[str, ...]]
    ) -> Iterator[list[dict[str, Any]]]:
        ions = sorted({i for v in todo.values() for i in v})
        rescorer = tiers.Rescorer({i: work.models[i] for i in ions}, work.max_sites,
                                  served_structure)  # fmt: skip
        jobs = _tier2_jobs(work.inputs, todo, work.formats)
        return tiers.stream(jobs, rescorer, self.workers)

    def report(self) -> dict[str, Any]:
        return {"name": "local", "workers": self.workers}


def _tier2(
    fh: io.TextIOBase, records: dict[str, dict], kept: Mapping[str, dict], work: Work,
    engine: Engine, rescore: Rescore, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """Re-score the selection of every CHGNet-serving ion (ids already done are skipped)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    two_tier = [i for i in work.ions if tiers.needs_tier2(work.models[i])]
    todo = tiers.plan(kept, two_tier, rescore.top, rescore.uncertain)
    if todo:
        with tqdm(total=len(todo), unit="struct", disable=not progress, desc="tier 2") as bar:
            for lines in engine.tier2(work, todo):
                _append(fh, lines)
                for line in lines:
                    records[line["id"]].setdefault("tier2", {}).update(line["tier2"])
                bar.update(len(lines))
    return {"ions": two_tier, "rescore_top": rescore.top, "rescore_uncertain": rescore.uncertain,
            "pairs": sum(len(v) for v in todo.values()),
            **_rate(len(todo), time.perf_counter() - t0)}  # fmt: skip


def run_screen(
    inputs: Path,
    ions: Sequence[str],
    models: Mapping[str, VoltageModel],
    out_csv: Path,
    summary_json: Path,
    threshold: float = 3.0,
    batch_size: int = 64,
    shard: tuple[int, int] | None = None,
    resume: bool = True,
    workers: int = 1,
    max_sites: int = 500,
    limit: int | None = None,
    progress: bool = True,
    rescore: Rescore | None = None,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Screen ``inputs`` with one model per ion; returns the summary (see module docstring).

    ``workers`` > 1 runs parsing, graphs and inference in that many processes (one torch thread
    each), in both tiers. ``batch_size`` is both the tier-1 inference batch and the unit of work
    and of progress; 64 is measured fastest on CPU (the (edges, 128) conv tensors of 64 crystals
    stay cache-sized; 256 ran ~1.5x slower per structure). ``limit`` keeps the first N ids of
    the shard (previews, benchmarks). With ``resume`` the ids already in
    ``<out>.partial.jsonl`` are skipped (tier-2 figures too); without it that file starts
    afresh. ``rescore`` (default ``Rescore()``) sets tier 2 (``training.screen_tiers``).
    ``engine`` runs the batches elsewhere (``training.screen_ray.RayEngine``: a Ray cluster);
    default ``LocalEngine(workers)``. The outputs do not depend on the engine.
    """
    rescore = rescore or Rescore()
    engine = engine or LocalEngine(workers)
    missing = [i for i in ions if i not in models]
    if not ions or missing:
        raise ValueError(f"need a model for every ion; missing: {missing or 'no ions given'}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t0 = time.perf_counter()
    formats = list_inputs(inputs)
    selected = select_shard(formats, shard)[:limit]
    header = {
        "format": PARTIAL_FORMAT, "ions": list(ions),
        "models": {i: model_ident(models[i]) for i in ions},
        "shard": list(shard) if shard else None, "inputs": str(inputs),
        "backbones": {i: models[i].backbone for i in ions},
    }  # fmt: skip
    part = partial_path(out_csv)
    part.parent.mkdir(parents=True, exist_ok=True)
    found, records, _ = read_partial(part) if resume else (None, {}, None)
    _check_header(found, header, part)
    todo = [k for k in selected if k not in records]
    work = Work(inputs, formats, list(ions), dict(models), batch_size, max_sites)
    with part.open("a" if found else "w") as fh:
        if not found:
            _append(fh, [{"_header": header}])
        stream = engine.tier1(work, todo) if todo else iter(())
        tier1 = _tier1(fh, records, stream, len(todo), progress)
        kept = {k: records[k] for k in selected if k in records}
        tier2 = _tier2(fh, records, kept, work, engine, rescore, progress)
        seconds = time.perf_counter() - t0
        done = {"n_selected": len(selected), "n_new": len(todo), "seconds": round(seconds, 3),
                "tier1": tier1, "tier2": tier2}  # fmt: skip
        _append(fh, [{"_done": done}])
    extra = {
        "shard": header["shard"], "ions": list(ions), "models": header["models"],
        "seconds": round(seconds, 3), "n_new": len(todo), "workers": engine.workers,
        "structures_per_second": round(len(todo) / seconds, 1) if seconds > 0 else None,
        "tiers": {"tier1": tier1, "tier2": tier2}, "engine": engine.report(),
    }  # fmt: skip
    return write_outputs(kept, ions, out_csv, summary_json, threshold, extra, header["backbones"])


# =============================================================================== merge
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
        out[tier] = _rate(n, sum(t["seconds"] for t in found))
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


# =============================================================================== report
def report_lines(summary: Mapping[str, Any], threshold: float) -> list[str]:
    """What ``voltage screen`` / ``screen-merge`` print: per ion counts (saying which figures are
    tier-1 estimates) and both tiers' throughputs."""
    lines = []
    for ion, s in summary["per_ion"].items():
        share = 100 * (s["share_above"] or 0.0)
        line = f"{ion}: {s['n_above']} of {s['n']} above {threshold} V ({share:.1f}%)"
        if s.get("two_tier"):
            est = s["n_above_tier1_estimate"]
            line += (f" [champion serves {s['backbone']}: {s['n_tier2']} re-scored by it, "
                     f"{est} above are tier-1 CGCNN estimates]")  # fmt: skip
        lines.append(line)
    for name, what in (("tier1", "CGCNN fast path"), ("tier2", "champions as served")):
        t = (summary.get("tiers") or {}).get(name) or {}
        rate = t.get("structures_per_second")
        shown = f"{rate} structures/s" if rate else "n/a"
        ions = f": {', '.join(t['ions'])}" if t.get("ions") else ""
        lines.append(f"{name.replace('tier', 'tier ')} ({what}{ions}): {t.get('structures', 0)} "
                     f"structures in {t.get('seconds', 0)} s, {shown}")  # fmt: skip
    return lines + worker_lines(summary)


def worker_lines(summary: Mapping[str, Any]) -> list[str]:
    """Per-worker throughput of an engine that reports it (Ray: one line per actor and tier),
    so a slow node or a starved actor shows up in the command's output."""
    per_worker = (summary.get("engine") or {}).get("per_worker") or {}
    lines = []
    for tier, workers in per_worker.items():
        for w in workers:
            rate = w.get("structures_per_second")
            lines.append(f"{tier.replace('tier', 'tier ')} worker {w['worker']}: "
                         f"{w['structures']} structures in {w['batches']} batches, "
                         f"{w['busy_seconds']} s busy, "
                         f"{f'{rate} structures/s' if rate else 'n/a'} "
                         f"(models loaded in {w['load_seconds']} s)")  # fmt: skip
    return lines
