"""Where the service finds an ion's local-voltage head for ``explain``.

Why two places: the ``interpret`` stage writes a sidecar (``models/local_voltage/<Ion>.json``) for
the pipeline's newest model, and also logs it to MLflow in a run ``interpret-<Ion>`` tagged
``model_run_id`` = the run of the model it explains. A champion is not always the newest model
(the promotion gate can keep an older version), so the sidecar alone would leave that champion
unexplained; the run lookup finds the head fitted on the champion's own backbones wherever the
registry is, so ``explain`` follows the alias. Every head is checked against the served backbones'
fingerprint before use: a head fitted on other weights is refused, never misapplied.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.models import ServedModel
    from voltage_model.local_voltage import LocalVoltageHead

#: At most this many interpret runs of one model run are tried, newest first.
MAX_RUNS = 5


def sidecar_head(folder: Path | None, served: ServedModel) -> LocalVoltageHead:
    """The sidecar head of the served ion, checked against its backbones."""
    from voltage_model.local_voltage import LocalVoltageHead

    path = folder / f"{served.ion}.json" if folder is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no local-voltage head file for {served.ion}")
    head = LocalVoltageHead.load(path)
    head.check_matches(served.model.loaded)
    return head


def registry_head(tracking_uri: str, served: ServedModel) -> LocalVoltageHead:
    """The head an ``interpret`` run logged for the served version's own training run."""
    if served.source != "registry" or not served.run_id:  # before importing MLflow (seconds)
        raise LookupError(f"{served.ion} v{served.version} has no training run to look up")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from voltage_model.local_voltage import LocalVoltageHead, mlflow_artifact_paths
    from voltage_model.registry import sqlite_path

    store = sqlite_path(tracking_uri)
    if store is not None and not store.is_file():  # MLflow would create an empty store there
        raise LookupError(f"no tracking store at {store}")
    client = MlflowClient(tracking_uri)
    experiment = client.get_run(served.run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        f"tags.model_run_id = '{served.run_id}' and tags.stage = 'interpret'",
        order_by=["attributes.start_time DESC"],
        max_results=MAX_RUNS,
    )
    reasons = []
    for run in runs:
        for artifact in mlflow_artifact_paths(served.ion):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    path = client.download_artifacts(run.info.run_id, artifact, tmp)
                    head = LocalVoltageHead.load(Path(path))
                    head.check_matches(served.model.loaded)
                    return head
                except (OSError, ValueError, MlflowException) as exc:
                    reasons.append(f"run {run.info.run_id} {artifact}: {exc}")
    detail = "; ".join(reasons) or "no interpret run logged one"
    raise LookupError(f"no local-voltage head for {served.ion} v{served.version} ({detail})")


def find_head(
    folder: Path | None, tracking_uri: str | None, served: ServedModel
) -> LocalVoltageHead:
    """The sidecar if it fits the served backbones, else the registry's; raises with both
    reasons when neither does."""
    try:
        return sidecar_head(folder, served)
    except (OSError, ValueError) as sidecar_exc:
        if tracking_uri is None:
            raise
        try:
            return registry_head(tracking_uri, served)
        except Exception as exc:  # an unreachable registry must not fail the prediction
            raise LookupError(f"{sidecar_exc}; registry: {exc}") from exc
