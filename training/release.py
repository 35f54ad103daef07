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

Reading a release (``load_release``, ``read_release_file``, ``verify_release``, and the
recomputation of the factors) is ``voltage_model/release.py``, the part the service needs.
The file layout and how loading recomputes the factors are described there, in one place.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from voltage_model.predict import VoltageModel
from voltage_model.release import (
    MANIFEST_NAME,
    RELEASE_FORMAT,
    RELEASE_VERSION,
    ReleaseError,
    _copy_payload,
    _expand_x,
    _fingerprint,
    _gp_slots,
    _standardised,
    gp_cholesky,
    read_release_file,
    sha256_bytes,
    sha256_file,
    shared_sqdists,
)

if TYPE_CHECKING:
    from pymatgen.core import Structure

log = logging.getLogger(__name__)

CARD_NAME = "MODEL_CARD.md"
#: Largest |L_recomputed - L_stored| / max|L_stored| accepted when dropping a Cholesky factor.
CHOL_RTOL = 1e-9
#: Largest |difference| (V) in voltage or std between a release model and its source artifact.
CHECK_TOL_V = 1e-6
#: Crystals of each ion's test split the writer predicts with both models.
DEFAULT_CHECK_N = 16

_GP_DROPPED = ("x_train", "chol")


class ReleaseTooLarge(ReleaseError):
    """The release would exceed its size limit (nothing was replaced)."""


# ------------------------------------------------------------------------------ GP posterior
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


# ------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class ReleaseInputs:
    """Where the writer reads models, reports and check crystals."""

    models_dir: Path = Path("models/ions")
    reports_dir: Path = Path("reports")
    records: Path | None = Path("data/clean/records.jsonl.gz")
    splits: Path | None = Path("data/splits.json")
    root: Path = Path(".")


#: The check's tolerance (V) when GP training inputs are rounded to float32.
ROUNDED_TOL_V = 1e-4


@dataclass(frozen=True)
class ReleaseOptions:
    """How a release is written and checked (``voltage release``'s options).

    ``float32_inputs``: True rounds the GP heads' training inputs float32 cannot hold exactly
    (smaller), False never does, None writes exact and falls back to rounded only when exact is
    over ``max_bytes`` (``release``). ``tol`` None: 1e-6 V exact, 1e-4 V rounded."""

    name_prefix: str = "electrode-voltage"
    check_n: int = DEFAULT_CHECK_N
    tol: float | None = None
    max_bytes: int | None = None
    float32_inputs: bool | None = False

    def tolerance(self, rounded: bool) -> float:
        """The largest difference (V) the check accepts for this form."""
        if self.tol is not None:
            return self.tol
        return ROUNDED_TOL_V if rounded else CHECK_TOL_V


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
    from voltage_model.graphs.encoding import encoding_table

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


def release(
    ions: Sequence[str], out_dir: Path, inputs: ReleaseInputs, options: ReleaseOptions
) -> dict[str, Any]:
    """``write_release``, falling back to rounded inputs when exact is over the size limit and
    the form was left open (``float32_inputs`` None); returns the manifest."""
    try:
        return write_release(ions, out_dir, inputs, options)
    except ReleaseTooLarge as exc:
        if options.float32_inputs is not None:
            raise
        log.warning("%s; writing it again with --float32-inputs", exc)
        return write_release(ions, out_dir, inputs, replace(options, float32_inputs=True))


def write_release(
    ions: Sequence[str], out_dir: Path, inputs: ReleaseInputs = ReleaseInputs(),
    options: ReleaseOptions = ReleaseOptions(), now: datetime | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Write ``out_dir`` (replaced whole, only once every ion's file is written and checked);
    returns the manifest. Raises ReleaseError when a model is missing, does not round-trip, or
    the files add up to more than ``options.max_bytes``. Rounded inputs only when
    ``options.float32_inputs`` is True (None is exact here; ``release`` decides the fallback)."""
    from training.tracking import dataset_version, git_commit

    rounded = bool(options.float32_inputs)
    tol = options.tolerance(rounded)
    out_dir = Path(out_dir)
    stage = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    now = now or datetime.now(UTC)
    try:
        models = {ion: _release_model(ion, stage, inputs, options) for ion in ions}
        data_hash = dataset_version(inputs.root, ("data/clean/records.jsonl.gz",))
        manifest = {
            "format": RELEASE_FORMAT, "release_version": RELEASE_VERSION,
            "created": now.isoformat(timespec="seconds"), "git_commit": git_commit(inputs.root),
            "data": {"data/clean/records.jsonl.gz": data_hash.get("data/clean/records.jsonl.gz",
                                                                  "unknown")},
            "total_bytes": sum(m["bytes"] for m in models.values()),
            "check_tolerance_v": tol, "float32_inputs": rounded, "models": models,
        }  # fmt: skip
        max_bytes = options.max_bytes
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


def _release_model(
    ion: str, stage: Path, inputs: ReleaseInputs, options: ReleaseOptions
) -> dict[str, Any]:
    """One ion's release file written into ``stage``, checked against its source artifact on
    test crystals; returns its manifest entry."""
    from voltage_model.artifact import load_checkpoint

    rounded = bool(options.float32_inputs)
    tol = options.tolerance(rounded)
    src = inputs.models_dir / f"{ion}.pt"
    if not src.is_file():
        raise ReleaseError(f"no served model for {ion} at {src} (run the pipeline first)")
    data = src.read_bytes()
    sha = sha256_bytes(data)
    payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    release_payload, heads = _release_payload(ion, payload, src, sha, rounded)
    path = stage / f"{ion}.pt"
    torch.save(release_payload, path)
    entry_sha = sha256_file(path)
    released = read_release_file(path, entry_sha)
    check = compare_models(VoltageModel(load_checkpoint(src)), released,
                           _check_structures(inputs, ion, options.check_n))  # fmt: skip
    check = _as_model_check(check, src, ion)
    if check["n"] and max(check["max_abs_voltage_diff"], check["max_abs_std_diff"]) > tol:
        raise ReleaseError(f"{ion}: the release model differs from {src} by "
                           f"{check['max_abs_voltage_diff']:.2e} V (voltage) / "
                           f"{check['max_abs_std_diff']:.2e} V (std) on "
                           f"{check['n']} test crystals (limit {tol:g} V)")  # fmt: skip
    extra = payload.get("extra") or {}
    report_run = _json(inputs.reports_dir / "metrics" / f"ion_{ion}.json").get("run_id")
    name, version = _registry_ref(
        inputs.reports_dir, ion, (report_run, extra.get("mlflow_run_id")), options.name_prefix
    )
    entry = {
        "file": path.name, "sha256": entry_sha, "bytes": path.stat().st_size,
        "name": name, "version": version, "mlflow_run_id": extra.get("mlflow_run_id"),
        # checkpoint_sha256: the registry's tag of the version registered from this file
        "source": {"file": str(src), "sha256": sha, "bytes": len(data),
                   "checkpoint_sha256": sha[:16]},
        "backbone": released.backbone, "gp_heads": heads, "check": check,
        **_metrics(inputs, ion),
    }  # fmt: skip
    log.info("%s: %.1f MB -> %.1f MB, check %s", ion, len(data) / 1e6, entry["bytes"] / 1e6, check)
    return entry


def release_lines(manifest: Mapping[str, Any], out_dir: Path) -> list[str]:
    """What ``voltage release`` prints: each ion's file, size and check, then the total."""
    lines = []
    for ion, m in manifest["models"].items():
        c = m["check"]
        checked = (
            (
                f"{c['n']} test crystals, max |dV| {c['max_abs_voltage_diff']:.1e} V, "
                f"max |dstd| {c['max_abs_std_diff']:.1e} V"
            )
            if c["n"]
            else "not checked"
        )
        lines.append(f"{ion}: {out_dir / m['file']} {m['bytes'] / 1e6:.1f} MB "
                     f"(source {m['source']['bytes'] / 1e6:.1f} MB); {checked}")  # fmt: skip
    lines.append(f"release: {manifest['total_bytes'] / 1e6:.1f} MB in {out_dir} "
                 "(manifest.json, MODEL_CARD.md); dvc add + push the .pt")  # fmt: skip
    return lines


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
