"""Crystal Graph Convolutional Neural Network (Xie & Grossman 2018) as used by Zhang et al. 2022.

Two algebraically equal forms of the gated convolution are implemented:

* the *fast* form (default) splits the concatenation-linear ``W [v_i ++ v_j ++ u_ij]`` into
  ``W_i v_i + W_j v_j + W_e u_ij``.  ``W_i v_i`` and ``W_j v_j`` are computed once per atom and
  broadcast / gathered onto the edges, so the (N, M, 2F + B) concatenation and its large matmul
  never exist; only the cheap (E, B) x (B, 2F) edge matmul remains.
* the *plain* form (``plain=True``) is the literal concatenation of the reference implementation,
  kept as the ground truth for tests and as the naive baseline of ``bench/train_throughput.py``.

Padded neighbour slots (``nbr_mask == 0``) contribute nothing, and they are also excluded from the
edge BatchNorm statistics, so padding a batch never changes its output.

CPU performance notes (2 cores, measured; see bench/train_throughput.py): the edge part of each
conv is one ``autograd.Function`` with a hand-written backward (saves 4 edge tensors instead of
~10, no chunk/cat copies, BatchNorm backward folded into two passes); gathers are ``index_select``
and their adjoints CSR spmm (CPU ``index_add_`` is serial and ~10x slower); pooling is one spmm.
torch.compile was measured slower (graph breaks) and is not used.

The module knows nothing about optimisers, losses or logging; it maps a ``GraphBatch`` to one
normalised scalar per crystal.  Layer names (``embedding``, ``convs[k].fc_full/bn1/bn2``,
``conv_to_fc``, ``fcs``, ``fc_out``) follow the reference CGCNN so transfer learning can address
the head by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GraphBatchLike(Protocol):
    """The slice of ``voltage_model.graphs.batch.GraphBatch`` the model reads (see
    docs/CONTRACTS.md)."""

    atom_fea: Tensor  # (N, 92) float32
    nbr_idx: Tensor  # (N, M) int64, batch-global atom indices
    nbr_fea: Tensor  # (N, M, 41) float32 Gaussian-expanded distances
    nbr_mask: Tensor  # (N, M) float32, 1 = real neighbour
    crystal_idx: Tensor  # (N,) int64
    n_crystals: int


@dataclass(frozen=True)
class CGCNNConfig:
    """Architecture hyper-parameters; defaults are those of the reference CGCNN."""

    orig_atom_fea_len: int = 92
    nbr_fea_len: int = 41
    atom_fea_len: int = 64
    h_fea_len: int = 128
    n_conv: int = 3
    n_h: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"CGCNNConfig.{f.name} must be a non-negative int, got {value!r}")
        if self.n_h < 1:
            raise ValueError("CGCNNConfig.n_h must be >= 1 (conv_to_fc is the first hidden layer)")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CGCNNConfig:
        """Strict: an unknown key means the checkpoint was written by a different model version."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CGCNNConfig keys: {sorted(unknown)}")
        return cls(**{k: int(v) for k, v in data.items()})


def scatter_matrix(index: Tensor, n_rows: int, values: Tensor | None = None) -> Tensor:
    """CSR matrix A (n_rows, len(index)) with A[index[e], e] = values[e] (default 1).

    ``A @ x`` sums the rows of ``x`` into ``index`` buckets.  On CPU ``index_add_``/``scatter_add_``
    run serially (~10x slower on CGCNN-sized edge tensors); a CSR spmm is parallel and
    deterministic (every output row is summed in a fixed order).
    """
    n = index.numel()
    order = _stable_argsort(index)
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=n_rows), 0, out=crow[1:])
    vals = torch.ones(n, device=index.device) if values is None else values[order]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, order, vals, size=(n_rows, n), check_invariants=False)


def _stable_argsort(index: Tensor) -> Tensor:
    """Stable argsort; numpy on CPU, where torch's parallel sort stalls on 2 busy cores."""
    if index.device.type == "cpu":
        return torch.from_numpy(np.argsort(index.numpy(), kind="stable"))
    return torch.argsort(index, stable=True)


@dataclass
class Edges:
    """Real (unpadded) edges of a batch, built once per forward and shared by every conv layer.

    ``dense`` is the common case (every atom has M real neighbours): edge e = i * M + m, so the
    centre-atom gather / sum become free reshapes.  Otherwise only real edges are kept and
    ``src`` maps each edge to its centre atom.  The CSR scatter matrices (backward of the
    gathers) are built lazily, so inference never pays for them.
    """

    n_atoms: int
    n_nbr: int
    dense: bool
    dst: Tensor  # (E,) neighbour atom index
    fea: Tensor  # (E, B) Gaussian-expanded distance
    src: Tensor | None  # (E,) centre atom index; None when dense
    _dst_scatter: Tensor | None = field(default=None, repr=False)
    _src_scatter: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_batch(cls, batch: GraphBatchLike) -> Edges:
        n_atoms, n_nbr = batch.nbr_idx.shape
        dst = batch.nbr_idx.reshape(-1)
        fea = batch.nbr_fea.reshape(n_atoms * n_nbr, -1)
        real = (batch.nbr_mask > 0.5).reshape(-1)
        if bool(real.all()):
            return cls(n_atoms, n_nbr, True, dst, fea, None)
        keep = real.nonzero().squeeze(1)
        src = torch.div(keep, n_nbr, rounding_mode="floor")
        return cls(n_atoms, n_nbr, False, dst[keep], fea[keep], src)

    def _scatter(self, index: Tensor) -> Tensor:
        return scatter_matrix(index, self.n_atoms, torch.ones_like(index, dtype=self.fea.dtype))

    def sum_by_dst(self, x: Tensor) -> Tensor:
        """(E, C) -> (N, C): adjoint of ``x.index_select(0, dst)``."""
        if self._dst_scatter is None:
            self._dst_scatter = self._scatter(self.dst)
        return self._dst_scatter @ x

    def sum_by_src(self, x: Tensor) -> Tensor:
        """(E, C) -> (N, C): sum messages onto their centre atoms."""
        if self.dense:
            return x.view(self.n_atoms, self.n_nbr, -1).sum(dim=1)
        if self._src_scatter is None:
            self._src_scatter = self._scatter(self.src)  # type: ignore[arg-type]
        return self._src_scatter @ x

    def add_src_(self, x: Tensor, atom: Tensor) -> Tensor:
        """In place x (E, C) += atom[src] (no gather materialised when dense)."""
        if self.dense:
            x.view(self.n_atoms, self.n_nbr, -1).add_(atom.unsqueeze(1))
        else:
            x.add_(atom.index_select(0, self.src))  # type: ignore[arg-type]
        return x

    def mul_src(self, x: Tensor, atom: Tensor) -> Tensor:
        """x (E, C) * atom[src] as a new tensor."""
        if self.dense:
            return (x.view(self.n_atoms, self.n_nbr, -1) * atom.unsqueeze(1)).view(x.shape)
        return x * atom.index_select(0, self.src)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _BNMode:
    """How the edge BatchNorm behaves in this call (mirrors ``nn.BatchNorm1d.forward``)."""

    batch_stats: bool
    running_mean: Tensor | None
    running_var: Tensor | None
    momentum: float
    eps: float

    @classmethod
    def of(cls, bn: nn.BatchNorm1d) -> _BNMode:
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                momentum = 1.0 / float(bn.num_batches_tracked)
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        keep_running = not bn.training or bn.track_running_stats
        return cls(
            batch_stats,
            bn.running_mean if keep_running else None,
            bn.running_var if keep_running else None,
            momentum,
            bn.eps,
        )


class _GatedEdges(torch.autograd.Function):
    """Fused edge part of the fast conv: sum_j sigmoid(BN(z)_f) * softplus(BN(z)_c).

    z_ij = centre_i + nbr_j + W_e u_ij, with centre = W_i v + b and nbr = W_j v computed per
    atom.  Eager autograd would keep ~8 edge-sized (E, 2F) intermediates alive and pay a serial
    scatter in the gather backward; here only z is saved, everything else is recomputed in a
    hand-written backward, elementwise work is done in place and the scatter is a CSR spmm.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        centre: Tensor,
        nbr: Tensor,
        w_edge: Tensor,
        gamma: Tensor,
        beta: Tensor,
        edges: Edges,
        bn: _BNMode,
        need_grad: bool,
    ) -> Tensor:
        z = nbr.index_select(0, edges.dst)
        z.addmm_(edges.fea, w_edge.t())
        edges.add_src_(z, centre)
        if bn.batch_stats:
            y, mean, invstd = torch.native_batch_norm(
                z, gamma, beta, bn.running_mean, bn.running_var, True, bn.momentum, bn.eps
            )
        else:
            mean = bn.running_mean  # type: ignore[assignment]
            invstd = torch.rsqrt(bn.running_var + bn.eps)  # type: ignore[operator]
            y = _affine(z, mean, invstd, gamma, beta)
        f = y.shape[1] // 2
        sig_f = torch.sigmoid(y[:, :f])
        sp_c = F.softplus(y[:, f:])
        if not need_grad:  # inference: no saved tensors, message computed in place
            return edges.sum_by_src(sp_c.mul_(sig_f))
        sig_c = torch.sigmoid(y[:, f:])
        del y
        msg = sig_f * sp_c
        ctx.save_for_backward(z, mean, invstd, gamma, sig_f, sig_c, sp_c)
        ctx.edges = edges
        ctx.batch_stats = bn.batch_stats
        return edges.sum_by_src(msg)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, mean, invstd, gamma, sig_f, sig_c, sp_c = ctx.saved_tensors
        edges: Edges = ctx.edges
        n_edges, c = z.shape
        f = c // 2
        t = edges.mul_src(sig_f, grad_out)  # d msg * sigmoid(filter)
        dy = torch.empty_like(z)
        torch.mul(t, sig_c, out=dy[:, f:])  # d core = t * sigmoid(core)
        t.mul_(sp_c)  # d filter = t * softplus(core) * (1 - sigmoid(filter))
        torch.addcmul(t, t, sig_f, value=-1.0, out=dy[:, :f])
        del t
        d_beta = dy.sum(0)
        d_gamma = ((dy * z).sum(0) - mean * d_beta) * invstd  # = sum(dy * z_hat)
        scale = gamma * invstd
        if ctx.batch_stats:  # BN backward through the batch statistics, folded into 2 passes
            b = -scale * invstd * d_gamma / n_edges
            dz = torch.addcmul(-scale * d_beta / n_edges - b * mean, z, b)
            dz.addcmul_(dy, scale)
        else:
            dz = dy.mul_(scale)
        need = ctx.needs_input_grad
        d_centre = edges.sum_by_src(dz) if need[0] else None
        d_nbr = edges.sum_by_dst(dz) if need[1] else None
        d_w = dz.t() @ edges.fea if need[2] else None
        return d_centre, d_nbr, d_w, d_gamma, d_beta, None, None, None


def _affine(z: Tensor, mean: Tensor, invstd: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """BN output gamma * (z - mean) * invstd + beta in one pass over z."""
    scale = gamma * invstd
    return torch.addcmul(beta - mean * scale, z, scale)


class ConvLayer(nn.Module):
    """Gated graph convolution: v_i <- softplus(v_i + BN(sum_j sigmoid(z_f) * softplus(z_c)))."""

    def __init__(self, atom_fea_len: int, nbr_fea_len: int) -> None:
        super().__init__()
        self.atom_fea_len = atom_fea_len
        self.nbr_fea_len = nbr_fea_len
        self.fc_full = nn.Linear(2 * atom_fea_len + nbr_fea_len, 2 * atom_fea_len)
        self.bn1 = nn.BatchNorm1d(2 * atom_fea_len)
        self.bn2 = nn.BatchNorm1d(atom_fea_len)

    def forward(self, atom: Tensor, edges: Edges) -> Tensor:
        """Fast form: per-atom W_i v_i, W_j v_j; per-edge only W_e u_ij; fused edge kernel."""
        f = self.atom_fea_len
        w = self.fc_full.weight
        if edges.dst.numel() == 0:  # no real neighbour anywhere: nothing to aggregate
            return self._finish(atom, atom.new_zeros(atom.shape[0], f))
        centre = F.linear(atom, w[:, :f], self.fc_full.bias)
        nbr = F.linear(atom, w[:, f : 2 * f])
        inputs = (centre, nbr, w[:, 2 * f :], self.bn1.weight, self.bn1.bias)
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        summed = _GatedEdges.apply(*inputs, edges, _BNMode.of(self.bn1), need_grad)
        return self._finish(atom, summed)

    def forward_plain(
        self, atom: Tensor, nbr_idx: Tensor, nbr_fea: Tensor, nbr_mask: Tensor
    ) -> Tensor:
        """Literal reference form: one Linear on the (N, M, 2F + B) concatenation."""
        n, m = nbr_idx.shape
        f = self.atom_fea_len
        z = torch.cat([atom.unsqueeze(1).expand(n, m, f), atom[nbr_idx], nbr_fea], dim=2)
        gated = self.fc_full(z)
        real = nbr_mask > 0.5
        if bool(real.all()):
            msg = self._message(gated.view(n * m, 2 * f)).view(n, m, f)
        else:  # BN statistics over real neighbours only; padded slots stay exactly zero
            msg = gated.new_zeros(n, m, f)
            if bool(real.any()):
                msg[real] = self._message(gated[real])
        return self._finish(atom, msg.sum(dim=1))

    def _message(self, gated: Tensor) -> Tensor:
        filt, core = self.bn1(gated).chunk(2, dim=1)
        return torch.sigmoid(filt) * F.softplus(core)

    def _finish(self, atom: Tensor, summed: Tensor) -> Tensor:
        return F.softplus(atom + self.bn2(summed))


def _mlp_head(
    pooled: Tensor, conv_to_fc: nn.Linear, fcs: nn.ModuleList, fc_out: nn.Linear
) -> Tensor:
    """Reference CGCNN head: softplus -> conv_to_fc -> softplus -> [fc -> softplus]* -> fc_out."""
    h = F.softplus(conv_to_fc(F.softplus(pooled)))
    for fc in fcs:
        h = F.softplus(fc(h))
    return fc_out(h).squeeze(-1)


def _make_head_layers(cfg: CGCNNConfig) -> tuple[nn.Linear, nn.ModuleList, nn.Linear]:
    conv_to_fc = nn.Linear(cfg.atom_fea_len, cfg.h_fea_len)
    fcs = nn.ModuleList(nn.Linear(cfg.h_fea_len, cfg.h_fea_len) for _ in range(cfg.n_h - 1))
    return conv_to_fc, fcs, nn.Linear(cfg.h_fea_len, 1)


class CGCNN(nn.Module):
    """CGCNN regressor: ``forward(batch) -> (n_crystals,)`` in normalised target units."""

    def __init__(self, config: CGCNNConfig | None = None) -> None:
        super().__init__()
        self.config = config or CGCNNConfig()
        cfg = self.config
        self.embedding = nn.Linear(cfg.orig_atom_fea_len, cfg.atom_fea_len)
        self.convs = nn.ModuleList(
            ConvLayer(cfg.atom_fea_len, cfg.nbr_fea_len) for _ in range(cfg.n_conv)
        )
        self.conv_to_fc, self.fcs, self.fc_out = _make_head_layers(cfg)

    # -- backbone -------------------------------------------------------------------------------
    def atom_embeddings(self, batch: GraphBatchLike, plain: bool = False) -> Tensor:
        """Atom vectors after the last conv, (N, atom_fea_len): input of per-atom voltage heads."""
        atom = self.embedding(batch.atom_fea)
        if plain:
            for conv in self.convs:
                atom = conv.forward_plain(atom, batch.nbr_idx, batch.nbr_fea, batch.nbr_mask)
            return atom
        edges = Edges.from_batch(batch)
        for conv in self.convs:
            atom = conv(atom, edges)
        return atom

    def pooled(self, batch: GraphBatchLike, plain: bool = False) -> Tensor:
        """Mean of atom vectors per crystal, (n_crystals, atom_fea_len): the input of the head.

        Exposed so transfer learning can precompute frozen-backbone features once.
        """
        atom = self.atom_embeddings(batch, plain=plain)
        if plain:
            return _mean_pool_loop(atom, batch.crystal_idx, batch.n_crystals)
        return mean_pool(atom, batch.crystal_idx, batch.n_crystals)

    # -- head -----------------------------------------------------------------------------------
    def head(self, pooled: Tensor) -> Tensor:
        """Map pooled crystal vectors (n, atom_fea_len) to normalised predictions (n,)."""
        return _mlp_head(pooled, self.conv_to_fc, self.fcs, self.fc_out)

    def forward(self, batch: GraphBatchLike, plain: bool = False) -> Tensor:
        return self.head(self.pooled(batch, plain=plain))

    def head_parameters(self) -> list[nn.Parameter]:
        """conv_to_fc + fcs + fc_out: what transfer learning fine-tunes (``trainable_params``)."""
        return [*self.conv_to_fc.parameters(), *self.fcs.parameters(), *self.fc_out.parameters()]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """embedding + convs: the shared feature extractor."""
        return [*self.embedding.parameters(), *self.convs.parameters()]


class _MeanPool(torch.autograd.Function):
    """Per-crystal mean as one CSR spmm (CPU index_add_ is serial); backward is a gather."""

    @staticmethod
    def forward(ctx: Any, atom: Tensor, crystal_idx: Tensor, n_crystals: int) -> Tensor:  # type: ignore[override]
        counts = torch.bincount(crystal_idx, minlength=n_crystals).clamp_(min=1)
        inv = counts.to(atom.dtype).reciprocal_()
        ctx.save_for_backward(crystal_idx, inv)
        return scatter_matrix(crystal_idx, n_crystals, inv[crystal_idx]) @ atom

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        crystal_idx, inv = ctx.saved_tensors
        return (grad * inv.unsqueeze(1)).index_select(0, crystal_idx), None, None


def mean_pool(atom: Tensor, crystal_idx: Tensor, n_crystals: int) -> Tensor:
    """Mean of atom rows per crystal, (n_crystals, F), without a Python loop over crystals."""
    return _MeanPool.apply(atom, crystal_idx, n_crystals)


def _mean_pool_loop(atom: Tensor, crystal_idx: Tensor, n_crystals: int) -> Tensor:
    """Reference-style pooling, one Python iteration per crystal (naive baseline only)."""
    rows = [atom[crystal_idx == c].mean(dim=0, keepdim=True) for c in range(n_crystals)]
    return torch.cat(rows, dim=0)


class Head(nn.Module):
    """A standalone (conv_to_fc, fcs, fc_out) head; state_dict keys match the CGCNN subset."""

    def __init__(self, config: CGCNNConfig) -> None:
        super().__init__()
        self.conv_to_fc, self.fcs, self.fc_out = _make_head_layers(config)

    @classmethod
    def from_model(cls, model: CGCNN) -> Head:
        """Copy the current head weights of ``model``."""
        head = cls(model.config)
        head.load_state_dict(head_state_dict(model))
        return head

    def forward(self, pooled: Tensor) -> Tensor:
        return _mlp_head(pooled, self.conv_to_fc, self.fcs, self.fc_out)


HEAD_PREFIXES = ("conv_to_fc.", "fcs.", "fc_out.")


def head_state_dict(model: CGCNN) -> dict[str, Tensor]:
    """The head part of a CGCNN state_dict (keys loadable into ``Head``)."""
    return {
        k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIXES)
    }


class EnsembleHead(nn.Module):
    """K heads over one shared backbone: ``forward(batch) -> (K, n_crystals)``.

    The spread across heads is a cheap uncertainty estimate; the backbone runs once per batch.
    """

    def __init__(self, backbone: CGCNN, heads: Sequence[Head]) -> None:
        super().__init__()
        if not heads:
            raise ValueError("EnsembleHead needs at least one head")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)

    def forward(self, batch: GraphBatchLike) -> Tensor:
        pooled = self.backbone.pooled(batch)
        return torch.stack([head(pooled) for head in self.heads], dim=0)
