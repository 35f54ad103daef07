"""Training loop for CGCNN: optimiser/scheduler from a config, best-epoch selection on val MAE.

Deliberately loader-agnostic: a "loader" is any re-iterable of GraphBatch-shaped objects
(attributes per docs/CONTRACTS.md, ``target`` in volts), so the cached GraphLoader, a list of
pre-collated batches and transfer-learning feature loaders all work.  Tuning (Optuna) and
tracking (MLflow) hook in through ``on_epoch`` instead of being imported here.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from training.train.metrics import regression_metrics
from voltage_model.normalizer import Normalizer
from voltage_model.numerics import usable_cores

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("step", "multistep", "cosine", "onecycle", "none")
LOSSES = ("mse", "l1", "huber")

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    """Optimisation settings; defaults follow the reference CGCNN (SGD 0.01, momentum 0.9).

    ``batch_size`` is not used by ``fit`` itself (the caller builds the loaders) but lives here
    so one config object describes a run.  ``num_threads`` None keeps torch's default (= cores).
    """

    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "multistep"
    milestones: list[int] = field(default_factory=lambda: [100])
    gamma: float = 0.1
    step_size: int = 30
    seed: int = 0
    device: str = "cpu"
    log_every: int = 1
    grad_clip: float | None = None
    num_threads: int | None = None
    loss: str = "mse"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.log_every < 1:
            raise ValueError("epochs, batch_size, log_every must be >= 1 and lr > 0")
        self.milestones = [int(m) for m in self.milestones]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> TrainConfig:
        """Build from a params.yaml section; unknown keys are an error unless ``strict=False``."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown and strict:
            raise ValueError(f"unknown TrainConfig keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FitResult:
    """Outcome of ``fit``; the model itself already holds ``best_state`` when fit returns."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_mae: float
    best_state: dict[str, Tensor]
    train_seconds: float

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.history[self.best_epoch - 1]


# -- runtime ------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) so a run is repeatable end to end."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


_MALLOC_TUNED = False


def tune_cpu_runtime(num_threads: int | None = None) -> None:
    """Set torch threads, flush denormals, and keep glibc from unmapping big buffers per op.

    CGCNN edge tensors are tens of MB; glibc serves those with mmap/munmap, so every op pays
    ~10k page faults on first touch (measured on 2 cores: fast form 600 -> 865 crystals/s).
    Raising the mmap and trim thresholds keeps them in the heap for reuse (no-op off glibc).
    ``num_threads`` None caps torch at the cores this process may actually use (cpusets).
    Process-wide and idempotent; the cost is that peak RSS is not given back until exit.
    """
    global _MALLOC_TUNED
    n = usable_cores() if num_threads is None else int(num_threads)
    torch.set_num_threads(max(1, min(n, torch.get_num_threads()) if num_threads is None else n))
    torch.set_flush_denormal(True)  # subnormal floats cost ~100x per op on x86; values < 1e-38
    if _MALLOC_TUNED or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
        _MALLOC_TUNED = True
    except (OSError, AttributeError):  # musl or no libc.so.6: keep defaults
        log.debug("mallopt unavailable; keeping default allocator settings")


# -- optimiser / scheduler ----------------------------------------------------------------------
def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.LRScheduler | None, bool]:
    """Return (scheduler, steps_per_batch).  Only OneCycle is stepped per batch."""
    lrs = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        return lrs.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma), False
    if cfg.scheduler == "multistep":
        return lrs.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma), False
    if cfg.scheduler == "cosine":
        return lrs.CosineAnnealingLR(opt, T_max=cfg.epochs), False
    if cfg.scheduler == "onecycle":
        total = max(1, cfg.epochs * steps_per_epoch)
        return lrs.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total), True
    return None, False


# -- batches ------------------------------------------------------------------------------------
def batch_to(batch: Any, device: torch.device) -> Any:
    """Move a GraphBatch-like object to ``device`` (no-op when already there)."""
    if batch.atom_fea.device == device:
        return batch
    if hasattr(batch, "to"):
        return batch.to(device)
    if dataclasses.is_dataclass(batch):
        moved = {
            f.name: getattr(batch, f.name).to(device)
            for f in fields(batch)
            if isinstance(getattr(batch, f.name), Tensor)
        }
        return dataclasses.replace(batch, **moved)
    raise TypeError(f"cannot move {type(batch).__name__} to {device}")


def _count_batches(loader: Iterable[Any]) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return sum(1 for _ in loader)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# -- training -----------------------------------------------------------------------------------
def _freeze_except(model: nn.Module, trainable: Sequence[nn.Parameter]) -> dict[str, bool]:
    """requires_grad only on ``trainable``; returns the previous flags for restoring."""
    keep = {id(p) for p in trainable}
    previous = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return previous


def _set_train_mode(model: nn.Module, partial: bool) -> None:
    """Train mode, except BatchNorm layers with no trainable parameter stay in eval mode.

    Otherwise a "frozen" backbone would still drift through its running statistics.
    """
    model.train()
    if not partial:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            module.eval()


def loss_function(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The training loss on normalised targets. MSE is the paper's; L1 optimises the reported
    MAE directly; Huber (delta 1 normalised unit) is MSE near zero and L1 on outliers."""
    if name == "l1":
        return nn.functional.l1_loss
    if name == "huber":
        return nn.functional.huber_loss
    return nn.functional.mse_loss


def _train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    opt: torch.optim.Optimizer,
    batch_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    normalizer: Normalizer,
    cfg: TrainConfig,
) -> tuple[float, float, int]:
    """One pass over ``loader``: (mean normalised training loss, MAE in volts, crystals seen);
    ``cfg``'s device, gradient clipping and loss."""
    device, grad_clip, loss_fn = torch.device(cfg.device), cfg.grad_clip, loss_function(cfg.loss)
    params = [p for group in opt.param_groups for p in group["params"]]
    sq_sum = abs_sum = 0.0
    n_seen = 0
    for raw in loader:
        batch = batch_to(raw, device)
        target = normalizer.norm(batch.target.to(device=device, dtype=torch.float32))
        pred = model(batch)
        loss = loss_fn(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        n = int(target.shape[0])
        sq_sum += float(loss.detach()) * n
        abs_sum += float((pred.detach() - target).abs().sum()) * normalizer.std
        n_seen += n
    if n_seen == 0:
        raise ValueError("training loader yielded no crystals")
    return sq_sum / n_seen, abs_sum / n_seen, n_seen


@dataclass(frozen=True)
class FitLoaders:
    """The batches ``fit`` trains on and, optionally, those it chooses the epoch on."""

    train: Iterable[Any]
    val: Iterable[Any] | None = None


def fit(
    model: nn.Module,
    loaders: FitLoaders,
    cfg: TrainConfig,
    normalizer: Normalizer,
    on_epoch: EpochCallback | None = None,
    trainable_params: Iterable[nn.Parameter] | None = None,
) -> FitResult:
    """Train on normalised targets (``cfg.loss``); keep and restore the best val-MAE epoch.

    ``on_epoch(epoch, metrics)`` runs after every epoch (Optuna pruning, MLflow logging); any
    exception it raises (e.g. ``optuna.TrialPruned``) propagates after the best weights so far
    are restored.  ``trainable_params`` restricts optimisation (transfer learning); BatchNorm
    layers without trainable parameters are then kept in eval mode.  Without ``loaders.val`` the
    best epoch is chosen on training loss.  The model is left in eval mode.
    """
    train_loader, val_loader = loaders.train, loaders.val
    device = torch.device(cfg.device)
    if device.type == "cpu":
        tune_cpu_runtime(cfg.num_threads)
    set_seed(cfg.seed)
    model.to(device)
    partial = trainable_params is not None
    params = (
        list(trainable_params)  # type: ignore[arg-type]
        if partial
        else [p for p in model.parameters() if p.requires_grad]
    )
    if not params:
        raise ValueError("no trainable parameters")
    previous_flags = _freeze_except(model, params) if partial else None
    opt = build_optimizer(params, cfg)
    steps = _count_batches(train_loader) if cfg.scheduler == "onecycle" else 1
    scheduler, per_batch = build_scheduler(opt, cfg, steps)

    history: list[dict[str, float]] = []
    best_state: dict[str, Tensor] | None = None
    best_score, best_epoch = math.inf, 0
    t_start = time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            lr = float(opt.param_groups[0]["lr"])
            t0 = time.perf_counter()
            _set_train_mode(model, partial)
            batch_scheduler = scheduler if per_batch else None
            loss, train_mae, n_seen = _train_epoch(
                model, train_loader, opt, batch_scheduler, normalizer, cfg
            )
            train_s = time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss} at epoch {epoch}")
            if scheduler is not None and not per_batch:
                scheduler.step()
            metrics = {"epoch": float(epoch), "train_loss": loss, "train_mae": train_mae, "lr": lr}
            if val_loader is not None:
                val = evaluate(model, val_loader, normalizer)
                metrics.update({f"val_{k}": v for k, v in val.items() if k != "n"})
            metrics["epoch_seconds"] = time.perf_counter() - t0
            metrics["crystals_per_s"] = n_seen / train_s if train_s > 0 else math.inf
            history.append(metrics)
            score = metrics.get("val_mae", loss)
            score = score if math.isfinite(score) else math.inf  # NaN never wins...
            improved = best_state is None or score < best_score  # ...but epoch 1 is kept
            if improved:
                best_score, best_epoch = score, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if epoch % cfg.log_every == 0 or epoch == cfg.epochs or epoch == 1:
                log.info(_format_epoch(metrics, cfg.epochs, improved))
            if on_epoch is not None:
                on_epoch(epoch, metrics)
    finally:
        if best_state is not None:
            model.load_state_dict(best_state)
        if previous_flags is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(previous_flags[name])
        model.eval()
    assert best_state is not None  # epochs >= 1 and no exception
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_val_mae=float(history[best_epoch - 1].get("val_mae", math.nan)),
        best_state=best_state,
        train_seconds=time.perf_counter() - t_start,
    )


def _format_epoch(m: dict[str, float], epochs: int, improved: bool) -> str:
    val = f" val_mae {m['val_mae']:.4f} V" if "val_mae" in m else ""
    return (
        f"epoch {int(m['epoch']):>4d}/{epochs} loss {m['train_loss']:.4f} "
        f"train_mae {m['train_mae']:.4f} V{val} lr {m['lr']:.2e} "
        f"{m['epoch_seconds']:.1f}s {m['crystals_per_s']:.0f} cryst/s{' *' if improved else ''}"
    )


# -- inference ----------------------------------------------------------------------------------
@torch.inference_mode()
def predict(
    model: nn.Module, loader: Iterable[Any], normalizer: Normalizer
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, y_true, y_pred) in volts, eval mode; y_true is nan where a batch has no target."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    ids: list[str] = []
    trues: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    try:
        for raw in loader:
            batch = batch_to(raw, device)
            pred = normalizer.denorm(model(batch).double().cpu().numpy())
            preds.append(pred)
            target = getattr(batch, "target", None)
            trues.append(
                np.full(pred.shape, np.nan)
                if target is None
                else target.detach().double().cpu().numpy()
            )
            ids.extend(batch.ids)
    finally:
        model.train(was_training)
    if not preds:
        return ids, np.empty(0), np.empty(0)
    return ids, np.concatenate(trues), np.concatenate(preds)


def evaluate(model: nn.Module, loader: Iterable[Any], normalizer: Normalizer) -> dict[str, float]:
    """regression_metrics (MAE/RMSE/R^2 in volts) of ``model`` on ``loader``."""
    _, y_true, y_pred = predict(model, loader, normalizer)
    return regression_metrics(y_true, y_pred)
