"""CHGNet features by host id: the ``chgnet_features`` stage's output and how to read it.

Output (``.npz``): ``ids`` (charged_id, str), ``features`` (n, FEATURE_DIM) float64 (NaN rows
where CHGNet could not graph a structure), ``spec`` (JSON of ``chgnet_backbone.spec()``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.config import UsageError
from voltage_model.models import chgnet_backbone


@dataclass(frozen=True)
class ChgnetFeatures:
    """Features by host id, with the CHGNet that computed them."""

    ids: np.ndarray
    features: np.ndarray
    spec: dict[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_row", {h: i for i, h in enumerate(self.ids.tolist())})

    def rows(self, hosts: list[str]) -> np.ndarray:
        """Features of ``hosts`` in order; a host without features is an error naming it."""
        index = self._row  # type: ignore[attr-defined]
        missing = [h for h in hosts if h not in index]
        if missing:
            raise KeyError(f"{len(missing)} hosts lack CHGNet features: {missing[:3]}")
        out = self.features[[index[h] for h in hosts]]
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if bad.size:
            raise ValueError(f"CHGNet could not featurise host {hosts[bad[0]]} "
                             f"({bad.size} of {len(hosts)})")  # fmt: skip
        return out

    def valid(self, hosts: list[str]) -> np.ndarray:
        """Mask of ``hosts`` with finite features."""
        index = self._row  # type: ignore[attr-defined]
        return np.array([h in index and bool(np.isfinite(self.features[index[h]]).all())
                         for h in hosts], dtype=bool)  # fmt: skip


def save(path: Path, feats: ChgnetFeatures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, ids=feats.ids.astype(str), features=feats.features,
                        spec=np.array(json.dumps(feats.spec)))  # fmt: skip
    tmp.replace(path)


def load(path: Path, check: bool = True) -> ChgnetFeatures:
    """Read the stage's output; refuse features of another CHGNet than the installed one."""
    with np.load(path, allow_pickle=False) as z:
        feats = ChgnetFeatures(z["ids"].astype(str), z["features"],
                               json.loads(str(z["spec"])))  # fmt: skip
    if check:
        chgnet_backbone.check_spec(feats.spec, str(path))
    return feats


def load_optional(path: Path | None) -> ChgnetFeatures | None:
    """The features of the ``chgnet_features`` stage (None: not given); a missing file is a
    ``UsageError``."""
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"CHGNet features not found: {path} (run the chgnet_features stage)")
    return load(path)
