"""The one training loop.

Data stays as a uint8 tensor; each batch is converted to float and augmented
on the device in one go. Everything a recipe needs is a field of
:class:`TrainConfig`, validated when it is built; named recipes (``preset``)
fill the fields a config leaves out. :func:`fit` reads top to bottom:
prepare (:func:`prepare`), then per epoch :func:`train_epoch` and
:func:`after_epoch`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.training.augment import augment_batch
from poisonlab.training.checkpoint import (
    Checkpoint,
    StaleProgress,
    check_int,
    check_model_state,
    check_scheduler_state,
    fingerprint,
    layer_shapes,
    restore_training_state,
    training_state,
)
from poisonlab.training.device import autocast, resolve_device, use_bf16
from poisonlab.training.muon import Muon
from poisonlab.training.progress import progress_counter

PRESETS: dict[str, dict[str, Any]] = {
    # Keller Jordan's airbench94_muon (2024): 94.01% mean on CIFAR-10 with the `airnet` network.
    # Learning rates are airbench's for a summed loss; weight_decay is its 2e-6 x batch size.
    "airbench94": dict(
        epochs=8, batch_size=2000, micro_batch_size=250, optimizer="muon", lr=0.24, muon_momentum=0.6,
        momentum=0.85, nesterov=True, bias_lr=0.053, head_lr=0.67, weight_decay=2e-6 * 2000,
        loss_reduction="sum", label_smoothing=0.2, schedule="onecycle", warmup_fraction=0.0,
        stem_bias_epochs=3, crop_padding=2, flip=True, flip_mode="alternating", tta="flip_translate",
    ),
    # The same recipe, shorter, for `airnet` with widths (32, 64, 128): >= 85% on CIFAR-10 in ~2 minutes.
    "airbench_quick": dict(
        epochs=4, batch_size=1000, micro_batch_size=250, optimizer="muon", lr=0.24, muon_momentum=0.6,
        momentum=0.85, nesterov=True, bias_lr=0.053, head_lr=0.67, weight_decay=2e-6 * 1000,
        loss_reduction="sum", label_smoothing=0.2, schedule="onecycle", warmup_fraction=0.0,
        stem_bias_epochs=2, crop_padding=2, flip=True, flip_mode="alternating", tta="flip_translate",
    ),
}
"""Named recipes for :attr:`TrainConfig.preset`; fields given explicitly win over the preset's."""

PRESET_SUMMARIES: dict[str, str] = {
    "airbench94": "airnet (64-256-256): Keller Jordan's airbench94 recipe, 94% on CIFAR-10 (docs/performance.md)",
    "airbench_quick": "airnet (32-64-128): the same recipe in 4 epochs, about 89% on CIFAR-10",
}
"""One line per preset, for ``poisonlab list``."""


class TrainConfig(BaseModel):
    """Settings of one training run. Unknown fields and out-of-range values are rejected.

    ``preset`` names a recipe in :data:`PRESETS` whose values fill every field not given
    (``TrainConfig(preset="airbench94", epochs=10)`` is airbench94 for 10 epochs).
    """

    model_config = ConfigDict(extra="forbid")

    preset: Literal["airbench94", "airbench_quick"] | None = None
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(256, ge=1, le=65_536)
    micro_batch_size: int | None = Field(
        None, ge=1, le=65_536,
        description="split each batch into chunks of this size for the forward/backward passes (gradients "
                    "accumulate; batch-norm statistics are per chunk); faster on CPUs for large batches")
    optimizer: Literal["sgd", "adam", "muon"] = "sgd"
    lr: float = Field(0.05, gt=0, le=100, description="muon: the orthogonalised step of the weights")
    bias_lr: float | None = Field(None, gt=0, le=1000, description="lr of biases and norm parameters (None: lr)")
    head_lr: float | None = Field(None, gt=0, le=1000, description="lr of the classifier head (None: lr)")
    momentum: float = Field(0.9, ge=0, lt=1)
    muon_momentum: float = Field(0.6, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, le=1)
    loss_reduction: Literal["mean", "sum"] = "mean"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["none", "onecycle", "cosine", "step", "plateau"] = "onecycle"
    warmup_fraction: float = Field(0.2, ge=0, lt=1, description="onecycle/cosine/step: share of steps warming up")
    step_milestones: tuple[float, ...] = Field(
        (0.5, 0.75), description="step: shares of the training after which the lr is multiplied by step_factor")
    step_factor: float = Field(0.1, gt=0, le=1, description="step: the multiplier at each milestone")
    plateau_factor: float = Field(0.5, gt=0, lt=1)
    plateau_patience: int = Field(3, ge=0)
    stem_bias_epochs: int | None = Field(
        None, ge=0, le=10_000,
        description="models with a whitened stem: train its bias this many epochs (lr decaying to 0), then "
                    "freeze it (None: train it throughout like any bias)")
    crop_padding: int = Field(0, ge=0, le=16)
    flip: bool = False
    flip_mode: Literal["random", "alternating"] = "random"
    brightness: float = Field(0.0, ge=0, le=1)
    contrast: float = Field(0.0, ge=0, le=1)
    val_fraction: float = Field(0.0, ge=0, lt=0.9)
    early_stopping_patience: int | None = Field(None, ge=1)
    early_stopping_metric: Literal["val_loss", "val_acc"] = "val_loss"
    restore_best: bool = True
    channels_last: bool = True
    bf16: bool | Literal["auto"] = "auto"
    tta: Literal["none", "flip", "flip_translate"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "tta_flip" in data:  # the older boolean spelling of tta
            flag = data.pop("tta_flip")
            if not isinstance(flag, bool):
                raise ValueError(f"tta_flip must be true or false, got {flag!r}")
            data.setdefault("tta", "flip" if flag else "none")
        preset = data.get("preset")
        if isinstance(preset, str) and preset in PRESETS:
            data = {**PRESETS[preset], **data}
        return data

    @model_validator(mode="after")
    def _needs_validation(self) -> "TrainConfig":
        if self.schedule == "plateau" and self.val_fraction == 0:
            raise ValueError("schedule 'plateau' watches validation accuracy: set val_fraction > 0")
        if self.early_stopping_patience is not None and self.val_fraction == 0:
            raise ValueError("early_stopping_patience needs a validation split: set val_fraction > 0")
        m = self.step_milestones
        if any(not 0 < x < 1 for x in m) or list(m) != sorted(set(m)):
            raise ValueError(f"step_milestones must be increasing shares of the training in (0, 1), got {list(m)}")
        return self

    @property
    def tta_flip(self) -> bool:
        """Whether test-time augmentation includes the mirror image."""
        return self.tta != "none"


BatchWeightFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
BatchTransform = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``fn(model, x, y) -> (B,)`` non-negative per-sample weights for one (augmented) training batch."""


@dataclass
class _Optimizers:
    """The optimisers of one run and the learning rate each group starts from."""

    all: list[torch.optim.Optimizer]
    stem_group: dict | None = None  # the whitened stem's bias: its own, shorter schedule

    def groups(self):
        for opt in self.all:
            yield from opt.param_groups

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.all:
            opt.step()


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> _Optimizers:
    """Parameter groups and optimisers for ``cfg.optimizer``.

    Groups: weights (``ndim > 1``, decayed), biases and norm parameters (``bias_lr``, not decayed
    except under ``muon``), the classifier head's weights (``head_lr``; ``model.head`` when the model
    has one) and a whitened stem's bias (its own group when ``stem_bias_epochs`` is set). ``muon``
    follows airbench94_muon: Muon on the weights, Nesterov SGD on the rest, and ``weight_decay`` is the
    per-step decay at the initial learning rate (torch's coefficient is ``weight_decay / lr`` per group).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = getattr(model, "head", None)
    head_ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    stem = getattr(model, "stem_bias", None) if cfg.stem_bias_epochs is not None else None
    stem_ids = {id(stem)} if isinstance(stem, torch.Tensor) and stem.requires_grad else set()
    weights = [p for p in trainable if p.ndim > 1 and id(p) not in head_ids]
    head_w = [p for p in trainable if p.ndim > 1 and id(p) in head_ids]
    small = [p for p in trainable if p.ndim <= 1 and id(p) not in stem_ids]
    bias_lr = cfg.bias_lr or cfg.lr
    head_lr = cfg.head_lr or cfg.lr
    if cfg.optimizer == "muon":
        def sgd_group(params: list, lr: float) -> dict:
            return {"params": params, "lr": lr, "weight_decay": cfg.weight_decay / lr}

        groups = [sgd_group(small, bias_lr), sgd_group(head_w, head_lr)]
        if stem_ids:
            groups.append(sgd_group([stem], bias_lr))
        sgd = torch.optim.SGD([g for g in groups if g["params"]], lr=bias_lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0)
        opts: list[torch.optim.Optimizer] = [sgd]
        if weights:
            opts.append(Muon(weights, lr=cfg.lr, momentum=cfg.muon_momentum, nesterov=cfg.nesterov))
    else:
        groups = [{"params": weights, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                  {"params": head_w, "lr": head_lr, "weight_decay": cfg.weight_decay},
                  {"params": small, "lr": bias_lr, "weight_decay": 0.0}]
        if stem_ids:
            groups.append({"params": [stem], "lr": bias_lr, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        if cfg.optimizer == "adam":
            opts = [torch.optim.Adam(groups, lr=cfg.lr)]
        else:
            opts = [torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov and cfg.momentum > 0)]
    out = _Optimizers(opts)
    for g in out.groups():
        g["initial_lr"] = g["lr"]
        if stem_ids and any(id(p) in stem_ids for p in g["params"]):
            out.stem_group = g
    return out


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    """The schedule's multiplier of the initial learning rate at ``step`` of ``total``."""
    if cfg.schedule in ("none", "plateau"):
        return 1.0
    warm = int(cfg.warmup_fraction * total)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * t))
    if cfg.schedule == "step":  # multi-step: x step_factor at each milestone passed (as torch's MultiStepLR)
        return cfg.step_factor ** sum(step >= round(m * total) for m in cfg.step_milestones)
    return max(0.0, 1.0 - t)  # onecycle: linear warm-up, linear decay to 0


@dataclass
class TrainState:
    """Everything one :func:`fit` carries from step to step."""

    model: nn.Module
    cfg: TrainConfig
    device: torch.device
    bf16: bool
    x: torch.Tensor  # uint8 NCHW training images, on the device
    y: torch.Tensor
    w: torch.Tensor | None  # per-sample weights
    flip_bits: torch.Tensor | None  # alternating flip: which images start mirrored
    opt: _Optimizers
    gen: torch.Generator
    total_steps: int
    stem_steps: int
    freeze_body: bool
    batch_weight_fn: BatchWeightFn | None
    plateau: Any = None
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float = -math.inf
    best_state: dict | None = None
    bad_epochs: int = 0
    batch_transform: BatchTransform | None = None


def prepare(model: nn.Module, train: ImageSet, cfg: TrainConfig, *, sample_weight: np.ndarray | None,
            seed: int, device: torch.device | str | None, freeze_body: bool,
            batch_weight_fn: BatchWeightFn | None, batch_transform: BatchTransform | None = None) -> TrainState:
    """Move data and model to the device, initialise data-dependent layers, build the optimisers."""
    device = resolve_device(device if device is not None else next(model.parameters()).device)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = train.tensors(device)
    w_all = torch.from_numpy(sample_weight).to(device) if sample_weight is not None else None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.to(device)
    if getattr(model, "needs_data_init", False) and not freeze_body:
        # data-dependent initialisation (a whitened stem) from a fixed sample of the training set
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:5000]
        model.data_init(x_all[sample.to(device)].float().div(255))
    if freeze_body:
        for p in model.body.parameters():
            p.requires_grad_(False)
    opt = make_optimizers(model, cfg)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    flip_bits = None
    if cfg.flip and cfg.flip_mode == "alternating":
        flip_bits = (torch.rand(len(train), generator=gen) < 0.5).to(device)
    plateau = None
    if cfg.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt.all[0], mode="max", factor=cfg.plateau_factor,
                                                             patience=cfg.plateau_patience)
    return TrainState(model=model, cfg=cfg, device=device, bf16=use_bf16(cfg.bf16, device, x_all.shape[-1]),
                      x=x_all, y=y_all, w=w_all, flip_bits=flip_bits, opt=opt, gen=gen,
                      total_steps=cfg.epochs * steps_per_epoch,
                      stem_steps=(cfg.stem_bias_epochs or 0) * steps_per_epoch,
                      freeze_body=freeze_body, batch_weight_fn=batch_weight_fn, plateau=plateau,
                      batch_transform=batch_transform)


def _set_learning_rates(s: TrainState) -> None:
    if s.plateau is None:
        f = lr_factor(s.cfg, s.step, s.total_steps)
        for g in s.opt.groups():
            g["lr"] = g["initial_lr"] * f
    if s.opt.stem_group is not None:
        g = s.opt.stem_group
        g["lr"] = g["initial_lr"] * max(0.0, 1 - s.step / max(1, s.stem_steps))
        if s.step >= s.stem_steps:  # frozen: no gradient flows into the stem any more (cheaper backward)
            for p in g["params"]:
                p.requires_grad_(False)


def _batch(s: TrainState, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """The augmented float batch of training images ``idx``."""
    cfg = s.cfg
    x = s.x[idx].float().div_(255)
    flip_mask = None
    if s.flip_bits is not None:  # alternating flip: every image mirrored on every other epoch
        flip_mask = s.flip_bits[idx] ^ bool(epoch % 2)
    x = augment_batch(x, cfg.crop_padding, cfg.flip, cfg.brightness, cfg.contrast, s.gen, flip_mask=flip_mask)
    return x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x


def train_epoch(s: TrainState, epoch: int) -> dict:
    """One pass over the shuffled training set; returns ``epoch, loss, acc, lr``."""
    cfg, model = s.cfg, s.model
    model.train()
    if s.freeze_body:
        model.body.eval()
    tot_loss, tot_correct, tot_n = 0.0, 0, 0
    order = torch.randperm(len(s.y), generator=s.gen).to(s.device)
    for idx in order.split(cfg.batch_size):
        _set_learning_rates(s)
        x, y = _batch(s, idx, epoch), s.y[idx]
        if s.batch_transform is not None:
            x = s.batch_transform(model, x, y)
        w = s.w[idx] if s.w is not None else None
        # a weighted mean over the whole batch, or airbench's sum (the mean times the batch size)
        norm = float(w.sum().clamp_min(1e-12)) if w is not None else float(len(idx))
        if cfg.loss_reduction == "sum":
            norm /= len(idx)
        step = cfg.micro_batch_size or len(idx)
        for lo in range(0, len(idx), step):
            chunk = slice(lo, lo + step)  # a slice keeps the channels_last strides (an index tensor would not)
            xc, yc = x[chunk], y[chunk]
            with autocast(s.bf16, s.device):
                logits = model(xc)
            losses = F.cross_entropy(logits.float(), yc, reduction="none", label_smoothing=cfg.label_smoothing)
            wc = w[chunk] if w is not None else None
            chunk_norm = norm
            if s.batch_weight_fn is not None:
                # weights known only now: a weighted mean within the chunk, chunks weighted by their size
                bw = s.batch_weight_fn(model, xc, yc).detach().float()
                wc = bw if wc is None else wc * bw
                chunk_norm = float(wc.sum().clamp_min(1e-12)) * len(idx) / len(yc)
                if cfg.loss_reduction == "sum":
                    chunk_norm /= len(idx)
            loss = (losses * wc).sum() if wc is not None else losses.sum()
            (loss / chunk_norm).backward()
            tot_loss += float(losses.detach().sum())
            tot_correct += int((logits.argmax(1) == yc).sum())
        tot_n += len(idx)
        s.opt.step()
        s.opt.zero_grad()
        s.step += 1
    return {"epoch": epoch + 1, "loss": tot_loss / max(1, tot_n), "acc": tot_correct / max(1, tot_n),
            "lr": s.opt.all[0].param_groups[0]["lr"]}


def after_epoch(s: TrainState, rec: dict, val: ImageSet | None) -> bool:
    """Validation, plateau schedule and early stopping; returns True when training should stop."""
    cfg = s.cfg
    if val is None or not len(val):
        return False
    vl, va = evaluate_loss_acc(s.model, val, cfg, s.device)
    rec.update(val_loss=vl, val_acc=va)
    if s.plateau is not None:
        s.plateau.step(va)
    if cfg.early_stopping_patience is None:
        return False
    score = -vl if cfg.early_stopping_metric == "val_loss" else va
    if score > s.best_score:
        s.best_score, s.bad_epochs = score, 0
        s.best_state = copy.deepcopy(s.model.state_dict())
    else:
        s.bad_epochs += 1
    return s.bad_epochs >= cfg.early_stopping_patience


def _scale_bn_momentum(model: nn.Module, cfg: TrainConfig) -> list[tuple[nn.Module, float]]:
    """With micro-batches, make batch norm's running statistics average over as many images as whole batches.

    A micro-batch updates the running statistics once, so ``batch_size / micro_batch_size`` times per
    step; momentum ``m`` becomes ``1 - (1 - m) ** (micro / batch)``. Without this the statistics used
    at test time would follow the last few micro-batches only (measured: airbench94 at 250-image
    micro-batches lost 9 points of test accuracy mid-training). Returns what to restore.
    """
    micro = cfg.micro_batch_size
    if not micro or micro >= cfg.batch_size:
        return []
    saved = []
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and m.momentum is not None:
            saved.append((m, m.momentum))
            m.momentum = 1 - (1 - m.momentum) ** (micro / cfg.batch_size)
    return saved


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
    batch_transform: BatchTransform | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
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
        device: ``"auto"`` (CUDA when present, else the CPU), a device, or None
            (where the model's parameters are).
        freeze_body: train only ``model.head``; the feature extractor keeps its
            weights and batch-norm statistics (transfer learning, as in Poison Frogs).
        batch_weight_fn: ``fn(model, x, y) -> (B,)`` weights computed per batch during
            training (e.g. learning-to-reweight); multiplied with ``sample_weight``.
        batch_transform: ``fn(model, x, y) -> x`` replaces every augmented training batch before the
            forward pass (adversarial training: PGD examples); the model must be in train mode again on return.
        epoch_callback: called as ``epoch_callback(record, model)`` after each epoch
            (benchmarks use it to evaluate on the way).
        checkpoint: a file where the run's progress is saved after every epoch; when it already
            holds an earlier, stopped run of the same settings, data and seed, training continues
            from there and the result is the one an uninterrupted run gives
            (:mod:`poisonlab.training.checkpoint`). The caller removes the file when it is done with it.

    Returns:
        Per-epoch history: dicts with ``epoch, loss, acc, lr, seconds`` and,
        with validation, ``val_loss, val_acc``.
    """
    cfg = cfg or TrainConfig()
    weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float32)
    if weights is not None and (weights.shape != (len(train),) or (weights < 0).any()):
        raise ValueError(f"sample_weight must be {len(train)} non-negative values, got shape {weights.shape}")
    if val is None and cfg.val_fraction > 0:
        train, val, rest_idx, _ = train.split(cfg.val_fraction, seed=seed)
        weights = weights[rest_idx] if weights is not None else None
    s = prepare(model, train, cfg, sample_weight=weights, seed=seed, device=device, freeze_body=freeze_body,
                batch_weight_fn=batch_weight_fn, batch_transform=batch_transform)
    progress_file = Checkpoint(checkpoint, _fingerprint(s, seed) if checkpoint is not None else "")
    start = _resume(s, progress_file)
    bar = progress_counter(progress, description, cfg.epochs, done=start)
    bn_momenta = _scale_bn_momentum(s.model, cfg)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            rec = train_epoch(s, epoch)
            stop = after_epoch(s, rec, val)
            rec["seconds"] = time.perf_counter() - t0
            s.history.append(rec)
            if stop:
                rec["stopped_early"] = True
            if progress_file:  # saved before the callback: a callback that stops the run loses nothing
                progress_file.save(_snapshot(s))
            if epoch_callback is not None:
                epoch_callback(rec, s.model)
            bar.advance(_fmt(rec) + f" ({rec['seconds']:.0f}s)")
            if stop:
                break
    finally:
        bar.stop()
        if s.opt.stem_group is not None:  # leave the model as it was built
            for p in s.opt.stem_group["params"]:
                p.requires_grad_(True)
        for bn, momentum in bn_momenta:
            bn.momentum = momentum
    if s.best_state is not None and cfg.restore_best:
        s.model.load_state_dict(s.best_state)
    s.model.eval()
    return s.history


def _fingerprint(s: TrainState, seed: int) -> str:
    """What a progress file must have been written by: the recipe, the model's layers, the data and the seed."""
    return fingerprint(s.cfg.model_dump_json(), type(s.model).__qualname__, layer_shapes(s.model), seed,
                       s.freeze_body, s.x, s.y, s.w)


def _snapshot(s: TrainState) -> dict:
    """Everything :func:`_resume` needs to continue ``s`` after its last finished epoch."""
    return {**training_state(s.model, s.opt.all, s.gen), "epoch": len(s.history), "step": s.step,
            "history": s.history, "best_score": s.best_score, "bad_epochs": s.bad_epochs,
            "best_state": s.best_state, "plateau": s.plateau.state_dict() if s.plateau is not None else None}


def _resume(s: TrainState, progress_file: Checkpoint) -> int:
    """Load a stopped run's progress into ``s``; returns the epoch to start from (``cfg.epochs``: finished).

    A file that does not fit this run is reported and ignored: training starts over (epoch 0).
    """
    start = progress_file.resume(lambda state: _restore(s, state))
    return 0 if start is None else start


# The plateau schedule's fields that move as training goes; the rest are its settings, which must not change.
PLATEAU_COUNTERS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch", "_last_lr")


def _restore(s: TrainState, state: dict) -> int:
    """Check ``state`` against ``s`` (raising :class:`StaleProgress` before anything changes), then load it."""
    epochs = s.cfg.epochs
    epoch = check_int(state.get("epoch"), "epoch", 1, epochs)
    history = state.get("history")
    if not isinstance(history, list) or len(history) != epoch or not all(isinstance(r, dict) for r in history):
        raise StaleProgress("history must hold one record per finished epoch")
    step = check_int(state.get("step"), "step", 0, s.total_steps)
    if state.get("best_state") is not None:
        check_model_state(state["best_state"], s.model, "best_state")
    if not isinstance(state.get("best_score"), float) or not isinstance(state.get("bad_epochs"), int):
        raise StaleProgress("best_score and bad_epochs must be numbers")
    if s.plateau is not None:
        check_scheduler_state(state.get("plateau"), s.plateau.state_dict(), PLATEAU_COUNTERS, "plateau")
    restore_training_state(state, s.model, s.opt.all, s.gen)
    if s.plateau is not None:
        s.plateau.load_state_dict(state["plateau"])
    s.step, s.history, s.best_state = step, history, state["best_state"]
    s.best_score, s.bad_epochs = state["best_score"], state["bad_epochs"]
    _set_learning_rates(s)  # also re-freezes a whitened stem whose schedule had ended
    return epochs if history[-1].get("stopped_early") else epoch


def _fmt(rec: dict) -> str:
    s = f"loss {rec['loss']:.3f} acc {rec['acc']:.3f}"
    if "val_acc" in rec:
        s += f" val_acc {rec['val_acc']:.3f}"
    return s


@torch.no_grad()
def evaluate_loss_acc(model: nn.Module, data: ImageSet, cfg: TrainConfig | None = None,
                      device: torch.device | str | None = None) -> tuple[float, float]:
    probs = predict_proba(model, data, device=device, bf16=cfg.bf16 if cfg else "auto")
    y = data.labels
    p = np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)
    return float(-np.log(p).mean()), float((probs.argmax(1) == y).mean())


def _as_uint8_tensor(data: ImageSet | np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(data, ImageSet):
        return data.tensors()[0]
    if isinstance(data, np.ndarray):  # NHWC uint8
        return torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2)
    return data


def _tta_views(x: torch.Tensor, tta: str) -> list[tuple[float, torch.Tensor]]:
    """(weight, view) pairs of a test-time augmentation; the weights sum to 1.

    ``flip``: the image and its mirror. ``flip_translate`` (airbench94's TTA): half on those two, half
    on both of them shifted one pixel up-left and one pixel down-right (reflect padding).
    """
    if tta == "none":
        return [(1.0, x)]
    views = [(0.5, x), (0.5, x.flip(3))]
    if tta == "flip":
        return views
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect" if min(h, w) > 1 else "replicate")
    shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
    return ([(0.25, v) for _, v in views]
            + [(0.125, v) for s in shifted for v in (s, s.flip(3))])


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                   device: torch.device | str | None = None, tta_flip: bool = False,
                   bf16: bool | str = "auto", features: bool = False,
                   tta: Literal["none", "flip", "flip_translate"] | None = None) -> torch.Tensor:
    """Logits (or penultimate ``features``) for every image, in batches.

    ``data`` is an ImageSet, a uint8 NHWC array, a uint8 NCHW tensor, or a float NCHW tensor in [0, 1].
    ``tta`` averages the logits over test-time views (``tta_flip=True`` is ``tta="flip"``); features
    are never augmented. ``bf16``: ``"auto"`` (see :func:`poisonlab.training.device.use_bf16`),
    True or False.
    """
    model.eval()
    device = resolve_device(device if device is not None else next(model.parameters()).device)
    x_all = _as_uint8_tensor(data)
    tta = tta or ("flip" if tta_flip else "none")
    use = use_bf16(bf16, device, x_all.shape[-1]) if len(x_all) else False
    fn = model.features if features else model
    outs = []
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(use, device):
            if features:
                out = fn(x).float()
            else:
                out = sum(wt * fn(v).float() for wt, v in _tta_views(x, tta))
        outs.append(out.cpu())
    if not outs:
        return torch.empty(0)
    return torch.cat(outs)


def predict_proba(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                  device: torch.device | str | None = None, tta_flip: bool = False,
                  bf16: bool | str = "auto", tta: Literal["none", "flip", "flip_translate"] | None = None
                  ) -> np.ndarray:
    """Class probabilities ``(N, K)`` as a NumPy array (arguments as :func:`predict_logits`)."""
    logits = predict_logits(model, data, batch_size, device, tta_flip, bf16, tta=tta)
    return torch.softmax(logits, 1).numpy()


def extract_features(model: nn.Module, data: ImageSet | np.ndarray | torch.Tensor, batch_size: int = 1024,
                     device: torch.device | str | None = None, bf16: bool | str = "auto") -> np.ndarray:
    """Penultimate-layer features ``(N, D)`` as a NumPy array."""
    return predict_logits(model, data, batch_size, device, bf16=bf16, features=True).numpy()
