"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.data.imageset import to_uint8_nhwc
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, finetune_copy, loop_bf16, pick, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.metrics import robust_z
from poisonlab.training.device import autocast
from poisonlab.training.progress import progress_counter
from poisonlab.validate import check_range, check_tuning


@dataclass
class ReversedTriggers:
    """Per class ``k``: the smallest mask ``(1, H, W)`` and pattern ``(C, H, W)`` found that send clean images to ``k``."""

    masks: torch.Tensor  # (K, 1, H, W) in [0, 1]
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    success: np.ndarray  # (K,) share of the last batch sent to k by the kept mask
    l1: np.ndarray  # (K,) L1 norm of each kept mask

    def stamp(self, x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        """Apply class ``k``'s reversed trigger to float NCHW images ``x`` (``k`` scalar or per image)."""
        m, p = self.masks[k], self.patterns[k]
        if m.dim() == 3:
            m, p = m[None], p[None]
        return (1 - m) * x + m * p


def reverse_engineer_triggers(model: nn.Module, images: torch.Tensor, num_classes: int, *, steps: int = 300,
                              batch_size: int = 32, lr: float = 0.1, init_cost: float = 1e-2,
                              success_threshold: float = 0.99, check_every: int = 5, seed: int = 0,
                              progress: bool = False, bf16: bool = False) -> ReversedTriggers:
    """Optimise a mask and pattern per class, all classes in one batch (Wang et al. 2019, Eq. 3).

    Each step stamps the same ``batch_size`` clean images with all ``K``
    candidate triggers, so one forward/backward pass of ``K * batch_size``
    images updates every class. Loss per class: cross-entropy towards the class
    plus ``cost_k * |mask_k|_1``. As in the paper, ``cost_k`` adapts every
    ``check_every`` steps: x1.5 while the attack succeeds on at least
    ``success_threshold`` of the batch, /1.5^1.5 otherwise; the smallest mask
    that reached the threshold is kept (the last one if none did).

    Args:
        model: classifier on float NCHW images in [0, 1]; not modified (gradients
            flow to the mask and pattern only).
        images: float NCHW clean images in [0, 1] the triggers are optimised over.
        num_classes: K.
        bf16: the model's forward passes under bfloat16 autocast (the loss, mask and pattern stay float32).
    """
    device = images.device
    model.eval()
    n, c, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    # tanh parametrisation keeps mask and pattern in [0, 1] without clipping
    mask_p = (torch.randn(num_classes, 1, h, w, generator=g) * 0.1).to(device).requires_grad_(True)
    pat_p = (torch.randn(num_classes, c, h, w, generator=g) * 0.1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_p, pat_p], lr=lr, betas=(0.5, 0.9))
    cost = torch.full((num_classes,), init_cost, device=device)
    targets = torch.arange(num_classes, device=device).repeat_interleave(batch_size)
    best_l1 = torch.full((num_classes,), float("inf"), device=device)
    best_mask = torch.zeros(num_classes, 1, h, w, device=device)
    best_pat = torch.zeros(num_classes, c, h, w, device=device)
    best_succ = torch.zeros(num_classes, device=device)
    succ_sum = torch.zeros(num_classes, device=device)
    bar = progress_counter(progress, "neural cleanse triggers", steps, unit="step")
    for step in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=g).to(device)
        x = images[idx]
        mask = (torch.tanh(mask_p) + 1) / 2
        pat = (torch.tanh(pat_p) + 1) / 2
        stamped = (1 - mask[:, None]) * x[None] + (mask * pat)[:, None]  # K, B, C, H, W
        with autocast(bf16, device):
            logits = model(stamped.reshape(-1, c, h, w)).float()
        ce = F.cross_entropy(logits, targets, reduction="none").view(num_classes, batch_size).mean(1)
        l1 = mask.sum((1, 2, 3))
        loss = (ce + cost * l1).sum()
        gm, gp = torch.autograd.grad(loss, [mask_p, pat_p])
        mask_p.grad, pat_p.grad = gm, gp
        opt.step()
        with torch.no_grad():
            succ = (logits.argmax(1) == targets).float().view(num_classes, batch_size).mean(1)
            better = (succ >= success_threshold) & (l1 < best_l1)
            best_l1 = torch.where(better, l1, best_l1)
            best_mask[better], best_pat[better], best_succ[better] = mask[better], pat[better], succ[better]
            succ_sum += succ
            if (step + 1) % check_every == 0:
                ok = succ_sum / check_every >= success_threshold
                cost = torch.where(ok, cost * 1.5, cost / 1.5 ** 1.5)
                succ_sum.zero_()
        bar.advance()
    bar.stop()
    with torch.no_grad():
        none = torch.isinf(best_l1)  # never reached the threshold: keep the final mask
        mask = (torch.tanh(mask_p) + 1) / 2
        pat = (torch.tanh(pat_p) + 1) / 2
        best_mask[none], best_pat[none], best_succ[none] = mask[none], pat[none], succ[none]
        best_l1 = best_mask.sum((1, 2, 3))
    return ReversedTriggers(best_mask.detach(), best_pat.detach(), best_succ.cpu().numpy(), best_l1.cpu().numpy())


def mad_anomaly_index(norms: np.ndarray) -> np.ndarray:
    """|norm - median| / (1.4826 * MAD) per class (Wang et al. 2019); large values are outliers."""
    return np.abs(robust_z(norms, min_mad=1e-12))


@DEFENSES.register("neural_cleanse")
class NeuralCleanse(Defense):
    """Reverse-engineer a trigger per class, flag outliers, unlearn them (Wang et al. 2019).

    Input: ``ctx.model`` (any registry model) and ``ctx.clean_set``. For every
    class the smallest mask + pattern that sends clean images to that class is
    optimised (all classes batched together, see
    :func:`reverse_engineer_triggers`). A class whose mask L1 norm is below the
    median with an anomaly index (MAD) above ``threshold`` (paper: 2) is
    flagged as a backdoor target. Mitigation by unlearning: a copy of the model
    is fine-tuned on the clean set with a flagged class's reversed trigger
    stamped on ``unlearn_rate`` of the images (paper: 20%) and the true labels
    kept. Output: that copy, or ``ctx.model`` unchanged when nothing is flagged.

    Metrics: ``anomaly_index``, ``mask_l1`` and ``reverse_success`` per class,
    ``flagged_classes``, ``n_flagged``, ``reverse_seconds``. Arrays (for the
    report's plot): ``nc_mask`` (K, H, W) and ``nc_pattern`` (K, H, W, C), the
    reversed mask and pattern of every class as uint8 (0-255 for [0, 1]).
    The reverse engineering runs under bfloat16 autocast where training does
    (:func:`~poisonlab.defenses._repair.loop_bf16`); before 2026-12-05 it ran in float32.

    Args:
        steps: optimisation steps (each over all classes at once).
        batch_size: clean images per step (the forward pass holds K times as many).
        lr: Adam step on the mask and pattern (the paper's 0.1, betas 0.5/0.9).
        init_cost: initial weight of the mask's L1 norm. The paper starts at 1e-3
            and adapts it once per epoch of many batches; with a few hundred steps
            here it starts at 1e-2 and adapts every ``check_every`` steps.
        check_every: steps between cost adaptations.
        threshold: anomaly index above which a class is flagged (paper: 2).
        unlearn_rate: share of the clean set stamped with a reversed trigger.
        epochs, lr_finetune, batch_size_finetune: the unlearning fine-tune.
    """

    kind = "repair"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = False

    def __init__(self, steps: int = 300, batch_size: int = 32, lr: float = 0.1, init_cost: float = 1e-2,
                 check_every: int = 5, threshold: float = 2.0, unlearn_rate: float = 0.2, epochs: int = 10,
                 lr_finetune: float = 0.01, batch_size_finetune: int = 64):
        self.steps = int(check_range(steps, "steps", 10, 1_000_000))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.lr = float(check_range(lr, "lr", 0, 10, lo_open=True))
        self.init_cost = float(check_range(init_cost, "init_cost", 0, 1e3))
        self.check_every = int(check_range(check_every, "check_every", 1, 1_000_000))
        self.threshold = float(check_range(threshold, "threshold", 0, 1e3, lo_open=True))
        self.unlearn_rate = float(check_range(unlearn_rate, "unlearn_rate", 0, 1, lo_open=True))
        self.epochs, self.lr_finetune, self.batch_size_finetune = check_tuning(epochs, lr_finetune,
                                                                                batch_size_finetune)

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, "neural_cleanse")
        device = next(ctx.model.parameters()).device
        t0 = time.perf_counter()
        rev = reverse_engineer_triggers(ctx.model, clean.float_tensor(device), clean.num_classes, steps=self.steps,
                                        batch_size=self.batch_size, lr=self.lr, init_cost=self.init_cost,
                                        check_every=self.check_every, seed=ctx.seed, progress=ctx.progress,
                                        bf16=loop_bf16(ctx.model, clean))
        secs = time.perf_counter() - t0
        index = mad_anomaly_index(rev.l1)
        flagged = np.nonzero((index > self.threshold) & (rev.l1 < np.median(rev.l1)))[0]
        metrics = {"anomaly_index": index.tolist(), "mask_l1": rev.l1.tolist(),
                   "reverse_success": rev.success.tolist(), "flagged_classes": flagged.tolist(),
                   "n_flagged": int(len(flagged)), "max_anomaly_index": float(index.max()),
                   "reverse_seconds": secs}
        if ctx.poisoning is not None and ctx.poisoning.target_class is not None:  # metric only
            metrics["target_flagged"] = bool(ctx.poisoning.target_class in flagged)
        # uint8 keeps the cached copy small (K images per array); the plot needs no more precision
        arrays = {"nc_mask": to_uint8_nhwc(rev.masks)[..., 0], "nc_pattern": to_uint8_nhwc(rev.patterns)}
        if not len(flagged):
            return DefenseResult(model=ctx.model, metrics=metrics, arrays=arrays)
        idx = pick(len(clean), self.unlearn_rate, ctx.seed)
        x = clean.float_tensor(device)[torch.from_numpy(idx)]
        which = torch.from_numpy(flagged[np.arange(len(idx)) % len(flagged)])  # spread over flagged classes
        images = clean.images.copy()
        images[idx] = to_uint8_nhwc(rev.stamp(x, which.to(device)))
        model, hist = finetune_copy(ctx.model, clean.with_data(images=images), epochs=self.epochs,
                                    lr=self.lr_finetune, batch_size=self.batch_size_finetune, seed=ctx.seed,
                                    progress=ctx.progress, description="neural cleanse unlearning")
        metrics.update(n_unlearn=int(len(idx)), finetune_loss=hist[-1]["loss"])
        return DefenseResult(model=model, metrics=metrics, arrays=arrays)
