"""Stage ``pair_voltage``: the CHGNet physics voltage of every charged/discharged snapshot pair.

Why: ``pair_voltage`` in the snapshot is the DFT voltage of exactly the step between the two
structures, so the physics cross-check (:mod:`voltage_model.models.physics`) can be scored against
it, and against the whole electrode's ``battery_avg_voltage`` (the learned models' target), before
anyone reads the service's ``physics_voltage`` as evidence. Refused pairs (different frameworks, no
insertion, structures CHGNet cannot take) are reported with the reason, never dropped.

Each distinct CIF is parsed once (charged hosts are shared across ions) with the project's
structure reader; energies come in batched forwards. Charged-structure energies are taken from
the ``chgnet_features`` stage's npz (``ids`` = charged ids, last feature column = CHGNet eV/atom)
when it exists and a few recomputed ones agree with it; otherwise they are computed here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pymatgen.core import Structure
from tqdm import tqdm

from training.config import load_params
from training.data.snapshot import PairRow, snapshot_pairs
from voltage_model.models import chgnet_backbone, physics
from voltage_model.structures import StructureInputError, parse_structure

log = logging.getLogger(__name__)

MAX_SITES = 1000  # snapshot cells have at most 174 sites; the service's limit is not the point
CACHE_CHECK = 3  # cached charged energies recomputed before the cache is trusted
CACHE_TOL = 1e-4  # eV/atom: batch composition moves CHGNet energies by ~1e-6 at most
CHUNK = chgnet_backbone.BATCH_SIZE * 4  # structures graphed per progress step
CSV_FIELDS = (
    "battery_id", "ion", "charged_id", "discharged_id", "framework", "dx", "pair_voltage",
    "battery_avg_voltage", "physics_voltage", "reason", "error",
)  # fmt: skip
NOTE = (
    "CHGNet 0.3.0 energies of the snapshot structures as given (not relaxed) and of each relaxed "
    "metal; CHGNet was trained on MP relaxations that very likely include these structures."
)


@dataclass
class PairOutcome:
    """One row of the report: the pair, its DFT voltages and the physics voltage or refusal."""

    battery_id: str
    ion: str
    charged_id: str
    discharged_id: str
    pair_voltage: float | None
    battery_avg_voltage: float | None
    framework: str = ""
    dx: float | None = None
    physics_voltage: float | None = None
    reason: str = ""
    error: str = ""

    def refuse(self, reason: str, error: str) -> None:
        self.reason, self.error = reason, error


def _number(text: str | None) -> float | None:
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _outcome(pair: PairRow) -> PairOutcome:
    f = pair.fields
    out = PairOutcome(f.get("battery_id", ""), f.get("working_ion", ""), f.get("charged_id", ""),
                      f.get("discharged_id", ""), _number(f.get("pair_voltage")),
                      _number(f.get("battery_avg_voltage")))  # fmt: skip
    if pair.error:
        out.refuse("missing_structure", pair.error)
    return out


def sample_pairs(pairs: list[PairRow], n: int | None, seed: int) -> list[PairRow]:
    """``n`` pairs drawn at random (seeded, in snapshot order), or all of them."""
    if n is None or n >= len(pairs):
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def _parse_all(
    pairs: Sequence[PairRow], progress: bool
) -> tuple[dict[str, Structure], dict[str, str]]:
    """Each distinct CIF path parsed once: (path -> structure, path -> error)."""
    texts: dict[str, str] = {}
    for p in pairs:
        if p.error is None:
            texts[p.fields["charged_cif"].strip()] = p.charged_cif or ""
            texts[p.fields["discharged_cif"].strip()] = p.discharged_cif or ""
    parsed: dict[str, Structure] = {}
    errors: dict[str, str] = {}
    for path, text in tqdm(texts.items(), desc="parse CIFs", disable=not progress):
        try:
            parsed[path] = parse_structure(text, "cif", max_sites=MAX_SITES)
        except StructureInputError as exc:
            errors[path] = f"{path}: {exc}"
    return parsed, errors


def _ends(pair: PairRow) -> tuple[str, str]:
    return pair.fields["charged_cif"].strip(), pair.fields["discharged_cif"].strip()


def _check_pairs(
    pairs: Sequence[PairRow], outcomes: Sequence[PairOutcome], parsed: dict[str, Structure],
    errors: dict[str, str],
) -> None:  # fmt: skip
    """Refuse what needs no energy: unparsable ends, different frameworks, no insertion."""
    for pair, out in zip(pairs, outcomes, strict=True):
        if out.reason:
            continue
        bad = [errors[e] for e in _ends(pair) if e in errors]
        if bad:
            out.refuse("parse", "; ".join(bad))
            continue
        charged, discharged = (parsed[e].composition for e in _ends(pair))
        try:
            fc, fd = physics.match_frameworks(charged, discharged, out.ion)
        except physics.PhysicsError as exc:
            out.refuse(exc.reason, str(exc))
            continue
        out.framework, out.dx = fc.formula, fd.x - fc.x


def _compute_energies(
    structures: dict[str, Structure], progress: bool
) -> tuple[dict[str, float], dict[str, str]]:
    """CHGNet energy per atom of each structure, in batched forwards: (energies, errors)."""
    energies: dict[str, float] = {}
    errors: dict[str, str] = {}
    keys = list(structures)
    with tqdm(total=len(keys), desc="CHGNet energies", disable=not progress) as bar:
        for start in range(0, len(keys), CHUNK):
            graphs, where = [], []
            for key in keys[start : start + CHUNK]:
                try:
                    graphs.append(physics.to_graph(structures[key], key))
                    where.append(key)
                except physics.PhysicsError as exc:
                    errors[key] = str(exc)
            energies.update(zip(where, physics.graph_energies(graphs).tolist(), strict=True))
            bar.update(len(keys[start : start + CHUNK]))
    return energies, errors


def _read_cache(path: Path | None) -> tuple[dict[str, float], str]:
    """charged id -> cached CHGNet energy per atom (finite rows only), and what happened."""
    if path is None or not path.is_file():
        return {}, f"no features file at {path}" if path is not None else "no features file given"
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, feats = data["ids"], np.asarray(data["features"], dtype=np.float64)
            spec = json.loads(str(data["spec"])) if "spec" in data else None
        if spec is not None:
            chgnet_backbone.check_spec(spec, str(path))
    except chgnet_backbone.ChgnetMismatch as exc:
        return {}, f"not used: {exc}"
    except (OSError, KeyError, ValueError) as exc:
        return {}, f"features file {path} unreadable ({exc}); energies computed"
    if feats.ndim != 2 or feats.shape != (len(ids), chgnet_backbone.FEATURE_DIM):
        return {}, f"features file {path} has shape {feats.shape}; energies computed"
    energy = feats[:, -1]
    return {str(i): float(e) for i, e in zip(ids, energy, strict=True) if np.isfinite(e)}, "read"


def _cached_energies(
    pairs: Sequence[PairRow], structures: dict[str, Structure], cache_path: Path | None
) -> tuple[dict[str, float], str]:
    """Energies of charged structures taken from the features cache, once a few agree."""
    cache, status = _read_cache(cache_path)
    by_path = {_ends(p)[0]: cache[p.fields["charged_id"]] for p in pairs
               if p.error is None and p.fields.get("charged_id") in cache}  # fmt: skip
    by_path = {k: v for k, v in by_path.items() if k in structures}
    if not by_path:
        return {}, status if not cache else "no needed charged structure in the features file"
    probe = list(by_path)[:CACHE_CHECK]
    fresh, _ = _compute_energies({k: structures[k] for k in probe}, progress=False)
    worst = max((abs(fresh[k] - by_path[k]) for k in fresh), default=math.inf)
    if worst > CACHE_TOL:
        log.warning("features cache %s disagrees with CHGNet by %.2g eV/atom: not used",
                    cache_path, worst)  # fmt: skip
        return {}, f"not used: differs from a fresh CHGNet energy by {worst:.3g} eV/atom"
    return by_path, f"used for {len(by_path)} charged structures (checked on {len(probe)})"


def _score(
    pairs: Sequence[PairRow], outcomes: Sequence[PairOutcome], parsed: dict[str, Structure],
    energies: dict[str, float], energy_errors: dict[str, str], metals: dict[str, float],
) -> None:  # fmt: skip
    for pair, out in zip(pairs, outcomes, strict=True):
        if out.reason:
            continue
        ends = _ends(pair)
        bad = [energy_errors[e] for e in ends if e in energy_errors]
        if bad:
            out.refuse("graph", "; ".join(bad))
            continue
        if out.ion not in metals:
            out.refuse("no_metal", f"no metal reference for {out.ion}")
            continue
        try:
            res = physics.voltage_from_energies(parsed[ends[0]].composition, energies[ends[0]],
                                                parsed[ends[1]].composition, energies[ends[1]],
                                                out.ion, metals[out.ion])  # fmt: skip
        except physics.PhysicsError as exc:
            out.refuse(exc.reason, str(exc))
            continue
        out.physics_voltage = res.voltage


def _mae(
    rows: Iterable[PairOutcome], target: Callable[[PairOutcome], float | None]
) -> float | None:
    errs = [abs(r.physics_voltage - t) for r in rows
            if r.physics_voltage is not None and (t := target(r)) is not None]  # fmt: skip
    return round(float(np.mean(errs)), 4) if errs else None


def summarise(rows: Sequence[PairOutcome]) -> dict[str, Any]:
    """Counts, refusals by reason and MAE against both DFT voltages, for a group of rows."""
    scored = [r for r in rows if r.physics_voltage is not None]
    errs = [abs(r.physics_voltage - r.pair_voltage) for r in scored if r.pair_voltage is not None]
    return {
        "n": len(rows),
        "n_scored": len(scored),
        "n_refused": len(rows) - len(scored),
        "refused_by_reason": dict(sorted(Counter(r.reason for r in rows if r.reason).items())),
        "mae_vs_pair_voltage": _mae(scored, lambda r: r.pair_voltage),
        "mae_vs_battery_avg_voltage": _mae(scored, lambda r: r.battery_avg_voltage),
        "median_abs_error_vs_pair_voltage": round(float(np.median(errs)), 4) if errs else None,
    }


def write_csv(path: Path, rows: Sequence[PairOutcome]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            row = asdict(r)
            for key in ("dx", "physics_voltage"):
                row[key] = "" if row[key] is None else round(row[key], 6)
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})


class _Clock:
    """Wall seconds per step of the stage (the report says where the time goes)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.steps[step] = round(now - self.last, 1)
        self.last = now


def _all_energies(
    pairs: Sequence[PairRow], needed: dict[str, Structure], features: Path | None,
    progress: bool,
) -> tuple[dict[str, float], dict[str, str], dict[str, Any]]:  # fmt: skip
    """Energies of every needed structure (charged ones from the cache where it is trusted)."""
    cached, cache_status = _cached_energies(pairs, needed, features)
    todo = {k: s for k, s in needed.items() if k not in cached}
    computed, errors = _compute_energies(todo, progress)
    info = {"structures_computed": len(computed), "charged_energies_from_cache": len(cached),
            "features_cache": cache_status}  # fmt: skip
    return {**cached, **computed}, errors, info


def _report(
    outcomes: Sequence[PairOutcome], ions: list[str], sample: int | None, clock: _Clock,
    metals: dict[str, float], energy_info: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    seconds = time.perf_counter() - clock.start
    chgnet = {"package": chgnet_backbone.package_version(), "model": chgnet_backbone.MODEL_VERSION}
    return {
        "n_pairs": len(outcomes),
        "sample": sample,
        "seconds": round(seconds, 1),
        "seconds_per_pair": round(seconds / max(len(outcomes), 1), 4),
        "seconds_by_step": clock.steps,
        **energy_info,
        "chgnet": chgnet,
        "metal_energy_eV_per_atom": {k: round(v, 6) for k, v in metals.items()},
        "overall": summarise(outcomes),
        "per_ion": {ion: summarise([o for o in outcomes if o.ion == ion]) for ion in ions},
        "note": NOTE,
    }


@dataclass(frozen=True)
class PairVoltagePaths:
    """The stage's outputs (per-pair CSV, summary JSON) and the optional CHGNet features file
    whose charged-structure energies may be reused."""

    out_csv: Path
    out_json: Path
    features: Path | None = None


def run_pair_voltage(
    snapshot_dir: Path, ions: list[str], paths: PairVoltagePaths, sample: int | None = None,
    seed: int = 0, progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """The whole stage: read, check, compute energies, score, write CSV and JSON."""
    clock = _Clock()
    pairs = sample_pairs(snapshot_pairs(snapshot_dir, ions), sample, seed)
    outcomes = [_outcome(p) for p in pairs]
    clock.lap("read")
    parsed, parse_errors = _parse_all(pairs, progress)
    _check_pairs(pairs, outcomes, parsed, parse_errors)
    clock.lap("parse")
    needed = {e: parsed[e] for p, o in zip(pairs, outcomes, strict=True) if not o.reason
              for e in _ends(p)}  # fmt: skip
    energies, energy_errors, energy_info = _all_energies(pairs, needed, paths.features, progress)
    clock.lap("energies")
    metals = physics.metal_energies(sorted({o.ion for o in outcomes if not o.reason}))
    clock.lap("metals")
    _score(pairs, outcomes, parsed, energies, energy_errors, metals)
    write_csv(paths.out_csv, outcomes)
    report = _report(outcomes, ions, sample, clock, metals, energy_info)
    paths.out_json.parent.mkdir(parents=True, exist_ok=True)
    paths.out_json.write_text(json.dumps(report, indent=2) + "\n")
    return report


@dataclass(frozen=True)
class Options:
    out: Path
    summary: Path
    features: Path | None = None
    snapshot_dir: Path | None = None
    sample: int | None = None
    seed: int = 0
    progress: bool = True
    params: Path = Path("params.yaml")


def run(opts: Options) -> dict[str, Any]:
    p = load_params(opts.params)
    paths = PairVoltagePaths(opts.out, opts.summary, opts.features)
    return run_pair_voltage(
        opts.snapshot_dir or p.data.snapshot_dir, p.ion_names, paths, opts.sample, opts.seed,
        opts.progress,
    )  # fmt: skip
