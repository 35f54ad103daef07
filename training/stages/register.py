"""Register each ion's model in the MLflow registry (alias ``candidate``), when it changed.

A version is "changed" when its checkpoint's content hash differs from the newest registered
version's. On the first run (no champion yet) the candidate is promoted automatically when
``registry.auto_promote_first`` is set; after that, promotion is a person's decision (MLflow UI,
or ``voltage promote`` with its validation gate). A receipt of what was registered is written for
DVC.

Each version carries ``test_mae`` as a reported number only, and ``test_looks``: how many
``ion_model`` runs of the ion have scored the test split so far. The test estimate is unbiased only
if nothing was chosen by it; counting the looks makes repeated peeking visible instead of silent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.config import UsageError, load_params
from training.registry import by_alias, promote, register
from training.tracking import git_commit
from voltage_model.naming import CANDIDATE, CHAMPION, model_name


def file_hash(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def latest_version(name: str) -> Any | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def count_test_looks(ion: str, experiment_id: str) -> int:
    """The ``ion_model`` runs of ``ion`` in the experiment, deleted and failed ones included: each
    such run scores the test split once, and a deleted run has looked all the same."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client, token, n = MlflowClient(), None, 0
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.stage = 'ion_model' and tags.ion = '{ion}'",
            run_view_type=ViewType.ALL,
            max_results=1000,
            page_token=token,
        )
        n += len(page)
        token = page.token
        if not token:
            return n


@dataclass(frozen=True)
class RegisterContext:
    """What every ion's registration shares, built once per run: the registry name prefix, the
    cleaned records' dataset hash, whether a first candidate is promoted automatically
    (``registry.auto_promote_first``) and the experiment whose ``ion_model`` runs are counted as
    test looks."""

    prefix: str
    data_hash: str
    auto_promote_first: bool
    experiment_id: str


def require_logged_model(ion: str, report: dict[str, Any]) -> None:
    """The model the ion's report points at must be in this tracking store. It is not when the
    checkpoint and reports came from another machine (``dvc pull``) while MLflow is local: say so
    and how to fix it, instead of MLflow's "Logged model ... not found" traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = str(report.get("model_uri", ""))
    if not uri.startswith("models:/m-"):
        return  # a runs:/ URI or a registered-model URI: MLflow's own message is clear enough
    try:
        mlflow.get_logged_model(uri.removeprefix("models:/"))
    except MlflowException:
        raise UsageError(
            f"{ion}: its model {uri} (run {report.get('run_id')}) is not in the MLflow store at "
            f"{mlflow.get_tracking_uri()}: the checkpoint and reports were made against another "
            f"store (pulled with DVC?). Rerun it here (dvc repro -f -s ion_model@{ion}), or point "
            "MLFLOW_TRACKING_URI at the store that logged it."
        ) from None


def register_ion(
    ion: str, report: dict[str, Any], checkpoint: Path, split_hash: str, ctx: RegisterContext
) -> dict[str, Any]:
    """Register ``ion``'s model if its checkpoint changed, tagged with what a reviewer needs
    (reported test MAE and its look count, hashes, commit); the gate itself reads none of these
    numbers, only the split hash and the run's validation predictions."""
    name = model_name(ctx.prefix, ion)
    ckpt_hash = file_hash(checkpoint)
    latest = latest_version(name)
    if latest is not None and (latest.tags or {}).get("checkpoint_sha256") == ckpt_hash:
        version, registered = int(latest.version), False
    else:
        baselines = {
            f"baseline_{b}_mae": round(report["methods"][b]["test_mae_mean"], 4)
            for b in ("mean", "svr", "krr", "rf")
            if b in report["methods"]
        }
        tags = {
            "ion": ion, "test_mae": round(report["test_mae"], 4),
            "test_looks": count_test_looks(ion, ctx.experiment_id), "split_hash": split_hash,
            "dataset_hash": ctx.data_hash, "git_commit": git_commit(),
            "checkpoint_sha256": ckpt_hash,
            "bn_mode": report.get("bn_mode", "n/a"), "head": report.get("head", "n/a"),
            **baselines,
        }  # fmt: skip
        require_logged_model(ion, report)
        version, registered = register(report["model_uri"], name, tags, CANDIDATE).version, True
    promoted = None
    if ctx.auto_promote_first and by_alias(name, CHAMPION) is None:
        promoted = promote(name, version, force=True)[0].version
    champ = by_alias(name, CHAMPION)
    return {
        "name": name, "version": version, "registered_now": registered,
        "run_id": report["run_id"], "test_mae": report["test_mae"],
        "auto_promoted": promoted, "champion": champ.version if champ else None,
    }  # fmt: skip


@dataclass(frozen=True)
class Options:
    metrics_dir: Path
    models_dir: Path
    splits: Path
    receipt: Path
    params: Path = Path("params.yaml")


def run(opts: Options, on_ion: Callable[[dict[str, Any]], None] = lambda _: None) -> dict:
    """Register every ion's changed model; ``on_ion`` sees each ion's receipt as it is made."""
    import json

    from training.data.split import load_splits
    from training.tracking import dataset_version, setup_mlflow

    p = load_params(opts.params)
    mls = p.mlflow
    experiment_id = setup_mlflow(mls)  # where the ion_model runs (the test looks) are counted
    split_ids = load_splits(opts.splits)
    data_hash = dataset_version(Path("."), ("data/clean/records.jsonl.gz",)).get(
        "data/clean/records.jsonl.gz", "unknown"
    )
    ctx = RegisterContext(
        mls.model_name_prefix, data_hash, p.registry.auto_promote_first, experiment_id
    )
    out = {}
    for ion in p.ion_names:
        report = json.loads((opts.metrics_dir / f"ion_{ion}.json").read_text())
        test_ids = "\n".join(sorted(split_ids[ion]["test"]))
        split_hash = hashlib.sha256(test_ids.encode()).hexdigest()[:16]
        out[ion] = register_ion(ion, report, opts.models_dir / f"{ion}.pt", split_hash, ctx)
        on_ion(out[ion])
    opts.receipt.parent.mkdir(parents=True, exist_ok=True)
    opts.receipt.write_text(json.dumps(out, indent=2) + "\n")
    return out
