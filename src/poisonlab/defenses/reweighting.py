"""Learning to reweight against a trusted clean set (Ren, Zeng, Yang and Urtasun, "Learning to Reweight
Examples for Robust Deep Learning", ICML 2018)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poisonlab.data.imageset import ImageSet
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.validate import check_range


class L2RWeights:
    """``fn(model, x, y) -> (B,)`` batch weights by one look-ahead step (Ren et al. 2018, Alg. 1).

    With a per-sample perturbation ``eps`` (0 at the current weights), take one
    SGD step ``theta' = theta - grad(sum_i eps_i * loss_i)``, measure the loss
    of ``theta'`` on a batch of the trusted clean set, and weight sample i by
    ``max(0, -d clean_loss / d eps_i)``, normalised to sum 1 (all 0 when no
    sample helps: the batch then teaches nothing). The inner step size only
    scales every weight alike, so it is fixed to 1.

    The look-ahead runs through :func:`torch.func.functional_call` with copies
    of the buffers, so batch-norm running statistics only see the real step.
    """

    def __init__(self, clean: ImageSet, meta_batch_size: int = 100, seed: int = 0):
        self.x_clean, self.y_clean = clean.tensors()
        self.meta_batch_size = min(meta_batch_size, len(clean))
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.zero_share = 0.0  # running mean share of zero-weight samples per batch

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = x.device
        pick = torch.randint(0, len(self.y_clean), (self.meta_batch_size,), generator=self.gen)
        xc = self.x_clean[pick].to(device).float().div_(255)
        yc = self.y_clean[pick].to(device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        # functional_call does not restore a module reachable under two names (FastNet's stem) correctly:
        # put every original parameter back ourselves
        saved = [(m, k, v) for m in model.modules() for k, v in m._parameters.items()]
        eps = torch.zeros(len(y), device=device, requires_grad=True)
        try:
            with torch.enable_grad():
                losses = F.cross_entropy(functional_call(model, (params, buffers), (x.detach(),)).float(), y,
                                         reduction="none")
                grads = torch.autograd.grad((eps * losses).sum(), list(params.values()), create_graph=True,
                                            allow_unused=True)
                ahead = {n: p if g is None else p - g for (n, p), g in zip(params.items(), grads)}
                clean_loss = F.cross_entropy(functional_call(model, (ahead, buffers), (xc,)).float(), yc)
                g_eps = torch.autograd.grad(clean_loss, eps)[0]
        finally:
            for m, k, v in saved:
                m._parameters[k] = v
        w = (-g_eps).clamp_min(0).detach()
        total = w.sum()
        w = w / total if total > 0 else torch.zeros_like(w)
        self.calls += 1
        self.zero_share += (float((w == 0).float().mean()) - self.zero_share) / self.calls
        return w


@DEFENSES.register("reweighting")
class Reweighting(Defense):
    """Adaptive sample reweighting: retrain with learning-to-reweight batch weights (Ren et al. 2018).

    The ResNet-18 study's bilevel defence. Input: ``ctx.train``, the trusted
    ``ctx.clean_set`` and ``ctx.train_model`` (the run's recipe, with the weights
    passed on to :func:`poisonlab.training.fit` as its ``batch_weight_fn``). Each
    training batch is weighted by :class:`L2RWeights`; samples whose gradient
    disagrees with the clean set's (mislabelled or poisoned ones, typically)
    get weight 0. Output: the retrained model. Each step costs about three
    forward/backward passes more than plain training (a double backward).

    Args:
        meta_batch_size: clean images per look-ahead (the paper's clean batch).
    """

    kind = "training"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = True

    def __init__(self, meta_batch_size: int = 100):
        self.meta_batch_size = int(check_range(meta_batch_size, "meta_batch_size", 1, 65_536))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, "reweighting")
        fn = L2RWeights(clean, self.meta_batch_size, ctx.seed)
        t0 = time.perf_counter()
        model = ctx.train_model(ctx.train, description="reweighting", batch_weight_fn=fn)
        metrics: dict[str, Any] = {"weighted_batches": fn.calls, "zero_weight_share": fn.zero_share,
                                   "train_seconds": time.perf_counter() - t0}
        return DefenseResult(model=model, metrics=metrics)
