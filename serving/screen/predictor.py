"""The tier-1 prediction pass over prepared structures: every ion's CGCNN ensemble, each distinct
backbone run once per batch, the ensemble reduced by the shared ``ensemble_volts``."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from serving.screen.prepare import Failed, Prepared, error_record
from voltage_model.artifact import ensemble_volts
from voltage_model.graphs.batch import collate
from voltage_model.graphs.converter import GraphConverter
from voltage_model.models.gp_head import head_mean_var
from voltage_model.predict import VoltageModel

log = logging.getLogger(__name__)


def _converter_groups(
    ions: Sequence[str], models: Mapping[str, VoltageModel]
) -> list[tuple[GraphConverter, list[str]]]:
    """Ions grouped by graph converter: a structure's graph is built once per distinct one."""
    groups: dict[str, tuple[GraphConverter, list[str]]] = {}
    for ion in ions:
        conv = models[ion].converter
        key = json.dumps(conv.to_dict(), sort_keys=True)
        groups.setdefault(key, (conv, []))[1].append(ion)
    return list(groups.values())


def _backbone_key(model: torch.nn.Module) -> str:
    """Hash of a member's embedding + conv tensors: equal keys give equal atom vectors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name.startswith(("embedding.", "convs.")) and not name.endswith("num_batches_tracked"):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Predictor:
    """Batches prepared structures through every ion's model and turns them into records.

    Reproduces ``LoadedModel.predict_with_std`` (``ensemble_volts`` over every member's heads,
    std times the model's ``std_scale``), but runs each distinct backbone once per batch:
    ions transferred with frozen BatchNorm share the source ion's backbones, and the backbone is
    nearly all of the cost, so a multi-ion screen costs little more than a single-ion one.
    """

    def __init__(self, ions: Sequence[str], models: Mapping[str, VoltageModel]) -> None:
        self.ions = list(ions)
        self.models = dict(models)
        self.groups = _converter_groups(ions, models)
        self.members = {
            ion: [(_backbone_key(m), m, heads) for m, heads in models[ion].loaded.backbones()]
            for ion in self.ions
        }

    @torch.inference_mode()
    def _predict(self, items: Sequence[Prepared]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for g, (conv, ions) in enumerate(self.groups):
            batch = collate([p.graphs[g] for p in items], conv, self.models[ions[0]].encoding)
            pooled: dict[str, torch.Tensor] = {}
            desc = None
            for ion in ions:
                means, variances = [], []
                if desc is None and self.models[ion].loaded.needs_descriptors:
                    desc = self.models[ion].loaded.descriptors(batch)
                for key, model, heads in self.members[ion]:
                    if key not in pooled:
                        pooled[key] = model.eval().pooled(batch)
                    for head in heads:
                        mean, var = head_mean_var(head, pooled[key], desc)
                        means.append(mean)
                        variances.append(var)
                    if not heads:
                        means.append(model.head(pooled[key]))
                vm = self.models[ion]
                mean, std = ensemble_volts(vm.loaded.normalizer, means, variances)
                out[ion] = (mean.double().numpy(), std.double().numpy() * vm.std_scale)
        return out

    def records(self, items: Sequence[Prepared]) -> list[dict[str, Any]]:
        """One JSON-able record per item; a batch that fails is retried item by item."""
        if not items:
            return []
        try:
            preds = self._predict(items)
        except Exception:
            if len(items) == 1:
                log.exception("prediction failed for %s", items[0].id)
                return [error_record(Failed(items[0].id, "internal", "prediction failed"))]
            return [rec for item in items for rec in self.records([item])]
        return [self._record(k, item, preds) for k, item in enumerate(items)]

    def _record(self, k: int, item: Prepared, preds: Mapping[str, Any]) -> dict[str, Any]:
        per_ion = {}
        for ion in self.ions:
            mean, std = preds[ion]
            per_ion[ion] = {
                "voltage": round(float(mean[k]), 5),
                "uncertainty": round(float(std[k]), 5),
                "warnings": self._warnings(ion, item),
            }
        return {"id": item.id, "formula": item.formula, "n_sites": item.n_sites, "pred": per_ion}

    def _warnings(self, ion: str, item: Prepared) -> list[str]:
        """Out-of-domain flags: elements the ion's model never saw in training."""
        known = self.models[ion].train_elements
        unseen = sorted(set(item.elements) - known) if known else []
        return [f"unseen_elements:{'+'.join(unseen)}"] if unseen else []
