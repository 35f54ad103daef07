"""GP heads over frozen CHGNet features for one ion, and the served variant (issue 16).

The ``ion_model`` stage fits, per ion, a GP head on the CHGNet features of its training crystals
(pooling its partners' training crystals when the variant CV said so, like the CGCNN heads), and
serves one of: the CGCNN transfer model, the CHGNet head, or their equal mixture, as chosen by
grouped CV on train+val (``gp_cv.choose_variant``). Everything here reads the CHGNet features
from the ``chgnet_features`` stage (one DVC output), never recomputes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from training.chgnet_store import ChgnetFeatures
from training.data.ion_inputs import IonInputs
from training.data.split import SPLITS
from training.datasets import IonData
from training.gp_cv import (
    CVBackbone,
    Featurise,
    backbone_features,
    host_descriptors,
    load_partners,
    pooled_by_backbone,
    rows_of,
)
from training.graphs.store import GraphStore
from training.train.heads import with_pooled_rows
from voltage_model.artifact import ChgnetPart, LoadedModel, blend
from voltage_model.models.gp_head import GPConfig, fit_gp_head, head_mean_var
from voltage_model.normalizer import Normalizer

#: The CHGNet head's share of the served prediction, per variant (None: no CHGNet head).
VARIANT_WEIGHT = {"cgcnn": None, "chgnet": 1.0, "average": 0.5}


@dataclass
class ChgnetFit:
    """A fitted CHGNet head and its (mean, std) in volts per split."""

    part: ChgnetPart
    preds: dict[str, tuple[np.ndarray, np.ndarray]]
    pooled: bool

    def means(self) -> dict[str, np.ndarray]:
        return {s: m for s, (m, _) in self.preds.items()}


def _feats(chg: ChgnetFeatures, hosts: list[str]) -> torch.Tensor:
    return torch.from_numpy(chg.rows(hosts))


def cv_backbones(
    ion: IonInputs, source: LoadedModel, cgcnn_gp: GPConfig, chgnet_gp: GPConfig
) -> dict[str, CVBackbone]:
    """Both backbones' inputs to the variant CV over the ion's train+val crystals; partners
    contribute their training split, as the served heads pool it. CGCNN: the first Li backbone
    (as the pooling CV always did); CHGNet: ``ion.chg`` (none without)."""
    data, store, chg, partners = ion.data, ion.store, ion.chg, ion.partners
    assert store is not None, "the variant CV reads graphs from the graph cache"
    hosts, _ = rows_of(data, ("train", "val"))
    cgcnn_partners = load_partners(
        partners, store, cgcnn_gp, backbone_features(source, store, 1), ("train",)
    )
    out = {
        "cgcnn": CVBackbone(
            pooled_by_backbone(source, store, hosts, 1),
            host_descriptors(store, hosts, cgcnn_gp),
            cgcnn_partners,
            cgcnn_gp,
        )
    }
    if chg is not None:
        chg_partners = load_partners(partners, store, chgnet_gp, _featurise(chg), ("train",))
        out["chgnet"] = CVBackbone(
            [_feats(chg, hosts)], host_descriptors(store, hosts, chgnet_gp), chg_partners, chgnet_gp
        )
    return out


def _featurise(chg: ChgnetFeatures) -> Featurise:
    """hosts -> their CHGNet features, as the one matrix of a ``Featurise``."""
    return lambda hosts: [_feats(chg, hosts)]


def fit_chgnet_head(
    data: IonData, store: GraphStore, chg: ChgnetFeatures, gp: GPConfig,
    partners: Sequence[IonData] = (),
) -> ChgnetFit:  # fmt: skip
    """The CHGNet GP head on the ion's training split (plus the partners' training crystals when
    ``partners`` is given), scored on every split of the ion."""
    hosts = {s: data.host_ids(s) for s in SPLITS}
    y_train = data.targets("train")
    norm = Normalizer.fit(y_train)
    desc = {s: host_descriptors(store, hosts[s], gp) for s in SPLITS}
    pooled = None
    if partners:
        rows = load_partners(partners, store, gp, _featurise(chg), ("train",))
        assert rows is not None
        pooled = rows.fold_rows(0, set())
    x, y, d, tasks = with_pooled_rows(_feats(chg, hosts["train"]), desc["train"],
                                      norm.norm(y_train), pooled)  # fmt: skip
    head = fit_gp_head(x, y, gp, d, tasks).eval()
    from voltage_model.models.chgnet_backbone import spec

    part = ChgnetPart(head, norm, spec(), 1.0)
    preds = {}
    with torch.no_grad():
        for s in SPLITS:
            mean, var = head_mean_var(head, _feats(chg, hosts[s]).double(), desc[s])
            m, sd = part.normalizer.denorm(mean), var.sqrt() * part.normalizer.std
            preds[s] = (m.double().numpy(), sd.double().numpy())
    return ChgnetFit(part, preds, bool(partners))


def variant_predictions(
    variant: str, cgcnn: dict[str, tuple[np.ndarray, np.ndarray]], chgnet: ChgnetFit | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(mean, std) per split of a served variant, by the served model's rule (``blend``)."""
    weight = VARIANT_WEIGHT[variant]
    if weight is None or chgnet is None:
        return cgcnn
    out = {}
    for s in cgcnn:
        a = tuple(torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in cgcnn[s])
        b = tuple(torch.from_numpy(v) for v in chgnet.preds[s])
        m, sd = blend(a, b, weight)  # type: ignore[arg-type]
        out[s] = (m.numpy(), sd.numpy())
    return out


def served_part(variant: str, chgnet: ChgnetFit | None) -> ChgnetPart | None:
    """The artifact's CHGNet section for ``variant`` (None: the CGCNN is served alone)."""
    weight = VARIANT_WEIGHT[variant]
    if weight is None or chgnet is None:
        return None
    p = chgnet.part
    return ChgnetPart(p.head, p.normalizer, p.spec, weight)


def variant_report(choice: dict[str, Any]) -> dict[str, Any]:
    """The CV decision as recorded in the ion's metrics (``variant_selection``): the CGCNN
    head's pooling CV is ``pool_selection`` already; the CHGNet head's stays here."""
    pooling = {k: v for k, v in (choice.get("pooling") or {}).items() if k != "cgcnn"}
    return {**{k: v for k, v in choice.items() if k != "pooling"}, "pooling": pooling}
