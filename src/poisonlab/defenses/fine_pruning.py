"""Fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.defenses._repair import finetune_copy, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.training.loop import predict_logits
from poisonlab.validate import check_range, check_tuning


def prune_point(model: nn.Module) -> nn.Module:
    """The module whose output channels are pruned: the batch norm right after ``model.last_conv``, else that conv.

    Zeroing the batch norm's output (not the conv's) makes the pruned
    channel's activation exactly 0 after ReLU, LeakyReLU or GELU, as pruning
    the neuron would.
    """
    conv = model.last_conv
    mods = list(model.body.modules()) if hasattr(model, "body") else list(model.modules())
    after = mods[mods.index(conv) + 1:]
    for m in after:
        if isinstance(m, nn.BatchNorm2d) and m.num_features == conv.out_channels:
            return m
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            break
    return conv


class ChannelMask:
    """Forward hook multiplying a module's (N, C, H, W) output by a 0/1 channel mask.

    The mask also zeroes the gradients reaching the pruned channels, so fine-tuning cannot revive them.
    """

    def __init__(self, channels: int):
        self.mask = torch.ones(channels)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.to(output.device, output.dtype)[None, :, None, None]


@torch.no_grad()
def channel_activity(model: nn.Module, point: nn.Module, images: ImageSet, batch_size: int = 512) -> np.ndarray:
    """Mean positive activation of each output channel of ``point`` over ``images`` (and all positions)."""
    sums: list[torch.Tensor] = []
    h = point.register_forward_hook(lambda m, i, o: sums.append(o.float().clamp_min(0).mean((2, 3)).sum(0)))
    try:
        predict_logits(model, images, batch_size=batch_size)
    finally:
        h.remove()
    return (torch.stack(sums).sum(0) / len(images)).cpu().numpy()


def _acc(model: nn.Module, data: ImageSet) -> float:
    return float((predict_logits(model, data).argmax(1).numpy() == data.labels).mean())


@DEFENSES.register("fine_pruning")
class FinePruning(Defense):
    """Prune the last conv layer's dormant channels, then fine-tune (Liu et al. 2018).

    Input: ``ctx.model`` (any registry model: ``model.last_conv`` is pruned) and
    ``ctx.clean_set``. Channels are ranked by their mean activation on the clean
    set; the least active are masked (output set to 0, also in the saved weights
    via the following batch norm's scale and shift) as long as accuracy on the
    clean set stays within ``margin`` of the unpruned model's. The pruned copy is
    then fine-tuned on the clean set with the masks kept. Output: that copy.

    Liu et al. prune one channel at a time and stop at the first that costs more
    than the allowed drop; here the number of channels is found by binary search
    (O(log C) evaluations instead of C), which is the same point when accuracy
    falls monotonically with pruning, as in the paper's curves.

    Args:
        margin: allowed drop of clean-set accuracy while pruning, in (0, 1).
        max_fraction: never prune more than this share of the channels, (0, 1).
        epochs, lr, batch_size: fine-tuning after pruning (``epochs=0`` is not
            allowed; use margin alone by setting a tiny ``lr`` if you want pruning only).
    """

    kind = "repair"
    retrains = False

    def __init__(self, margin: float = 0.05, max_fraction: float = 0.95, epochs: int = 10, lr: float = 0.01,
                 batch_size: int = 64):
        self.margin = float(check_range(margin, "margin", 0, 1, lo_open=True, hi_open=True))
        self.max_fraction = float(check_range(max_fraction, "max_fraction", 0, 1, lo_open=True, hi_open=True))
        self.epochs, self.lr, self.batch_size = check_tuning(epochs, lr, batch_size)

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, "fine_pruning")
        model = copy.deepcopy(ctx.model).eval()
        point = prune_point(model)
        activity = channel_activity(model, point, clean)
        order = np.argsort(activity, kind="stable")  # least active first
        c = len(order)
        hook = ChannelMask(c)
        point.register_forward_hook(hook)

        def acc_pruned(k: int) -> float:
            hook.mask.fill_(1.0)
            hook.mask[torch.from_numpy(order[:k])] = 0.0
            return _acc(model, clean)

        base = acc_pruned(0)
        floor = base - self.margin
        lo, hi = 0, max(0, min(c - 1, int(self.max_fraction * c)))  # acc(lo) >= floor always
        evals = 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            evals += 1
            if acc_pruned(mid) >= floor:
                lo = mid
            else:
                hi = mid - 1
        pruned_acc = acc_pruned(lo)
        with torch.no_grad():  # make the pruning part of the weights, not only of the hook
            ch = torch.from_numpy(order[:lo])
            point.weight[ch] = 0.0
            if point.bias is not None:
                point.bias[ch] = 0.0
        tuned, hist = finetune_copy(model, clean, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                    seed=ctx.seed, progress=ctx.progress, description="fine-pruning")
        return DefenseResult(model=tuned, metrics={
            "pruned_channels": int(lo), "channels": int(c), "prune_fraction": lo / c,
            "pruned_layer": type(point).__name__, "prune_evaluations": evals,
            "clean_set_acc_before": base, "clean_set_acc_pruned": pruned_acc,
            "clean_set_acc_after": _acc(tuned, clean), "finetune_loss": hist[-1]["loss"],
        })
