"""Target normaliser: the network regresses (y - mean) / std, fitted on training targets only.

Fitting on the training split alone keeps validation/test statistics out of the model; the two
floats travel inside the checkpoint so serving de-normalises exactly as training did.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

_MIN_STD = 1e-8


@dataclass(frozen=True)
class Normalizer:
    """Affine target scaling y_norm = (y - mean) / std."""

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(f"invalid normaliser mean={self.mean!r} std={self.std!r}")

    @classmethod
    def fit(cls, targets: Iterable[float] | np.ndarray | torch.Tensor) -> Normalizer:
        """Fit on training targets; a constant target gets std 1 (avoids division by ~0)."""
        if isinstance(targets, torch.Tensor):
            values = targets.detach().cpu().double().numpy().ravel()
        else:
            values = np.asarray(
                list(targets) if not isinstance(targets, np.ndarray) else targets, dtype=np.float64
            ).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError("cannot fit a normaliser on zero finite targets")
        std = float(values.std())
        return cls(mean=float(values.mean()), std=std if std > _MIN_STD else 1.0)

    def norm(self, y: ArrayT) -> ArrayT:
        return (y - self.mean) / self.std

    def denorm(self, y: ArrayT) -> ArrayT:
        return y * self.std + self.mean

    def to_dict(self) -> dict[str, float]:
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        return cls(mean=float(data["mean"]), std=float(data["std"]))
