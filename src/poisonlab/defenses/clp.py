"""Channel Lipschitzness-based Pruning: Zheng, Zhang, Zhang and Zhao, "Data-free Backdoor Removal based
on Channel Lipschitzness" (ECCV 2022)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from poisonlab.validate import check_range
from poisonlab.defenses._bb_common import conv_bn_pairs
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.errors import ParameterError


def channel_lipschitz(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """Upper bound of each output channel's Lipschitz constant (UCLC) of ``bn(conv(x))``.

    Channel k's kernel ``W_k`` reshaped to ``(C_in, kh * kw)``, scaled by ``|gamma_k / sigma_k|``;
    its largest singular value is the bound (the batch-norm shift does not change it).
    """
    w = conv.weight.detach().float()
    scale = (bn.weight.detach().float() / (bn.running_var.detach().float() + bn.eps).sqrt()).abs()
    mats = w.reshape(w.shape[0], w.shape[1], -1) * scale[:, None, None]
    return torch.linalg.matrix_norm(mats, ord=2)


def clp_prune_masks(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], u: float) -> list[torch.Tensor]:
    """Per pair, a boolean mask of the channels whose UCLC exceeds the layer's mean + ``u`` x std."""
    out = []
    for conv, bn in pairs:
        lips = channel_lipschitz(conv, bn)
        out.append(lips > lips.mean() + u * lips.std())
    return out


@DEFENSES.register("clp")
class CLP(Defense):
    """Data-free channel Lipschitzness-based pruning, CLP (Zheng et al., ECCV 2022).

    Input: ``ctx.model`` only (no data: the trusted clean set is not used). For every convolution
    followed by a batch norm (found by one forward pass of a zero image, :func:`conv_bn_pairs`), the
    upper bound of each channel's Lipschitz constant is computed from the weights
    (:func:`channel_lipschitz`); channels above the layer's mean + ``u`` x standard deviation are
    pruned by zeroing their batch-norm scale and shift. Output: the pruned copy. The paper's and
    BackdoorBench's default is u = 3 (the paper sweeps u from 0 to 10). On narrow nets (fastnet
    16-32-64) u = 3 pruned one channel and left a BadNets backdoor on MNIST and digits; u = 2 removed
    the digits' one-pixel one (docs/defenses.md).

    Args:
        u: threshold in standard deviations above the mean, [0, 100].
    """

    kind = "repair"
    retrains = False

    def __init__(self, u: float = 3.0):
        self.u = float(check_range(u, "u", 0, 100))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        who = self.registry_name or "clp"
        model = copy.deepcopy(ctx.model).eval()
        pairs = conv_bn_pairs(model, ctx.train.shape)
        if not pairs:
            raise ParameterError(f"{who} prunes convolutions followed by batch norm; model "
                                 f"{type(ctx.model).__name__} has none (use fastnet, resnet18, vgg_like or cnn3)")
        masks = clp_prune_masks(pairs, self.u)
        with torch.no_grad():
            for (_, bn), m in zip(pairs, masks):
                bn.weight[m] = 0.0
                bn.bias[m] = 0.0
        per_layer = [int(m.sum()) for m in masks]
        channels = sum(int(m.numel()) for m in masks)
        return DefenseResult(model=model, metrics={
            "pruned_channels": int(np.sum(per_layer)), "channels": channels,
            "prune_fraction": float(np.sum(per_layer)) / max(1, channels), "pruned_per_layer": per_layer,
            "layers": len(pairs)})
