"""FT-SAM: Zhu, Zhang, Li, Wu and Wang, "Enhancing Fine-Tuning Based Backdoor Defense with
Sharpness-Aware Minimization" (ICCV 2023)."""

from __future__ import annotations

import copy
import math
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.validate import check_range
from poisonlab.defenses._bb_common import BATCH_NORMS, batches, device_of
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, loop_bf16, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.errors import ParameterError
from poisonlab.training.device import autocast
from poisonlab.training.checkpoint import (
    Checkpoint,
    StaleProgress,
    check_int,
    fingerprint,
    restore_training_state,
    training_state,
)


def smooth_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Mean cross-entropy against ``1 - smoothing`` on the label and ``smoothing / (K - 1)`` on every other class."""
    logits = logits.float()  # bf16 logits: the targets and the loss stay float32
    target = torch.full_like(logits, smoothing / max(1, logits.shape[1] - 1))
    target.scatter_(1, y[:, None], 1.0 - smoothing)
    return -(target * F.log_softmax(logits, 1)).sum(1).mean()


def sam_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, x: torch.Tensor, y: torch.Tensor, rho: float,
             adaptive: bool = True, bf16: bool = False) -> float:
    """One sharpness-aware step (Foret et al. 2021; adaptive: Kwon et al. 2021, ASAM).

    Gradient at ``w``; ascend to ``w + e`` with ``e = rho * T^2 g / |T g|`` (``T = |w|`` when
    ``adaptive``, else 1); gradient there with batch-norm running statistics frozen; back to ``w``;
    ``opt`` steps with the second gradient. Returns the loss at ``w``. ``bf16``: both forward passes
    under bfloat16 autocast (``loss_fn`` should take its loss in float32); the ascent stays float32.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    with autocast(bf16, x.device):
        logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    with torch.no_grad():
        grads = [(p, p.grad) for p in params if p.grad is not None]
        norm = torch.stack([((p.abs() if adaptive else 1.0) * g).norm() for p, g in grads]).norm()
        scale = rho / (norm + 1e-12)
        moves = []
        for p, g in grads:
            e = g * scale * (p * p if adaptive else 1.0)
            p.add_(e)
            moves.append((p, e))
    bns = [m for m in model.modules() if isinstance(m, BATCH_NORMS)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0  # the second pass must not move the running statistics
    try:
        opt.zero_grad(set_to_none=True)
        with autocast(bf16, x.device):
            logits = model(x)
        loss_fn(logits, y).backward()
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        with torch.no_grad():
            for p, e in moves:
                p.sub_(e)
    opt.step()
    return float(loss.detach())


@DEFENSES.register("ft_sam")
class FTSAM(Defense):
    """Fine-tuning with sharpness-aware minimisation, FT-SAM (Zhu et al., ICCV 2023).

    Input: ``ctx.model`` and the trusted ``ctx.clean_set`` (``clean_fraction``, BackdoorBench 5%).
    A copy of the poisoned model is fine-tuned on the clean set with adaptive SAM (:func:`sam_step`)
    at a large radius ``rho``: the paper's observation is that backdoor neurons sit in sharp regions,
    so minimising the worst loss in a wide neighbourhood moves them more than plain fine-tuning.
    Loss: cross-entropy with label smoothing; SGD (momentum 0.9, weight decay), cosine decay of the
    learning rate per step. Output: the fine-tuned copy.

    Defaults are BackdoorBench's (its config and ``dsam`` code: adaptive SAM, rho 2, label smoothing
    0.1, lr 0.01, weight decay 5e-4, batch 256) except ``epochs``: BackdoorBench fine-tunes for 100
    epochs; 20 here keep a CPU run short. Like BackdoorBench, the clean set is augmented (random crop
    4 and flip, as for ``finetune``); BackdoorBench steps an epoch-long cosine schedule per batch,
    here the cosine spans all steps. With ``ctx.progress_dir`` the run saves its progress after every
    epoch and a stopped run continues from there to the same model (BackdoorBench's 100 epochs take
    tens of minutes on a CPU). Both passes of every step run under bfloat16 autocast where training
    does (:func:`~poisonlab.defenses._repair.loop_bf16`); before 2026-12-05 they ran in float32.

    Args:
        epochs: passes over the clean set, [1, 10000].
        lr: initial learning rate, (0, 10].
        batch_size: mini-batch size (capped at the clean set's size).
        rho: SAM radius, (0, 100].
        adaptive: ASAM's scale-invariant radius (BackdoorBench's default) or plain SAM.
        label_smoothing: [0, 1).
        weight_decay, momentum: of the SGD base optimiser.
    """

    kind = "repair"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = False

    def __init__(self, epochs: int = 20, lr: float = 0.01, batch_size: int = 256, rho: float = 2.0,
                 adaptive: bool = True, label_smoothing: float = 0.1, weight_decay: float = 5e-4,
                 momentum: float = 0.9):
        self.epochs = int(check_range(epochs, "epochs", 1, 10_000))
        self.lr = float(check_range(lr, "lr", 0, 10, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.rho = float(check_range(rho, "rho", 0, 100, lo_open=True))
        if not isinstance(adaptive, bool):
            raise ParameterError(f"adaptive must be true or false, got {adaptive!r}")
        self.adaptive = adaptive
        self.label_smoothing = float(check_range(label_smoothing, "label_smoothing", 0, 1, hi_open=True))
        self.weight_decay = float(check_range(weight_decay, "weight_decay", 0, 1))
        self.momentum = float(check_range(momentum, "momentum", 0, 1, hi_open=True))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, self.registry_name or "ft_sam")
        model = copy.deepcopy(ctx.model)
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=self.lr,
                              momentum=self.momentum, weight_decay=self.weight_decay)
        gen = torch.Generator().manual_seed(ctx.seed)
        steps_per_epoch = math.ceil(len(clean) / max(1, min(self.batch_size, len(clean))))
        total = self.epochs * steps_per_epoch
        folder = ctx.progress_dir
        progress = Checkpoint(folder / "ft_sam.pt" if folder else None,
                              fingerprint(self.params(), ctx.seed, list(ctx.model.state_dict().values()),
                                          clean.images, clean.labels))
        done, seconds, losses = _resume(progress, model, opt, gen, self.epochs)
        loss_fn = partial(smooth_cross_entropy, smoothing=self.label_smoothing)
        bf16 = loop_bf16(model, clean)
        for epoch in range(done, self.epochs):
            t0 = time.perf_counter()
            losses = []
            for i, (x, y) in enumerate(batches(clean, self.batch_size, 1, gen, device_of(model), augment=True)):
                step = epoch * steps_per_epoch + i
                for g in opt.param_groups:
                    g["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / total))
                losses.append(sam_step(model, opt, loss_fn, x, y, self.rho, self.adaptive, bf16))
            seconds += time.perf_counter() - t0
            progress.save({**training_state(model, [opt], gen), "epoch": epoch + 1, "seconds": seconds,
                           "losses": losses})
        model.eval()
        return DefenseResult(model=model, metrics={"n_finetune": len(clean), "sam_steps": total,
                                                   "finetune_loss": sum(losses) / len(losses),
                                                   "resumed": done > 0}, seconds=seconds if done else None)


def _resume(progress: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
            epochs: int) -> tuple[int, float, list[float]]:
    """``(epochs done, seconds, last epoch's losses)`` of a stopped FT-SAM run, restored into ``model``,
    ``opt`` and ``gen``; ``(0, 0.0, [])`` when there is no progress file or it does not fit."""
    def restore(state: dict) -> tuple[int, float, list[float]]:
        done = check_int(state.get("epoch"), "epoch", 1, epochs)
        seconds, losses = state.get("seconds"), state.get("losses")
        if not isinstance(seconds, float) or seconds < 0:
            raise StaleProgress("seconds must be a number")
        if not isinstance(losses, list) or not losses or not all(isinstance(v, float) for v in losses):
            raise StaleProgress("losses must be the last epoch's batch losses")
        restore_training_state(state, model, [opt], gen)
        return done, seconds, losses

    return progress.resume(restore) or (0, 0.0, [])
