"""Copy each ion's registry champion into the BentoML model store, for ``bentoml build``.

Why: a built Bento must serve with no registry reachable, and BentoML packs only models from its
own store that the service declares as class attributes (``serving/service.py``). Each export is
one BentoML model ``electrode-voltage-<ion>`` holding the checkpoint file plus, as metadata, the
registry name, version, run id and test MAE, so ``/models`` of a Bento still says which registry
version it serves. Exporting the same version twice is a no-op.

    voltage-serve export-models            # every ion of params.yaml with a champion
    bentoml build                          # bentofile.yaml at the repository root
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from serving.models import BENTO_CHECKPOINT, bento_model_name
from serving.watcher import PackagedModel
from voltage_model.registry import champion_version, download_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Exported:
    ion: str
    tag: str
    registry_name: str
    registry_version: int
    created: bool


def packaged_tags(prefix: str) -> dict[str, str]:
    """ion -> ``<name>:latest`` for every exported model of ``prefix`` in the BentoML store."""
    import bentoml

    found: dict[str, str] = {}
    start = f"{prefix}-".lower()
    for model in bentoml.models.list():
        ion = model.info.labels.get("ion")
        if model.tag.name.startswith(start) and ion:
            found[str(ion)] = f"{model.tag.name}:latest"
    return found


def packaged_model(tag: Any) -> tuple[str, PackagedModel] | None:
    """(ion, PackagedModel) for a BentoML model tag, or None if absent / not one of ours."""
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        model = bentoml.models.get(tag)
    except NotFound:
        return None
    ion = model.info.labels.get("ion")
    if not ion:
        return None
    return str(ion), PackagedModel(Path(model.path), dict(model.info.metadata))


def _existing(name: str, registry_version: int, run_id: str | None) -> str | None:
    import bentoml
    from bentoml.exceptions import NotFound

    try:
        models = bentoml.models.list(name)
    except NotFound:
        return None
    for model in models:
        meta = model.info.metadata
        if meta.get("registry_version") == registry_version and meta.get("run_id") == run_id:
            return str(model.tag)
    return None


def export_ion(ion: str, tracking_uri: str, prefix: str) -> Exported | None:
    """Export ``ion``'s champion; None (logged) when it has none."""
    import bentoml

    from voltage_model.naming import model_name
    from voltage_model.predict import VoltageModel

    name = model_name(prefix, ion)
    version = champion_version(tracking_uri, name)
    if version is None:
        logger.warning("%s has no champion: not exported", name)
        return None
    bento_name = bento_model_name(prefix, ion)
    existing = _existing(bento_name, version.version, version.run_id)
    if existing is not None:
        return Exported(ion, existing, name, version.version, created=False)
    tmp = Path(tempfile.mkdtemp(prefix="voltage-export-"))
    try:
        ckpt = download_checkpoint(tracking_uri, version, tmp)
        model = VoltageModel.from_checkpoint(ckpt)  # refuse to package what cannot load
        test_mae = version.test_mae if version.test_mae is not None else model.info.get("test_mae")
        metadata = {
            "ion": ion,
            "registry_name": name,
            "registry_version": version.version,
            "run_id": version.run_id,
            "test_mae": float(test_mae) if test_mae is not None else None,
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        labels = {"ion": ion, "registry_version": str(version.version)}
        with bentoml.models.create(bento_name, labels=labels, metadata=metadata) as bm:
            shutil.copyfile(ckpt, bm.path_of(BENTO_CHECKPOINT))
        tag = str(bm.tag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported %s v%d as BentoML model %s", name, version.version, tag)
    return Exported(ion, tag, name, version.version, created=True)


def export_models(ions: Iterable[str], tracking_uri: str, prefix: str) -> list[Exported]:
    return [e for ion in ions if (e := export_ion(ion, tracking_uri, prefix)) is not None]
