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

from voltage_model.artifact import CheckpointError, LoadedModel, load_checkpoint
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import CrystalGraph, GraphConverter
from voltage_model.graphs.encoding import encoding_fingerprint, encoding_table


@dataclass(frozen=True)
class ModelInput:
    """What one crystal becomes before the model runs: its CGCNN graph (None when the model
    serves a CHGNet head alone) and CHGNet's graph (None when no CHGNet head is served). Built
    per request (CPU, parallel); the batched forward passes run in ``predict_graphs``."""

    graph: CrystalGraph | None
    chgnet_graph: Any = None


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

    @property
    def backbone(self) -> str:
        """What the served prediction runs on: ``cgcnn``, ``chgnet`` or ``cgcnn+chgnet``."""
        if self.loaded.chgnet is None:
            return "cgcnn"
        return "chgnet" if not self.loaded.needs_graphs else "cgcnn+chgnet"

    def prepare(self, structure: Structure) -> CrystalGraph | ModelInput:
        """One crystal's model input: the CGCNN graph for a CGCNN-only model (as before), else
        a ``ModelInput`` with CHGNet's graph too (CHGNet only for models that need it)."""
        if not self.loaded.needs_chgnet:
            return self.converter.convert(structure)
        from voltage_model.models.chgnet_backbone import to_graph

        graph = self.converter.convert(structure) if self.loaded.needs_graphs else None
        return ModelInput(graph, to_graph(structure))

    @staticmethod
    def cgcnn_graph(item: CrystalGraph | ModelInput) -> CrystalGraph | None:
        """The CGCNN graph of a prepared input (None for a CHGNet-only model's input)."""
        return item.graph if isinstance(item, ModelInput) else item

    def graphs(self, structures: Sequence[Structure]) -> list[CrystalGraph | ModelInput]:
        return [self.prepare(s) for s in structures]

    def predict_graphs(
        self, graphs: Sequence[CrystalGraph | ModelInput]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(voltage, uncertainty) arrays in volts for prepared inputs (``prepare``), one batched
        forward per backbone."""
        if not graphs:
            return np.empty(0), np.empty(0)
        batch = None
        if self.loaded.needs_graphs:
            cg = [self.cgcnn_graph(g) for g in graphs]
            if any(g is None for g in cg):
                raise ValueError("this model needs CGCNN graphs; prepare inputs with prepare()")
            batch = collate(cg, self.converter, self.encoding)
        feats = None
        if self.loaded.needs_chgnet:
            if not all(isinstance(g, ModelInput) and g.chgnet_graph is not None for g in graphs):
                raise ValueError("this model serves a CHGNet head: prepare inputs with prepare()")
            from voltage_model.models.chgnet_backbone import graph_features

            feats = torch.from_numpy(graph_features([g.chgnet_graph for g in graphs]))
        with torch.inference_mode():
            mean, std = self.loaded.predict_served(batch, feats)
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
