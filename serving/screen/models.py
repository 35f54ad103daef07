"""The models of a screen: registry champions (weights only, as the service reads them), checkpoint
files, and the hash that says two runs used the same model (``resume``, Ray actors)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from voltage_model.predict import VoltageModel


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
