"""Self-describing CGCNN checkpoint: everything needed to serve a model, in one safe file.

Layout (a plain dict, written with ``torch.save``)::

    {
      "format": "electrode-voltage-cgcnn",
      "schema_version": 1,
      "model_config": {...CGCNNConfig...},
      "converter": {...GraphConverter.to_dict()...},   # graphs must be built the same way
      "normalizer": {"mean": float, "std": float},     # targets were (y - mean) / std
      "state_dict": {name: Tensor},
      "heads": None | [ {conv_to_fc.*, fcs.*, fc_out.*: Tensor}, ... ],   # optional ensemble
      "members": [ {"state_dict": {...}, "heads": None | [...]}, ... ],   # schema 2: more backbones
      "extra": {...json-able: ion, metrics, run ids...},
      "torch_version": str,
    }

Only tensors, dicts, lists, str, int, float, bool and None are stored, so
``torch.load(path, weights_only=True)`` reads it without unpickling arbitrary objects (a model
registry must never execute code from a file).  ``heads`` lets one checkpoint carry K heads over
one shared backbone for ensemble uncertainty without changing the schema version. Schema 2 adds
``members``: further whole models (other seeds) sharing config, converter and normaliser; the
prediction is the mean over every member's heads and the spread across them is the uncertainty.
Schema 3 allows a head to be a Gaussian-process head (``voltage_model.models.gp_head``: its state
dict holds the fitted posterior as tensors); the uncertainty then adds each head's own posterior
variance to the spread across heads (law of total variance).
Schema 4 lets a GP head also read composition descriptors of the crystal
(``voltage_model.models.descriptors``, computed from the graph's atomic numbers); such a
checkpoint's ``extra["descriptor_version"]`` names the featuriser, which loading checks.
Schema 5 adds an optional ``chgnet`` section: a GP head over frozen CHGNet features
(``voltage_model.models.chgnet_backbone``) with its own normaliser, the CHGNet it was fitted on
(``spec``, checked at load) and ``weight``, its share of the served prediction (1: the CHGNet head
alone; 0.5: the equal mixture with the CGCNN ensemble)::

      "chgnet": None | {"spec": {...}, "weight": float, "normalizer": {...}, "head": {GP state}}
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from voltage_model.models.cgcnn import CGCNN, CGCNNConfig, EnsembleHead, GraphBatchLike, Head
from voltage_model.models.descriptors import DESCRIPTOR_VERSION, batch_descriptors
from voltage_model.models.gp_head import GPHead, head_mean_var, is_gp_state, needs_descriptors
from voltage_model.normalizer import Normalizer

CHECKPOINT_FORMAT = "electrode-voltage-cgcnn"
SCHEMA_VERSION = 5
SUPPORTED_SCHEMA_VERSIONS = frozenset({1, 2, 3, 4, 5})

_SCALARS = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """The file is not a checkpoint this code can read (wrong format, schema, or contents)."""


def to_plain(value: Any, where: str = "value") -> Any:
    """Recursively convert to weights_only-safe types (numpy scalars -> python, tuple -> list).

    Raises TypeError naming the offending key instead of failing later at load time.
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: dict keys must be str, got {k!r}")
            out[k] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: {type(value).__name__} is not checkpoint-safe (use plain types)")


def _tensors(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def _config_dict(model: CGCNN, model_config: CGCNNConfig | Mapping[str, Any] | None) -> dict:
    if model_config is None:
        return model.config.to_dict()
    cfg = (
        model_config
        if isinstance(model_config, CGCNNConfig)
        else CGCNNConfig.from_dict(dict(model_config))
    )
    if cfg != model.config:
        raise ValueError(f"model_config {cfg} does not match the model's {model.config}")
    return cfg.to_dict()


AnyHead = Head | GPHead


def _head_states(heads: Sequence[AnyHead | Mapping[str, Tensor]] | None) -> list | None:
    if heads is None:
        return None
    return [_tensors(h.state_dict() if isinstance(h, nn.Module) else h) for h in heads]


def checkpoint_payload(
    model: CGCNN,
    model_config: CGCNNConfig | Mapping[str, Any] | None,
    converter_dict: Mapping[str, Any] | Any,
    normalizer: Normalizer,
    extra: Mapping[str, Any] | None = None,
    *,
    heads: Sequence[AnyHead | Mapping[str, Tensor]] | None = None,
    members: Sequence[tuple[CGCNN, Sequence[AnyHead] | None]] = (),
    chgnet: ChgnetPart | None = None,
) -> dict[str, Any]:
    """The dict ``save_checkpoint`` writes (also handy for in-memory round trips)."""
    if not isinstance(converter_dict, Mapping) and hasattr(converter_dict, "to_dict"):
        converter_dict = converter_dict.to_dict()  # accept a GraphConverter too
    extra = dict(extra or {})
    all_heads = [*(heads or []), *(h for _, hs in members for h in (hs or []))]
    if needs_descriptors([h for h in all_heads if isinstance(h, nn.Module)]):
        extra["descriptor_version"] = DESCRIPTOR_VERSION
    return {
        "format": CHECKPOINT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "model_config": _config_dict(model, model_config),
        "converter": to_plain(dict(converter_dict), "converter"),
        "normalizer": normalizer.to_dict(),
        "state_dict": _tensors(model.state_dict()),
        "heads": _head_states(heads),
        "members": [
            {"state_dict": _tensors(m.state_dict()), "heads": _head_states(h)} for m, h in members
        ],
        "extra": to_plain(extra, "extra"),
        "chgnet": None if chgnet is None else chgnet.to_payload(),
        "torch_version": str(torch.__version__),
    }


def save_checkpoint(
    path: str | Path,
    model: CGCNN,
    model_config: CGCNNConfig | Mapping[str, Any] | None,
    converter_dict: Mapping[str, Any] | Any,
    normalizer: Normalizer,
    extra: Mapping[str, Any] | None = None,
    *,
    heads: Sequence[AnyHead | Mapping[str, Tensor]] | None = None,
    members: Sequence[tuple[CGCNN, Sequence[AnyHead] | None]] = (),
    chgnet: ChgnetPart | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path."""
    payload = checkpoint_payload(
        model, model_config, converter_dict, normalizer, extra, heads=heads, members=members,
        chgnet=chgnet,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


@dataclass
class ChgnetPart:
    """A GP head over frozen CHGNet features, its normaliser, the CHGNet spec it was fitted on,
    and its share ``weight`` (0 < weight <= 1) of the served prediction."""

    head: GPHead
    normalizer: Normalizer
    spec: dict[str, str]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.weight <= 1.0:
            raise ValueError(f"CHGNet share must be in (0, 1], got {self.weight}")

    def to_payload(self) -> dict[str, Any]:
        return {"spec": to_plain(dict(self.spec), "chgnet.spec"), "weight": float(self.weight),
                "normalizer": self.normalizer.to_dict(),
                "head": _tensors(self.head.state_dict())}  # fmt: skip

    @classmethod
    def from_payload(cls, payload: Any, where: str) -> ChgnetPart:
        if not isinstance(payload, dict):
            raise CheckpointError(f"{where}: chgnet section must be a dict")
        try:
            head = GPHead.from_state(_require(payload, "head", dict)).eval()
            norm = Normalizer.from_dict(_require(payload, "normalizer", dict))
            spec = dict(_require(payload, "spec", dict))
            return cls(head, norm, spec, float(payload.get("weight", 1.0)))
        except (ValueError, TypeError, KeyError) as exc:
            raise CheckpointError(f"{where}: chgnet section: {exc}") from exc

    def mean_std(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, std) in volts of the CHGNet head on (n, FEATURE_DIM) features."""
        mean, var = head_mean_var(self.head, feats.to(torch.float64))
        return ensemble_volts(self.normalizer, [mean], [var])


def blend(
    cgcnn: tuple[Tensor, Tensor] | None, chgnet: tuple[Tensor, Tensor] | None, weight: float
) -> tuple[Tensor, Tensor]:
    """The served mean and std: the mixture of the CGCNN ensemble's and the CHGNet head's
    predictive distributions, CHGNet's share ``weight`` (1: CHGNet alone; no CHGNet: CGCNN)."""
    if chgnet is None or weight <= 0.0:
        assert cgcnn is not None
        return cgcnn
    if cgcnn is None or weight >= 1.0:
        return chgnet
    (ma, sa), (mb, sb) = (tuple(t.to(torch.float64) for t in p) for p in (cgcnn, chgnet))
    w = float(weight)
    mean = (1 - w) * ma + w * mb
    var = (1 - w) * sa**2 + w * sb**2 + (1 - w) * w * (ma - mb) ** 2
    return mean, var.sqrt()


@dataclass
class LoadedModel:
    """A checkpoint brought back to life: model in eval mode plus everything to serve it."""

    model: CGCNN
    model_config: CGCNNConfig
    converter_dict: dict[str, Any]
    normalizer: Normalizer
    extra: dict[str, Any] = field(default_factory=dict)
    ensemble: EnsembleHead | None = None
    schema_version: int = SCHEMA_VERSION
    members: list[tuple[CGCNN, list[AnyHead]]] = field(default_factory=list)
    chgnet: ChgnetPart | None = None

    @property
    def needs_chgnet(self) -> bool:
        """Whether predictions need CHGNet features of the crystals."""
        return self.chgnet is not None

    @property
    def needs_graphs(self) -> bool:
        """Whether predictions need the CGCNN graphs (not for a CHGNet head served alone)."""
        return self.chgnet is None or self.chgnet.weight < 1.0

    def backbones(self) -> list[tuple[CGCNN, list[AnyHead]]]:
        """Every whole model with its heads (member 0 first): what transfer learning adapts."""
        first = list(self.ensemble.heads) if self.ensemble is not None else []
        return [(self.model, first), *self.members]

    @torch.inference_mode()
    def predict_volts(self, batch: GraphBatchLike) -> Tensor:
        """Predictions in volts, (n_crystals,)."""
        self.model.eval()
        return self.normalizer.denorm(self.model(batch))

    @property
    def needs_descriptors(self) -> bool:
        """Whether some head reads composition descriptors beside the pooled vector."""
        return any(needs_descriptors(heads) for _, heads in self.backbones())

    def descriptors(self, batch: GraphBatchLike) -> Tensor | None:
        """The batch's composition descriptors when a head needs them (computed once per batch)."""
        if not self.needs_descriptors:
            return None
        z = getattr(batch, "atomic_numbers", None)
        if z is None:
            raise ValueError("this model reads composition descriptors: the batch needs "
                             "atomic_numbers (collate and GraphLoader provide them)")  # fmt: skip
        return batch_descriptors(z, batch.crystal_idx, batch.n_crystals)

    @torch.inference_mode()
    def predict_served(
        self, batch: GraphBatchLike | None, chgnet_feats: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(mean, std) in volts as served: the CGCNN ensemble, the CHGNet head, or their
        mixture (``blend``). ``batch`` may be None when only the CHGNet head is served."""
        cgcnn = self.predict_with_std(batch) if self.needs_graphs else None
        if self.chgnet is None:
            assert cgcnn is not None
            return cgcnn
        if chgnet_feats is None:
            raise ValueError("this model serves a CHGNet head: CHGNet features are needed")
        return blend(cgcnn, self.chgnet.mean_std(chgnet_feats), self.chgnet.weight)

    @torch.inference_mode()
    def member_outputs(self, batch: GraphBatchLike) -> list[list[tuple[Tensor, Tensor | None]]]:
        """Per member, each head's (mean, own variance) in normalised units; a member without
        heads gives its own output and no variance. The one backbone pass that the ensemble
        (``predict_with_std``) and per-member figures (transfer's source rows) share."""
        desc = self.descriptors(batch)
        outs: list[list[tuple[Tensor, Tensor | None]]] = []
        for model, heads in self.backbones():
            model.eval()
            if not heads:
                outs.append([(model(batch), None)])
                continue
            pooled = model.pooled(batch)
            outs.append([head_mean_var(head, pooled, desc) for head in heads])
        return outs

    @torch.inference_mode()
    def predict_with_std(self, batch: GraphBatchLike) -> tuple[Tensor, Tensor]:
        """(mean, std) in volts over every member's heads; std is 0 for a single plain model."""
        outputs = [out for member in self.member_outputs(batch) for out in member]
        means = [mean for mean, _ in outputs]
        variances = [var for _, var in outputs if var is not None]
        return ensemble_volts(self.normalizer, means, variances)


def ensemble_volts(
    normalizer: Normalizer, means: Sequence[Tensor], variances: Sequence[Tensor] = ()
) -> tuple[Tensor, Tensor]:
    """Mean and std in volts of an ensemble of head outputs (normalised units).

    std**2 = spread of the head means + mean of the heads' own variances (GP heads; MLP heads
    have none), so a plain MLP ensemble keeps its population std across heads.
    """
    stacked = torch.stack(list(means), dim=0)
    var = stacked.var(dim=0, unbiased=False)
    if variances:
        var = var + torch.stack(list(variances), dim=0).mean(dim=0)
    return normalizer.denorm(stacked.mean(dim=0)), var.sqrt() * normalizer.std


def _require(payload: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = payload.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint field {key!r} missing or not {kind}")
    return value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read a checkpoint with ``weights_only=True``; reject unknown formats/schema versions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:  # weights_only refuses pickled code objects with UnpicklingError
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return load_payload(payload, path)


def load_payload(payload: Any, path: Path) -> LoadedModel:
    """A checkpoint payload already read (``torch.load(..., weights_only=True)``, or a release
    file expanded by ``voltage_model.release``) brought to life, with every check; ``path`` names
    it in errors. The one place a model is built from stored weights."""
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    version = payload.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint schema_version {version!r} is not supported by this code "
            f"(supported: {sorted(SUPPORTED_SCHEMA_VERSIONS)}); retrain or upgrade the package"
        )
    config = CGCNNConfig.from_dict(_require(payload, "model_config", dict))
    normalizer = Normalizer.from_dict(_require(payload, "normalizer", dict))
    if not (math.isfinite(normalizer.mean) and normalizer.std > 0):
        raise CheckpointError(f"{path}: invalid normaliser {normalizer}")
    model = CGCNN(config)
    model.load_state_dict(_require(payload, "state_dict", dict))
    model.eval()
    ensemble = None
    heads = _load_heads(config, payload.get("heads"))
    if heads:
        ensemble = EnsembleHead(model, heads).eval()
    members = []
    for i, member in enumerate(payload.get("members") or []):
        m = CGCNN(config)
        m.load_state_dict(_require(member, "state_dict", dict))
        members.append((m.eval(), _load_heads(config, member.get("heads"), f"member {i}")))
    loaded = LoadedModel(
        model=model,
        model_config=config,
        converter_dict=dict(_require(payload, "converter", dict)),
        normalizer=normalizer,
        extra=dict(payload.get("extra") or {}),
        ensemble=ensemble,
        schema_version=int(version),
        members=members,
        chgnet=_load_chgnet(payload.get("chgnet"), path),
    )
    _check_descriptors(loaded, path)
    return loaded


def _load_chgnet(section: Any, path: Path) -> ChgnetPart | None:
    """The CHGNet section, refused when the installed CHGNet differs from the recorded one."""
    if section is None:
        return None
    part = ChgnetPart.from_payload(section, str(path))
    from voltage_model.models.chgnet_backbone import ChgnetMismatch, check_spec

    try:
        check_spec(part.spec, str(path))
    except ChgnetMismatch as exc:
        raise CheckpointError(str(exc)) from exc
    return part


def _check_descriptors(loaded: LoadedModel, path: Path) -> None:
    """Descriptor heads were fitted on one featuriser version; another would shift their input."""
    if not loaded.needs_descriptors:
        return
    version = loaded.extra.get("descriptor_version")
    if version != DESCRIPTOR_VERSION:
        raise CheckpointError(
            f"{path}: heads read composition descriptors {version!r}, but this code computes "
            f"{DESCRIPTOR_VERSION!r}; retrain or install the matching package"
        )


def _load_heads(config: CGCNNConfig, states: Any, where: str = "heads") -> list[AnyHead]:
    if states is None:
        return []
    if not isinstance(states, list):
        raise CheckpointError(f"{where}: heads must be a list of state dicts")
    heads: list[AnyHead] = []
    for state in states:
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}: a head is not a state dict")
        if is_gp_state(state):
            try:
                heads.append(GPHead.from_state(state).eval())
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from exc
            continue
        head = Head(config)
        head.load_state_dict(state)
        heads.append(head.eval())
    return heads
