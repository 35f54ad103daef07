"""Transfer learning per ion and the paper's comparison, honestly measured.

For a target ion the source (Li) checkpoint's backbones (embedding + convolutions, every ensemble
member) are frozen and a new head is fitted on pooled features computed once per structure, with
the normaliser refitted on the ion's training split. Two head kinds over the same frozen backbone:

* ``fc``: the paper's transfer learning, the MLP head (``conv_to_fc`` .. ``fc_out``) fine-tuned from
  the source head, K bootstrap heads per backbone, epoch chosen on validation;
* ``gp``: a Gaussian-process head per backbone (``voltage_model.models.gp_head``),
  hyperparameters by marginal likelihood on the training split alone; deterministic, so it runs
  once, not per seed.
  An ion with pool partners (``ions.<ion>.pool``) adds their training crystals to its GP's rows
  (``training.train.heads.PooledRows``); ``gp_alone`` is then the same head on the ion's own
  crystals, measured beside it.

Both are always measured and reported; ``select_heads`` names the kinds the served model may be
chosen from (with the BatchNorm mode, on validation MAE).

Every method is selected on validation only and scored once on the same grouped test split, over
several seeds: mean predictor, the source model unchanged, the source model plus a constant offset
fitted on the ion's training split, CGCNN from scratch on the ion alone, and transfer learning.
(The composition baselines come from the ``baselines`` stage, on the same ids.)
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from training.config import TransferSettings
from training.datasets import IonData
from training.graphs.store import GraphLoader, GraphStore
from training.train.heads import (
    HeadConfig,
    HeadRows,
    adapt_batchnorm,
    fit_gp_volts,
    fit_heads,
    heads_volts,
    pooled_features,
    pooled_rows,
    split_descriptors,
)
from training.train.loaders import split_loader
from training.train.loop import TrainConfig
from training.train.metrics import regression_metrics
from training.train.scoring import model_predictor, score
from training.train.scratch import train_side_by_side
from training.train.settings import gp_config
from training.train.uncertainty import calibration, fit_std_scale
from voltage_model.artifact import LoadedModel, ensemble_volts
from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, Head
from voltage_model.models.descriptors import store_descriptors
from voltage_model.models.gp_head import GPConfig, GPHead
from voltage_model.normalizer import Normalizer

log = logging.getLogger(__name__)
BnMode = Literal["adapt", "frozen"]
HeadKind = Literal["fc", "gp", "gp_alone"]
HEAD_KINDS: tuple[HeadKind, ...] = ("fc", "gp", "gp_alone")
GP_KINDS = ("gp", "gp_alone")
VOLTS = Normalizer(mean=0.0, std=1.0)  # member predictions are already in volts


def head_config(cfg: TransferSettings, seed: int) -> HeadConfig:
    """The fine-tuned MLP heads' settings of ``transfer`` (``fc`` heads), with ``seed``."""
    return HeadConfig(
        n_heads=cfg.n_heads,
        epochs=cfg.epochs,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        bootstrap=cfg.bootstrap,
        patience=cfg.patience,
        seed=seed,
    )


@dataclass
class Member:
    """One adapted backbone with its fitted heads."""

    model: CGCNN
    heads: list[Head] | list[GPHead]
    preds: dict[str, np.ndarray]  # split -> (K, n) volts
    variances: dict[str, np.ndarray] | None = None  # split -> (K, n) volts^2 (GP heads)


@dataclass
class TransferResult:
    members: list[Member]
    normalizer: Normalizer
    bn_mode: str
    seed: int
    head_kind: str = "fc"
    pool_ions: tuple[str, ...] = ()

    def descriptor_weights(self) -> list[float]:
        """Per GP head, the composition descriptors' weight its marginal likelihood chose."""
        return [float(h.desc_weight) for m in self.members for h in m.heads
                if isinstance(h, GPHead)]  # fmt: skip

    def mean_std(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean and std in volts, by the served model's rule (``ensemble_volts``)."""
        means = [torch.from_numpy(row) for m in self.members for row in m.preds[split]]
        own = [torch.from_numpy(row) for m in self.members if m.variances is not None
               for row in m.variances[split]]  # fmt: skip
        mean, std = ensemble_volts(VOLTS, means, own)
        return mean.numpy(), std.numpy()


def frozen_backbone(src_model: CGCNN, bn_mode: BnMode, train_loader: GraphLoader) -> CGCNN:
    """A copy of a source backbone, BatchNorm statistics adapted or kept, every weight frozen."""
    model = copy.deepcopy(src_model)
    if bn_mode == "adapt":
        adapt_batchnorm(model, train_loader)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@dataclass(frozen=True)
class FrozenMember:
    """One source backbone frozen under one BatchNorm mode, with the pooled vectors it gives:
    ``feats`` per split of the ion, ``partner_feats`` per pool partner (its training split;
    empty until a pooled GP head asks for them)."""

    model: CGCNN
    feats: dict[str, Tensor]
    partner_feats: tuple[Tensor, ...] = ()


@dataclass(frozen=True)
class TransferInputs:
    """What every ``transfer`` run of one ion shares (head kind x BatchNorm mode x seed), built
    once per stage and handed down: the loaders per split, the refitted normaliser, the
    composition descriptors (when GP heads read them) and, per BatchNorm mode, each frozen
    backbone with its pooled vectors of the ion's and the partners' crystals.

    Only what is provably the same across runs is shared: a frozen backbone and its vectors
    depend on the source member and the BatchNorm mode (``adapt`` re-estimates the statistics
    on the ion's training split, deterministically; ``frozen`` keeps the source's), never on
    the head kind or the seed, so they are computed once per (member, mode), on first use.
    ``partners``: the ions a ``gp`` head pools training crystals with (ignored by other kinds).
    """

    source: LoadedModel
    data: IonData
    store: GraphStore
    cfg: TransferSettings
    partners: Sequence[IonData] = ()
    _frozen: dict[BnMode, tuple[FrozenMember, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "partners", tuple(self.partners))

    @cached_property
    def gp(self) -> GPConfig:
        return gp_config(self.cfg.gp)

    @cached_property
    def normalizer(self) -> Normalizer:
        """Refitted on the ion's training split."""
        return Normalizer.fit(self.data.targets("train"))

    @cached_property
    def loaders(self) -> dict[str, GraphLoader]:
        return {s: split_loader(self.store, self.data, s) for s in self.data.parts}

    @cached_property
    def partner_loaders(self) -> tuple[GraphLoader, ...]:
        return tuple(split_loader(self.store, p, "train") for p in self.partners)

    @cached_property
    def desc(self) -> dict[str, Tensor] | None:
        """The ion's crystals' composition descriptors per split (None: GP heads read none)."""
        return split_descriptors(self.store, self.data, self.gp)

    @cached_property
    def partner_desc(self) -> list[Tensor] | None:
        """Each partner's training crystals' descriptors, when GP heads read them."""
        if not self.gp.uses_descriptors:
            return None
        return [
            torch.from_numpy(store_descriptors(self.store, p.host_ids("train")))
            for p in self.partners
        ]

    def frozen(self, bn_mode: BnMode, with_partners: bool = False) -> tuple[FrozenMember, ...]:
        """Every source backbone frozen under ``bn_mode`` with its pooled vectors of the ion's
        crystals (and of the partners' training crystals when ``with_partners``), each computed
        on first use and kept."""
        members = self._frozen.get(bn_mode)
        if members is None:
            members = tuple(self._freeze(model, bn_mode) for model, _ in self.source.backbones())
        if with_partners and self.partners and not members[0].partner_feats:
            members = tuple(replace(m, partner_feats=self._partner_feats(m.model)) for m in members)
        self._frozen[bn_mode] = members
        return members

    def _partner_feats(self, model: CGCNN) -> tuple[Tensor, ...]:
        return tuple(pooled_features(model, ld) for ld in self.partner_loaders)

    def _freeze(self, src_model: CGCNN, bn_mode: BnMode) -> FrozenMember:
        model = frozen_backbone(src_model, bn_mode, self.loaders["train"])
        return FrozenMember(
            model, {s: pooled_features(model, ld) for s, ld in self.loaders.items()}
        )


def transfer(
    inputs: TransferInputs, bn_mode: BnMode, seed: int, head_kind: HeadKind = "fc"
) -> TransferResult:
    """Fit heads of ``head_kind`` on the target ion over every source backbone frozen under
    ``bn_mode`` (normaliser refitted); a ``gp`` head pools the partners' training crystals."""
    data, normalizer = inputs.data, inputs.normalizer
    pool = list(inputs.partners) if head_kind == "gp" else []
    frozen = inputs.frozen(bn_mode, with_partners=bool(pool))
    members = []
    for i, ((src_model, src_heads), member) in enumerate(
        zip(inputs.source.backbones(), frozen, strict=True)
    ):
        if head_kind in GP_KINDS:
            members.append(_gp_member(inputs, member, pool))
            continue
        start = src_heads[0] if src_heads else Head.from_model(src_model)
        cfg = head_config(inputs.cfg, seed * 100 + i)
        heads = fit_heads(start, HeadRows.of(member.feats, data), normalizer, cfg)
        preds = {s: heads_volts(heads, f, normalizer) for s, f in member.feats.items()}
        members.append(Member(model=member.model, heads=heads, preds=preds))
    return TransferResult(
        members=members,
        normalizer=normalizer,
        bn_mode=bn_mode,
        seed=seed,
        head_kind=head_kind,
        pool_ions=tuple(p.ion for p in pool),
    )


def _gp_member(inputs: TransferInputs, member: FrozenMember, pool: list[IonData]) -> Member:
    """One GP head on this backbone's pooled training vectors (and the crystals' composition
    descriptors, when configured; and the ``pool`` partners' rows); means and variances in
    volts."""
    rows = pooled_rows(pool, list(member.partner_feats), inputs.partner_desc) if pool else None
    y = inputs.data.targets("train")
    fit = fit_gp_volts(member.feats, inputs.desc, y, inputs.normalizer, inputs.gp, rows)
    return Member(model=member.model, heads=[fit.head], preds=fit.means, variances=fit.variances)


@torch.inference_mode()
def source_predictions(
    source: LoadedModel, data: IonData, store: GraphStore
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """The source model applied unchanged (its own normaliser), per split: the ensemble as
    served (``LoadedModel.predict_with_std``'s mean) and each member alone (the mean of its own
    heads), the spread of one training seed to the next that the ensemble's figure hides. One
    backbone pass per batch gives both."""
    n = len(source.backbones())
    ensemble: dict[str, list[np.ndarray]] = {s: [] for s in data.parts}
    members: list[dict[str, list[np.ndarray]]] = [{s: [] for s in data.parts} for _ in range(n)]
    for split in data.parts:
        for batch in split_loader(store, data, split):
            outs = [[mean for mean, _ in member] for member in source.member_outputs(batch)]
            flat = [o for member in outs for o in member]
            ensemble[split].append(ensemble_volts(source.normalizer, flat)[0].double().numpy())
            for i, member in enumerate(outs):
                mean = source.normalizer.denorm(torch.stack(member).mean(dim=0))
                members[i][split].append(mean.double().numpy())
    return _joined(ensemble), [_joined(m) for m in members]


def _joined(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {s: np.concatenate(v) if v else np.empty(0) for s, v in parts.items()}


def member_predictions(result: TransferResult) -> list[dict[str, np.ndarray]]:
    """Each adapted backbone's heads alone (their mean), per split."""
    return [{s: p.mean(axis=0) for s, p in m.preds.items()} for m in result.members]


def scratch_cgcnn(
    data: IonData, store: GraphStore, model_cfg: CGCNNConfig, cfg: TransferSettings,
    seeds: Sequence[int],
) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """CGCNNs trained from scratch on the target ion alone, one per seed (side by side):
    predictions per split of each."""
    base = TrainConfig.from_dict(cfg.scratch.model_dump())
    trained = train_side_by_side(data, store, model_cfg, [replace(base, seed=s) for s in seeds])
    out = []
    for t in trained:
        scored = score(model_predictor(t.model, t.normalizer), data, store)
        out.append({s: np.array([scored.predictions[s][b] for b in data.ids(s)])
                    for s in data.parts})  # fmt: skip
    return out


def metrics_by_split(data: IonData, preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {s: regression_metrics(data.targets(s), p) for s, p in preds.items()}


def uncertainty_report(data: IonData, result: TransferResult) -> dict[str, float]:
    """Calibration on test (never fitted there), and the std scale the served model applies.

    MLP head ensembles under-disperse, so their spread is rescaled on validation. A GP head's
    predictive std is already fitted (marginal likelihood on the training split) and is served
    as is (scale 1): re-estimating a scale on 11-43 validation crystals only adds noise. The
    validation coverage is reported either way, so the choice can be checked.
    """
    vm, vs = result.mean_std("val")
    y_val = data.targets("val")
    scale = 1.0 if result.head_kind in GP_KINDS else fit_std_scale(y_val, vm, vs)
    tm, ts = result.mean_std("test")
    val_cov = calibration(y_val, vm, vs * scale)["coverage_90"]
    return {
        "std_scale": scale,
        "val_coverage_90": val_cov,
        **calibration(data.targets("test"), tm, ts * scale),
    }
