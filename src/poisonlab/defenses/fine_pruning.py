"""Fine-pruning (Liu, Dolan-Gavitt and Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018)."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, finetune_copy, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.training.loop import predict_logits
from poisonlab.validate import check_range, check_tuning


_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


@dataclass
class PrunePoint:
    """Where fine-pruning masks channels, and where it reads them.

    Attributes:
        mask_module: the module whose output the channel mask multiplies (a forward hook).
        mask_name: its qualified name in the model (for the metrics).
        layer_output: the module whose output is the pruned layer's output, the feature map that
            reaches the pooling: the activation after ``model.last_conv`` in a plain network, the
            last residual block (after its identity shortcut is added) in a ResNet, the final
            BN + activation after the last block in a pre-activation ResNet.
        layer_call: which call of ``layer_output`` within one forward pass is that output (a module
            object used several times, like VGG-like's one shared ReLU, is called more than once).
        channels: number of channels of the layer.
    """

    mask_module: nn.Module
    mask_name: str
    layer_output: nn.Module
    layer_call: int
    channels: int


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Every module call of ``model.body`` in the order the calls end, with (a copy of) its output."""
    events: list[tuple[nn.Module, torch.Tensor]] = []
    body = model.body if hasattr(model, "body") else model
    hooks = [m.register_forward_hook(lambda mod, i, o: events.append((mod, o.detach().clone())))
             for m in body.modules() if m is not body]
    try:
        with torch.no_grad():
            model.eval()
            model.features(x) if hasattr(model, "features") else model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(m, o) for m, o in events if isinstance(o, torch.Tensor)]


@torch.no_grad()
def prune_point(model: nn.Module, probe: torch.Tensor) -> PrunePoint:
    """Find where to mask ``model.last_conv``'s channels so that they are exactly 0 at the layer's output.

    ``probe`` is a small float NCHW batch in [0, 1] of the model's input shape (a few images suffice).
    One forward pass over ``probe`` lists the module calls after the last convolution that keep its
    feature map's shape, up to the pooling: that run is the layer (conv, batch norm, activation; in a
    residual network the rest of the block, whose output adds the identity shortcut back, and in a
    pre-activation ResNet the final BN + activation after the last block). The masked module is the
    latest one of the run, called once per forward pass, at which zeroing half of the channels leaves
    exactly those channels 0 at the layer's output -- checked on ``probe``, not assumed. Masking the
    output of the last conv's own batch norm instead, as a plain network allows, would leave a
    ResNet's pruned channels carrying the shortcut's signal.

    Raises:
        ValueError: if no module of the run zeroes the channels at the layer's output.
    """
    conv = model.last_conv
    events = _trace(model, probe)
    calls: dict[int, int] = {}
    for m, _ in events:
        calls[id(m)] = calls.get(id(m), 0) + 1
    i0 = max(i for i, (m, _) in enumerate(events) if m is conv)
    shape = events[i0][1].shape
    run = [i0]
    for i in range(i0 + 1, len(events)):
        m, o = events[i]
        if isinstance(m, _POOLING) or o.shape != shape:
            break
        run.append(i)
    out_module = events[run[-1]][0]
    out_call = sum(1 for m, _ in events[:run[-1]] if m is out_module)
    names = {id(m): n for n, m in model.named_modules()}
    c = shape[1]
    half = torch.zeros(c)
    half[::2] = 1.0  # mask every other channel: the zeroed ones must stay exactly zero at the output
    for i in reversed(run):
        m = events[i][0]
        if calls[id(m)] != 1:
            continue  # a shared module (one ReLU object used by several layers): a hook would hit all of them
        point = PrunePoint(m, names.get(id(m), type(m).__name__), out_module, out_call, c)
        mask = ChannelMask(c)
        mask.mask.copy_(half)
        h = m.register_forward_hook(mask)
        try:
            out = layer_outputs(model, point, probe)
        finally:
            h.remove()
        if bool((out[:, half == 0] == 0).all()):
            return point
    raise ValueError(f"fine-pruning found no module after {type(conv).__name__} {names.get(id(conv))!r} whose "
                     "masked output stays zero at the layer's output")


class ChannelMask:
    """Forward hook multiplying a module's (N, C, H, W) output by a 0/1 channel mask.

    The mask also zeroes the gradients reaching the pruned channels, so fine-tuning cannot revive them.
    """

    def __init__(self, channels: int):
        self.mask = torch.ones(channels)

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.to(output.device, output.dtype)[None, :, None, None]


def layer_outputs(model: nn.Module, point: PrunePoint, x: torch.Tensor) -> torch.Tensor:
    """The pruned layer's output feature map (N, C, H, W) for the float NCHW batch ``x``."""
    seen: list[torch.Tensor] = []
    h = point.layer_output.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        h.remove()
    return seen[point.layer_call]


@torch.no_grad()
def channel_activity(model: nn.Module, point: PrunePoint, images: ImageSet, batch_size: int = 512) -> np.ndarray:
    """Mean activation of each channel of the pruned layer's output over ``images`` and all positions
    (Liu et al. rank channels by it)."""
    sums = torch.zeros(point.channels, dtype=torch.float64)
    dev = next(model.parameters()).device
    x_all = images.tensors()[0]
    for i in range(0, len(x_all), batch_size):
        x = x_all[i:i + batch_size].to(dev).float().div_(255)
        sums += layer_outputs(model, point, x).double().mean((2, 3)).sum(0).cpu()
    return (sums / len(images)).numpy()


def _acc(model: nn.Module, data: ImageSet) -> float:
    return float((predict_logits(model, data).argmax(1).numpy() == data.labels).mean())


@DEFENSES.register("fine_pruning")
class FinePruning(Defense):
    """Prune the last convolutional layer's dormant channels, then fine-tune (Liu et al. 2018).

    Input: ``ctx.model`` (any registry model) and ``ctx.clean_set``. Output: a pruned, fine-tuned copy.

    The pruned layer is ``model.last_conv`` with what completes it before the pooling
    (:func:`prune_point`): its activation in a plain network, the rest of the residual block in a
    ResNet (so a pruned channel is 0 *after* the identity shortcut is added back), the final
    BN + activation in a pre-activation ResNet. Channels are ranked by their mean activation at that
    output on the clean set; the least active are masked (a forward hook multiplies the masked
    module's output by 0, so the channel is exactly 0 at the layer's output and gets no gradient)
    as long as accuracy on the clean set stays within ``margin`` of the unpruned model's. The pruned
    copy is then fine-tuned on the clean set with the mask kept; the mask lives in the hook, not in
    the weights (a state dict saved from the copy does not carry it).

    Liu et al. prune one channel at a time and stop at the first that costs more than the allowed
    drop; here the number of channels is found by binary search (O(log C)
    evaluations instead of C), which is the same point when accuracy falls monotonically with
    pruning, as in the paper's curves.

    Args:
        margin: allowed drop of clean-set accuracy while pruning, in (0, 1).
        max_fraction: never prune more than this share of the channels, (0, 1).
        epochs, lr, batch_size: fine-tuning after pruning (``epochs=0`` is not
            allowed; use margin alone by setting a tiny ``lr`` if you want pruning only).

    Metrics: ``pruned_channels``, ``channels``, ``prune_fraction``, ``masked_module`` and
    ``layer_output`` (qualified names), ``pruned_output_max_abs`` (the largest magnitude of a pruned
    channel at the layer's output on the clean set after fine-tuning: 0 when the pruning holds), the
    clean-set accuracies before, pruned and after.
    """

    kind = "repair"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = False

    def __init__(self, margin: float = 0.05, max_fraction: float = 0.95, epochs: int = 10, lr: float = 0.01,
                 batch_size: int = 64):
        self.margin = float(check_range(margin, "margin", 0, 1, lo_open=True, hi_open=True))
        self.max_fraction = float(check_range(max_fraction, "max_fraction", 0, 1, lo_open=True, hi_open=True))
        self.epochs, self.lr, self.batch_size = check_tuning(epochs, lr, batch_size)

    def run(self, ctx: DefenseContext) -> DefenseResult:
        clean = require_clean_set(ctx, "fine_pruning")
        model = copy.deepcopy(ctx.model).eval()
        dev = next(model.parameters()).device
        probe = clean.tensors()[0][:8].to(dev).float().div_(255)
        point = prune_point(model, probe)
        activity = channel_activity(model, point, clean)
        order = np.argsort(activity, kind="stable")  # least active first
        c = len(order)
        hook = ChannelMask(c)
        point.mask_module.register_forward_hook(hook)

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
        tuned, hist = finetune_copy(model, clean, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                                    seed=ctx.seed, progress=ctx.progress, description="fine-pruning")
        # the copy carries its own copy of the hook; read the pruned channels where the layer ends
        names = dict(tuned.named_modules())
        tuned_point = PrunePoint(names[point.mask_name], point.mask_name,
                                 names[_name(model, point.layer_output)], point.layer_call, c)
        out = layer_outputs(tuned, tuned_point, clean.tensors()[0][:256].to(dev).float().div_(255))
        leak = float(out[:, torch.from_numpy(order[:lo])].abs().max()) if lo else 0.0
        return DefenseResult(model=tuned, metrics={
            "pruned_channels": int(lo), "channels": int(c), "prune_fraction": lo / c,
            "masked_module": point.mask_name, "layer_output": _name(model, point.layer_output),
            "pruned_output_max_abs": leak, "prune_evaluations": evals,
            "clean_set_acc_before": base, "clean_set_acc_pruned": pruned_acc,
            "clean_set_acc_after": _acc(tuned, clean), "finetune_loss": hist[-1]["loss"],
        })


def _name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)
