"""The MLflow model registry: one registered model per ion, aliases instead of stages.

The pipeline registers a new version per ion and points alias ``candidate`` at it; a person
promotes by pointing ``champion`` at a version (MLflow UI, or ``voltage promote``). The command
line promotion is gated, and the gate reads the VALIDATION split only: the test split is scored
once per pipeline run and reported (tag ``test_mae``, with ``test_looks`` counting how often it was
scored), never used to decide, or it would stop being an unbiased estimate of the served model.

The gate pairs the two versions' per-crystal validation predictions (an artifact of each version's
training run) and refuses the candidate only when it is worse by more than one paired standard
error, so that noise between two equally good models does not block a promotion and a real
regression does. Versions carry the split's hash so "the same split" is checked, not assumed.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from voltage_model.naming import CANDIDATE, CHAMPION, VersionInfo

VAL_PREDICTIONS_DIR = "validation_predictions"
"""Artifact folder, in the run that logged a version's model, holding one CSV of the served
model's per-crystal validation predictions (columns ``VAL_COLUMNS``). The gate pairs two versions
by it."""
VAL_COLUMNS = ("battery_id", "target", "prediction")

# A crystal's target is written with 4 decimals; two files disagreeing by more than rounding were
# scored against different data, and their errors cannot be paired.
_TARGET_TOL = 1e-3


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def _info(mv: Any) -> VersionInfo:
    return VersionInfo(mv.name, int(mv.version), mv.run_id, dict(mv.tags or {}))


def register(
    model_uri: str, name: str, tags: dict[str, Any], alias: str = CANDIDATE
) -> VersionInfo:
    """Register ``model_uri`` as a new version of ``name``, tag it, point ``alias`` at it."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client = _client()
    client.set_registered_model_alias(name, alias, mv.version)
    return _info(client.get_model_version(name, mv.version))


def by_alias(name: str, alias: str) -> VersionInfo | None:
    from mlflow.exceptions import MlflowException

    try:
        return _info(_client().get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


class PromotionRefused(RuntimeError):
    """The gate said no: the candidate is worse, or not comparable, and ``force`` was not set."""


class NoSuchVersion(LookupError):
    """The model or version to promote does not exist: a typo, not a gate decision, so the command
    line reports it apart from a refusal."""


# ------------------------------------------------------------------------------ validation pairs
Predictions = Mapping[str, tuple[float, float]]
"""battery_id -> (target, prediction) on the validation split."""


def read_val_predictions(path: Path) -> dict[str, tuple[float, float]]:
    """Parse a validation predictions CSV; a malformed file raises ValueError (it cannot be
    paired, and guessing would let a broken artifact decide a promotion)."""
    with Path(path).open(newline="") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != VAL_COLUMNS:
            raise ValueError(f"{path.name}: columns {reader.fieldnames}, expected {VAL_COLUMNS}")
        out: dict[str, tuple[float, float]] = {}
        for row in reader:
            bid = row["battery_id"]
            if bid in out:
                raise ValueError(f"{path.name}: battery_id {bid} appears twice")
            out[bid] = (float(row["target"]), float(row["prediction"]))
    return out


def fetch_val_predictions(info: VersionInfo) -> dict[str, tuple[float, float]] | None:
    """The version's validation predictions from its run's artifacts; None when the run has none
    (versions registered before the gate read validation)."""
    import mlflow

    if not info.run_id:
        return None
    files = [
        a.path
        for a in _client().list_artifacts(info.run_id, VAL_PREDICTIONS_DIR)
        if not a.is_dir and a.path.endswith(".csv")
    ]
    if not files:
        return None
    if len(files) > 1:
        raise ValueError(f"run {info.run_id} has {len(files)} validation CSVs: {files}")
    # no progress bar: the promote command's stderr is one line per outcome
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, quiet):
        local = mlflow.artifacts.download_artifacts(
            run_id=info.run_id, artifact_path=files[0], dst_path=tmp
        )
        return read_val_predictions(Path(local))


@dataclass(frozen=True)
class PairedComparison:
    """Candidate vs champion on the same validation crystals: d_i = |err_cand_i| - |err_champ_i|.

    The paired difference cancels the crystal-to-crystal spread both models share, so its
    standard error is the right yardstick for "worse beyond noise"."""

    n: int
    candidate_mae: float
    champion_mae: float
    mean_diff: float
    se_diff: float

    @property
    def worse_beyond_noise(self) -> bool:
        return self.mean_diff > self.se_diff

    def summary(self) -> str:
        return (
            f"val MAE {self.candidate_mae:.4f} V vs {self.champion_mae:.4f} V, paired difference "
            f"{self.mean_diff:+.4f} ± {self.se_diff:.4f} V (n={self.n})"
        )


def paired_comparison(candidate: Predictions, champion: Predictions) -> PairedComparison:
    """Pair two versions' validation predictions by battery_id. ValueError when they cannot be
    paired: different crystals, different targets for a crystal, or fewer than two crystals (no
    standard error)."""
    only_c, only_p = set(candidate) - set(champion), set(champion) - set(candidate)
    if only_c or only_p:
        raise ValueError(
            f"validated on different crystals ({len(only_c)} only in candidate, e.g. "
            f"{sorted(only_c)[:3]}; {len(only_p)} only in champion, e.g. {sorted(only_p)[:3]})"
        )
    ids = sorted(candidate)
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} validation crystal(s): too few for a standard error")
    bad = [b for b in ids if abs(candidate[b][0] - champion[b][0]) > _TARGET_TOL]
    if bad:
        raise ValueError(
            f"the two versions' validation targets differ for {len(bad)} crystals (e.g. {bad[:3]})"
            "; they were scored against different data"
        )
    err_c = [abs(candidate[b][1] - candidate[b][0]) for b in ids]
    err_p = [abs(champion[b][1] - champion[b][0]) for b in ids]
    d = [c - p for c, p in zip(err_c, err_p, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return PairedComparison(n, sum(err_c) / n, sum(err_p) / n, mean, sd / math.sqrt(n))


def check_gate(candidate: VersionInfo, champion: VersionInfo | None) -> str:
    """Why promotion is allowed; raises PromotionRefused when it is not.

    Decides on the validation split only (see the module docstring): same split hash, both
    versions' validation predictions present and paired crystal by crystal, and the candidate not
    worse than the champion by more than one paired standard error."""
    if champion is None:
        return "no champion yet"
    name = candidate.name
    if champion.version == candidate.version:
        raise PromotionRefused(f"{name} v{candidate.version} is already champion")
    c_split, p_split = candidate.tags.get("split_hash"), champion.tags.get("split_hash")
    if not c_split or c_split != p_split:
        raise PromotionRefused(
            f"{name}: candidate v{candidate.version} and champion v{champion.version} "
            f"were built on different splits ({c_split} vs {p_split}); compare them on one split "
            "or use --force"
        )
    preds = {}
    for role, info in (("candidate", candidate), ("champion", champion)):
        try:
            p = fetch_val_predictions(info)
        except ValueError as exc:
            raise PromotionRefused(
                f"{name}: {role} v{info.version}'s validation predictions are unreadable "
                f"({exc}); use --force"
            ) from None
        if p is None:
            raise PromotionRefused(
                f"{name}: {role} v{info.version} has no validation predictions artifact "
                f"({VAL_PREDICTIONS_DIR}/*.csv in run {info.run_id}); it predates the validation "
                "gate, so the two versions cannot be compared; retrain it, or use --force"
            )
        preds[role] = p
    try:
        comp = paired_comparison(preds["candidate"], preds["champion"])
    except ValueError as exc:
        raise PromotionRefused(
            f"{name}: candidate v{candidate.version} and champion v{champion.version} cannot be "
            f"paired: {exc}; use --force"
        ) from None
    if comp.worse_beyond_noise:
        raise PromotionRefused(
            f"{name}: candidate v{candidate.version} is worse than champion v{champion.version} "
            f"by more than one paired standard error on the validation split: {comp.summary()}"
        )
    return f"{comp.summary()}: not worse than champion v{champion.version} beyond one SE"


def _get_version(client: Any, name: str, version: int) -> VersionInfo:
    """The version, or NoSuchVersion naming what is missing (other registry errors propagate)."""
    from mlflow.exceptions import MlflowException

    try:
        return _info(client.get_model_version(name, str(version)))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise NoSuchVersion(f"no registered model {name} (asked for v{version})") from None
    raise NoSuchVersion(f"{name} has no version {version}")


def promote(name: str, version: int | None = None, force: bool = False) -> tuple[VersionInfo, str]:
    """Point ``champion`` at ``version`` (default: the candidate) if the gate allows it.

    Raises NoSuchVersion when the model, the version or the candidate alias does not exist, and
    PromotionRefused when the gate says no."""
    client = _client()
    if version is None:
        cand = by_alias(name, CANDIDATE)
        if cand is None:
            raise NoSuchVersion(f"{name} has no '{CANDIDATE}' version to promote")
    else:
        cand = _get_version(client, name, version)
    champ = by_alias(name, CHAMPION)
    reason = "forced" if force else check_gate(cand, champ)
    client.set_registered_model_alias(name, CHAMPION, cand.version)
    return cand, reason
