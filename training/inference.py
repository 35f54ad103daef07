"""Structures in, voltages (with uncertainty) out: one loaded model of one ion.

This is the one place that turns pymatgen structures into predictions. The MLflow pyfunc and the
service's predictor both use it, so they build graphs exactly as training did: the converter is
rebuilt from the checkpoint, never from current settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pymatgen.core import Structure

from training.graphs.converter import CrystalGraph, GraphConverter
from training.graphs.encoding import encoding_fingerprint, encoding_table
from training.graphs.store import collate
from training.model.artifact import CheckpointError, LoadedModel, load_checkpoint


@dataclass(frozen=True)
class Prediction:
    voltage: float
    uncertainty: float
    unseen_elements: tuple[str, ...] = ()


class VoltageModel:
    """A self-describing checkpoint made callable on structures (thread-safe for inference)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.converter = GraphConverter.from_dict(loaded.converter_dict)
        fp = loaded.extra.get("encoding_fingerprint")
        if fp and fp != encoding_fingerprint():
            raise CheckpointError(
                "element encoding differs from the one the model was trained with "
                f"(checkpoint {fp}, installed {encoding_fingerprint()}): "
                "check the mendeleev version"
            )
        self.encoding = torch.from_numpy(np.array(encoding_table(), dtype=np.float32))
        self.std_scale = float(loaded.extra.get("std_scale", 1.0))
        self.train_elements = frozenset(loaded.extra.get("train_elements", []))

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> VoltageModel:
        return cls(load_checkpoint(path))

    @property
    def ion(self) -> str | None:
        return self.loaded.extra.get("ion")

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.loaded.extra)

    def graphs(self, structures: Sequence[Structure]) -> list[CrystalGraph]:
        return [self.converter.convert(s) for s in structures]

    def predict_graphs(self, graphs: Sequence[CrystalGraph]) -> tuple[np.ndarray, np.ndarray]:
        """(voltage, uncertainty) arrays in volts for already-built graphs."""
        if not graphs:
            return np.empty(0), np.empty(0)
        batch = collate(list(graphs), self.converter, self.encoding)
        with torch.inference_mode():
            mean, std = self.loaded.predict_with_std(batch)
        return mean.double().numpy(), std.double().numpy() * self.std_scale

    def unseen(self, structure: Structure) -> tuple[str, ...]:
        """Elements of ``structure`` never present in this ion's training structures."""
        if not self.train_elements:
            return ()
        return tuple(sorted({el.symbol for el in structure.composition} - self.train_elements))

    def predict(self, structures: Sequence[Structure]) -> list[Prediction]:
        mean, std = self.predict_graphs(self.graphs(structures))
        return [
            Prediction(float(m), float(s), self.unseen(st))
            for m, s, st in zip(mean, std, structures, strict=True)
        ]
