"""The one training loop.

Data stays as a uint8 tensor; each batch is converted to float and augmented
on the device in one go. Everything a recipe needs is a field of
:class:`TrainConfig`, validated when it is built.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import time
from typing import Callable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.training.augment import augment_batch


class TrainConfig(BaseModel):
    """Settings of one training run. Unknown fields and out-of-range values are rejected."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["none", "onecycle", "cosine", "plateau"] = "onecycle"
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="onecycle/cosine: share of steps warming up")
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    crop_padding: int = Field(0, ge=0, le=16)
    flip: bool = False
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    val_fraction: float = Field(0.0, ge=0, lt=0.9)
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_metric: Literal["val_loss", "val_acc"] = "val_loss"
    restore_best: bool = True
    channels_last: bool = True
    bf16: bool = False
    tta_flip: bool = False

    @model_validator(mode="after")
    def _needs_validation(self) -> "TrainConfig":
        if self.schedule == "plateau" and self.val_fraction == 0:
            raise ValueError("schedule 'plateau' watches validation accuracy: set val_fraction > 0")
        if self.early_stopping_patience is not None and self.val_fraction == 0:
            raise ValueError("early_stopping_patience needs a validation split: set val_fraction > 0")
        return self


BatchWeightFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(model, x, y) -> (B,)`` non-negative per-sample weights for one (augmented) training batch."""

# Lets a caller that only reaches fit() through someone else's trainer (a defence calling the
# runner's ctx.train_model) install a batch weight function without threading a new argument through.
_BATCH_WEIGHT_FN: contextvars.ContextVar[BatchWeightFn | None] = contextvars.ContextVar("batch_weight_fn",
                                                                                       default=None)


@contextlib.contextmanager
def batch_weighting(fn: BatchWeightFn) -> Iterator[None]:
    """Within this block, every :func:`fit` without its own ``batch_weight_fn`` uses ``fn``."""
    token = _BATCH_WEIGHT_FN.set(fn)
    try:
        yield
    finally:
        _BATCH_WEIGHT_FN.reset(token)


def _batches(n: int, batch_size: int, gen: torch.Generator | None, shuffle: bool):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # no weight decay on batch-norm and bias parameters
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.schedule in ("none", "plateau"):
        return 1.0
    warm = max(1, int(cfg.warmup_fraction * total))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    return max(0.0, 1.0 - t)  # onecycle: linear warm-up, linear decay to 0


def fit(
    model: nn.Module,
    train: ImageSet,
    cfg: TrainConfig | None = None,
    *,
    val: ImageSet | None = None,
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    description: str = "train",
    freeze_body: bool = False,
    epoch_callback: Callable[[dict, nn.Module], None] | None = None,
    batch_weight_fn: BatchWeightFn | None = None,
    batch_transform: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Train ``model`` in place on ``train``.

    Args:
        model: a :class:`~poisonlab.models.Classifier` (float [0, 1] NCHW input).
        train: the (possibly poisoned) training set.
        cfg: recipe; defaults to ``TrainConfig()``.
        val: validation set; if None and ``cfg.val_fraction > 0``, a stratified
            split of ``train`` is held out.
        sample_weight: optional non-negative weight per training sample
            (0 drops a sample); the loss is the weighted mean.
        seed: seeds initial shuffling and augmentation, so runs repeat.
        freeze_body: train only ``model.head``; the feature extractor keeps its
            weights and batch-norm statistics (transfer learning, as in Poison Frogs).
        batch_weight_fn: ``fn(model, x, y) -> (B,)`` weights computed per batch during
            training (e.g. learning-to-reweight); multiplied with ``sample_weight``.
            Defaults to the one installed by :func:`batch_weighting`, if any.
        batch_transform: ``fn(model, x, y) -> x`` replaces every augmented training batch before the
            forward pass (adversarial training: PGD examples); the model must be in train mode again on return.
        epoch_callback: called as ``epoch_callback(record, model)`` after each epoch
            (benchmarks use it to evaluate on the way).

    Returns:
        Per-epoch history: dicts with ``epoch, loss, acc, lr, seconds`` and,
        with validation, ``val_loss, val_acc``.
    """
    cfg = cfg or TrainConfig()
    batch_weight_fn = batch_weight_fn or _BATCH_WEIGHT_FN.get()
    device = torch.device(device) if device else next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    if weights is not None:
        if weights.shape != (len(train),) or (weights < 0).any():
            raise ValueError(f"sample_weight must be {len(train)} non-negative values, got shape {weights.shape}")
    if val is None and cfg.val_fraction > 0:
        rest, val, rest_idx, _ = train.split(cfg.val_fraction, seed=seed)
        train = rest
        weights = weights[rest_idx] if weights is not None else None
    x_all, y_all = train.tensors(device)
    w_all = torch.from_numpy(weights).to(device) if weights is not None else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if getattr(model, "needs_data_init", False) and not freeze_body:
        # data-dependent initialisation (e.g. FastNet's whitened stem) from a fixed sample of the training set
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:5000]
        model.data_init(x_all[sample.to(device)].float().div(255))
    if freeze_body:
        for p in model.body.parameters():
            p.requires_grad_(False)
    opt = _make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    plateau = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
               if cfg.schedule == "plateau" else None)
    history: list[dict] = []
    best_score, best_state, bad_epochs = -math.inf, None, 0
    step = 0
    bar = _progress(progress, description, cfg.epochs)
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        if freeze_body:
            model.body.eval()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        for idx in _batches(len(train), cfg.batch_size, gen, shuffle=True):
            idx = idx.to(device)
            x = x_all[idx].float().div_(255)
            x = augment_batch(x, cfg.crop_padding, cfg.flip, cfg.brightness, cfg.contrast, gen)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_all[idx]
            if batch_transform is not None:
                x = batch_transform(model, x, y)
            if plateau is None:
                f = _lr_factor(cfg, step, total_steps)
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr0 * f
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                logits = model(x)
            losses = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=cfg.label_smoothing)
            w = w_all[idx] if w_all is not None else None
            if batch_weight_fn is not None:
                bw = batch_weight_fn(model, x, y).detach().float()
                w = bw if w is None else w * bw
            if w is not None:
                loss = (losses * w).sum() / w.sum().clamp_min(1e-12)
            else:
                loss = losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            tot_loss += float(losses.detach().sum())
            tot_correct += int((logits.argmax(1) == y).sum())
            tot_n += len(y)
        rec = {"epoch": epoch + 1, "loss": tot_loss / tot_n, "acc": tot_correct / tot_n,
               "lr": opt.param_groups[0]["lr"]}
        if val is not None and len(val):
            vl, va = evaluate_loss_acc(model, val, cfg, device)
            rec.update(val_loss=vl, val_acc=va)
            if plateau is not None:
                plateau.step(va)
            if cfg.early_stopping_patience is not None:
                score = -vl if cfg.early_stopping_metric == "val_loss" else va
                if score > best_score:
                    best_score, bad_epochs = score, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
        rec["seconds"] = time.perf_counter() - t0
        history.append(rec)
        if epoch_callback is not None:
            epoch_callback(rec, model)
        if bar is not None:
            bar.update(bar.task_ids[0], advance=1, info=_fmt(rec))
        if cfg.early_stopping_patience is not None and bad_epochs >= cfg.early_stopping_patience:
            rec["stopped_early"] = True
            break
    if bar is not None:
        bar.stop()
    if best_state is not None and cfg.restore_best:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _fmt(rec: dict) -> str:
    s = f"loss {rec['loss']:.3f} acc {rec['acc']:.3f}"
    if "val_acc" in rec:
        s += f" val_acc {rec['val_acc']:.3f}"
    return s


def _progress(enabled: bool, description: str, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("epochs"),
                   TimeElapsedColumn(), TextColumn("{task.fields[info]}"), transient=True)
    bar.add_task(description, total=total, info="")
    bar.start()
    return bar


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, data: ImageSet, cfg: TrainConfig | None = None,
                      device: torch.device | str | None = None) -> tuple[float, float]:
    probs = predict_proba(model, data, device=device, bf16=bool(cfg and cfg.bf16))
    y = data.labels
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean()), float((probs.argmax(1) == y).mean())


def _as_uint8_tensor(data: ImageSet | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(data, ImageSet):
        return data.tensors()[0]
    if isinstance(data, np.ndarray):  # NHWC uint8
        return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2)
    return data


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                   device: torch.device | str | None = None, tta_flip: bool = False,
                   bf16: bool = False, features: bool = False) -> torch.Tensor:
    """Logits (or penultimate ``features``) for every image, in batches.

    ``data`` is an ImageSet, a uint8 NHWC array, a uint8 NCHW tensor, or a float NCHW tensor in [0, 1].
    """
    model.eval()
    device = torch.device(device) if device else next(model.parameters()).device
    x_all = _as_uint8_tensor(data)
    outs = []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = x.contiguous(memory_format=torch.channels_last)
        fn = model.features if features else model
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x).float()
            if tta_flip and not features:
                out = (out + fn(x.flip(3)).float()) / 2
        outs.append(out.cpu())
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)


def predict_proba(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                  device: torch.device | str | None = None, tta_flip: bool = False,
                  bf16: bool = False) -> np.ndarray:
    """Class probabilities ``(N, K)`` as a NumPy array."""
    logits = predict_logits(model, data, batch_size, device, tta_flip, bf16)
    return torch.softmax(logits, 1).numpy()


def extract_features(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                     device: torch.device | str | None = None) -> np.ndarray:
    """Penultimate-layer features ``(N, D)`` as a NumPy array."""
    return predict_logits(model, data, batch_size, device, features=True).numpy()
