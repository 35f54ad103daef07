"""Per-atom local voltages (Zhang et al. 2022, Eq. 2): a linear head on frozen atom vectors.

``V_i = v_i . W + b`` where ``v_i`` is atom i's vector after the last convolution. The CGCNN pools
by a mean, so ``mean_i V_i = mean_i(v_i) . W + b``: fitting "the mean of the local voltages is the
crystal voltage" is exactly an ordinary least-squares fit on the per-crystal mean atom vectors
(the ``pooled`` features), no per-atom training loop needed (the fit is
``training/interpret/local_fit.py``; this module is what the service applies).

An ensemble checkpoint has several backbones, each with its own atom vectors, so the head holds
one ``(W, b)`` per backbone and a site's local voltage is the mean over backbones. The mean over
sites of what ``explain`` returns is then, exactly, the head's crystal prediction (the mean of the
per-backbone linear predictions).

The head is stored as plain lists (``to_dict``) so it fits in a checkpoint's ``extra`` (which must
load with ``torch.load(weights_only=True)``) or in a JSON sidecar, and it records a fingerprint of
the backbones it was fitted on: applied to other atom vectors its numbers would be meaningless,
so ``explain`` refuses a mismatch instead of returning plausible-looking garbage.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from voltage_model.artifact import LoadedModel
from voltage_model.graphs.batch import GraphBatch, collate
from voltage_model.graphs.converter import CrystalGraph

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from voltage_model.predict import VoltageModel

HEAD_FORMAT = "local-voltage-head"
HEAD_VERSION = 1
EXTRA_KEY = "local_voltage_head"  # where the head lives when stored in a checkpoint's extra
#: MLflow artifact folder of the head in an ``interpret`` run (its own folder: the stage's report
#: JSON shares the head's file name and would overwrite it in one folder).
MLFLOW_DIR = "local_voltage_head"
#: Where runs before November 2026 logged it (beside the report, which it overwrote).
LEGACY_MLFLOW_DIR = "interpret"


def mlflow_artifact_paths(ion: str) -> tuple[str, ...]:
    """Artifact paths of an ion's head in an ``interpret`` run, the current one first."""
    return (f"{MLFLOW_DIR}/{ion}.json", f"{LEGACY_MLFLOW_DIR}/{ion}.json")


_BACKBONE_PREFIXES = ("embedding.", "convs.")


# =============================================================================== fingerprint
def backbone_fingerprint(loaded: LoadedModel) -> str:
    """Short sha256 of every member's embedding + conv tensors (BatchNorm statistics included).

    Heads are excluded on purpose: the local-voltage head reads atom vectors only, so it stays
    valid for a checkpoint whose MLP heads changed but whose backbones did not.
    """
    digest = hashlib.sha256()
    for k, (model, _) in enumerate(loaded.backbones()):
        for name, tensor in sorted(model.state_dict().items()):
            if not name.startswith(_BACKBONE_PREFIXES) or name.endswith("num_batches_tracked"):
                continue
            digest.update(f"{k}:{name}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# =============================================================================== the heads
#: Columns of the CHGNet feature vector holding the mean of the atom features over sites
#: (``chgnet_backbone.RECIPE``: crystal feature, then atom mean, std, max, energy).
CHGNET_MEAN_COLUMNS = slice(64, 128)


@dataclass(frozen=True)
class ChgnetLocalHead:
    """``V_i = a_i . w + b`` on CHGNet's atom features ``a_i`` (frozen CHGNet ``spec``): the
    local voltages of a model that serves a CHGNet head. Fitted like the CGCNN head, on the
    per-crystal mean atom features, so the mean over sites is the head's crystal prediction."""

    weights: tuple[float, ...]
    bias: float
    spec: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    def local(self, atom_features: np.ndarray) -> np.ndarray:
        return np.asarray(atom_features, dtype=np.float64) @ np.asarray(self.weights) + self.bias

    def to_dict(self) -> dict[str, Any]:
        return {"weights": [float(w) for w in self.weights], "bias": float(self.bias),
                "spec": dict(self.spec), "info": json.loads(json.dumps(self.info))}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChgnetLocalHead:
        return cls(tuple(float(w) for w in data["weights"]), float(data["bias"]),
                   dict(data["spec"]), dict(data.get("info") or {}))  # fmt: skip

    def check_matches(self, loaded: LoadedModel) -> None:
        """Raise ValueError unless the served CHGNet is the one this head was fitted on."""
        if loaded.chgnet is None:
            raise ValueError("the model serves no CHGNet head")
        if dict(loaded.chgnet.spec) != self.spec:
            raise ValueError(f"CHGNet local head fitted on {self.spec}, the model serves "
                             f"{loaded.chgnet.spec}: refit it")  # fmt: skip


@dataclass(frozen=True)
class LocalVoltageHead:
    """One linear map per backbone from an atom vector to a local voltage (volts).

    ``weights[k]`` and ``biases[k]`` belong to backbone k of ``LoadedModel.backbones()``.
    ``info`` carries json-able provenance (ion, split fitted on, metrics) for reports.
    """

    weights: tuple[tuple[float, ...], ...]
    biases: tuple[float, ...]
    backbone_fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)
    chgnet: ChgnetLocalHead | None = None  # for a model that serves a CHGNet head

    def __post_init__(self) -> None:
        if not self.weights or len(self.weights) != len(self.biases):
            raise ValueError("LocalVoltageHead needs one bias per weight vector (>= 1)")
        if len({len(w) for w in self.weights}) != 1:
            raise ValueError("all weight vectors must have the same length")

    @property
    def n_members(self) -> int:
        return len(self.weights)

    @property
    def n_features(self) -> int:
        return len(self.weights[0])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(W (K, F), b (K,)) float32 tensors."""
        w = torch.tensor(self.weights, dtype=torch.float32)
        b = torch.tensor(self.biases, dtype=torch.float32)
        return w, b

    def local(self, atom_vectors: Sequence[Tensor | np.ndarray]) -> np.ndarray:
        """Local voltage per atom (N,), averaged over backbones, from each backbone's (N, F)."""
        return self._apply(atom_vectors)

    def crystal(self, pooled: Sequence[Tensor | np.ndarray]) -> np.ndarray:
        """Crystal voltage (n,) from each backbone's mean atom vectors (n, F): mean of ``local``."""
        return self._apply(pooled)

    def _apply(self, per_member: Sequence[Tensor | np.ndarray]) -> np.ndarray:
        if len(per_member) != self.n_members:
            raise ValueError(f"got {len(per_member)} backbones' vectors, head has {self.n_members}")
        w = np.asarray(self.weights, dtype=np.float64)
        out = None
        for k, x in enumerate(per_member):
            arr = x.detach().double().numpy() if isinstance(x, Tensor) else np.asarray(x, float)
            v = arr @ w[k] + self.biases[k]
            out = v if out is None else out + v
        return out / self.n_members  # type: ignore[operator]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain lists/str/float (safe in checkpoint ``extra`` and in JSON)."""
        return {
            "format": HEAD_FORMAT,
            "version": HEAD_VERSION,
            "weights": [list(map(float, w)) for w in self.weights],
            "biases": [float(b) for b in self.biases],
            "backbone_fingerprint": self.backbone_fingerprint,
            "info": json.loads(json.dumps(self.info)),
            **({} if self.chgnet is None else {"chgnet": self.chgnet.to_dict()}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalVoltageHead:
        if data.get("format") != HEAD_FORMAT or data.get("version") != HEAD_VERSION:
            raise ValueError(
                f"not a {HEAD_FORMAT} v{HEAD_VERSION} dict "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        return cls(
            weights=tuple(tuple(float(x) for x in w) for w in data["weights"]),
            biases=tuple(float(b) for b in data["biases"]),
            backbone_fingerprint=str(data["backbone_fingerprint"]),
            info=dict(data.get("info") or {}),
            chgnet=_chgnet_head(data.get("chgnet")),
        )

    def save(self, path: str | Path) -> Path:
        """JSON sidecar, written atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LocalVoltageHead:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> LocalVoltageHead | None:
        """The head stored under ``extra["local_voltage_head"]`` of a checkpoint, if any."""
        data = extra.get(EXTRA_KEY)
        return None if data is None else cls.from_dict(data)

    def check_matches(self, loaded: LoadedModel) -> None:
        """Raise ValueError unless this head was fitted on ``loaded``'s backbones (and, for a
        model serving a CHGNet head, on its CHGNet)."""
        if loaded.needs_chgnet:
            if self.chgnet is None:
                raise ValueError("the model serves a CHGNet head; this local-voltage head has "
                                 "no CHGNet part: refit it")  # fmt: skip
            self.chgnet.check_matches(loaded)
        n = len(loaded.backbones())
        if n != self.n_members:
            raise ValueError(f"head has {self.n_members} backbone(s), the model has {n}")
        found = backbone_fingerprint(loaded)
        if found != self.backbone_fingerprint:
            raise ValueError(
                "local-voltage head was fitted on other backbones "
                f"(head {self.backbone_fingerprint}, model {found}): refit it for this model"
            )


def _chgnet_head(data: Mapping[str, Any] | None) -> ChgnetLocalHead | None:
    return None if data is None else ChgnetLocalHead.from_dict(data)


# =============================================================================== applying
@torch.inference_mode()
def member_atom_vectors(loaded: LoadedModel, batch: GraphBatch) -> list[Tensor]:
    """Each backbone's atom vectors after the last convolution, (N, F) each, eval mode."""
    out = []
    for model, _ in loaded.backbones():
        model.eval()
        out.append(model.atom_embeddings(batch))
    return out


def local_voltages_for_graphs(
    voltage_model: VoltageModel, graphs: Sequence[CrystalGraph], head: LocalVoltageHead
) -> list[np.ndarray]:
    """Local voltage of every site of every graph (one array per graph), no fingerprint check."""
    batch = collate(list(graphs), voltage_model.converter, voltage_model.encoding)
    local = head.local(member_atom_vectors(voltage_model.loaded, batch))
    bounds = np.cumsum([0, *(g.n_atoms for g in graphs)])
    return [local[a:b] for a, b in itertools.pairwise(bounds)]


def explain(
    voltage_model: VoltageModel, structure: Structure, head: LocalVoltageHead, check: bool = True
) -> list[dict[str, Any]]:
    """Per-site local voltages of one structure: ``[{"site", "element", "local_voltage"}, ...]``.

    Their mean is the head's crystal prediction (not the MLP ensemble's, which is non-linear);
    ``check`` verifies the head belongs to this model's backbones (costs ~1 ms of hashing; a
    service may check once at load time and pass ``check=False``).
    """
    if check:
        head.check_matches(voltage_model.loaded)
    graph = voltage_model.converter.convert(structure)
    return explain_graph(voltage_model, structure, graph, head)


def explain_graph(
    voltage_model: VoltageModel, structure: Structure, graph: Any, head: LocalVoltageHead
) -> list[dict[str, Any]]:
    """``explain`` for a structure whose input is already prepared (the service has it): the
    CGCNN head's local voltages, the CHGNet head's, or their mix with the served CHGNet share
    (the model's prediction is that mixture, so the local voltages follow it)."""
    from voltage_model.predict import ModelInput

    loaded = voltage_model.loaded
    weight = 0.0 if loaded.chgnet is None else loaded.chgnet.weight
    local = 0.0
    cgcnn = graph.graph if isinstance(graph, ModelInput) else graph
    if weight < 1.0:
        local = (1 - weight) * local_voltages_for_graphs(voltage_model, [cgcnn], head)[0]
    if weight > 0.0:
        if head.chgnet is None or not isinstance(graph, ModelInput):
            raise ValueError("CHGNet local voltages need the CHGNet head and CHGNet's graph")
        from voltage_model.models.chgnet_backbone import graph_outputs

        atoms = graph_outputs([graph.chgnet_graph])[0]["atom_fea"]
        local = local + weight * head.chgnet.local(atoms)
    return [
        {"site": i, "element": site.specie.symbol, "local_voltage": float(v)}
        for i, (site, v) in enumerate(zip(structure, local, strict=True))
    ]
