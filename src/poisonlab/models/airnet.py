"""AirNet: the airbench94 network, the strong fast victim (94% on CIFAR-10 with the ``airbench94`` recipe).

Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU" (2024) and its Muon variant
(``airbench94_muon.py``, 94.01% mean over 200 runs in 8 epochs). The architecture, re-written here:

- a 2x2 stem convolution whose weights whiten 2x2 patches of the training images (PCA whitening,
  both signs of each component) and stay frozen; only its bias trains, and only early on
  (``TrainConfig.stem_bias_epochs``);
- three groups of (conv 3x3, max-pool 2, BN, GELU, conv 3x3, BN, GELU) of widths 64-256-256, the
  convolutions initialised as identity (Dirac) on their first input channels;
- batch norm with a frozen unit scale (a learnable bias only), running statistics with momentum 0.4
  (airbench's "0.6" counts the other way) and eps 1e-12;
- global max pooling and a bias-free linear head of unit-variance weights whose logits are divided by
  the last width.

The recipe that trains it (Muon on the filters, Nesterov SGD on biases and the head, label smoothing
0.2, alternating flip, 2-pixel translation, batch 2000, flip + translate test-time augmentation) is
the ``airbench94`` preset of :class:`poisonlab.training.TrainConfig`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from poisonlab.models.base import MODELS, Classifier, Scale, WhitenedStem, airbench_groups


class _AirBatchNorm(nn.BatchNorm2d):
    """airbench's batch norm: eps 1e-12, running statistics with momentum 0.4, by default a fixed unit scale."""

    def __init__(self, num_features: int, learn_scale: bool = False):
        super().__init__(num_features, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(learn_scale)


class _DiracConv(nn.Conv2d):
    """3x3 convolution without bias, its first ``in_channels`` filters initialised as the identity."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=1, bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            n = min(self.in_channels, self.out_channels)
            nn.init.dirac_(self.weight[:n])


@MODELS.register("airnet")
class AirNet(WhitenedStem, Classifier):
    """The airbench94 network (see the module docstring); ``widths`` of the three conv groups.

    Default widths (64, 256, 256) are airbench94's: 1.97 M trainable parameters, 0.708 GFLOP per
    32x32 training image (forward + backward). Narrower widths give the ``airbench_quick`` victim.
    Pooling stops where the feature map is already 1x1, so 8x8 and 28x28 images work too.

    ``train_stem=True`` lets the whitening filters learn and ``bn_scale=True`` gives batch norm a
    learnable scale: both depart from airbench and exist to measure what each choice is worth
    (docs/performance.md).
    """

    summary = "airbench94 network (whitened 2x2 stem, 3 conv groups 64-256-256): 94% CIFAR-10 recipe"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 widths: Sequence[int] = (64, 256, 256), train_stem: bool = False, bn_scale: bool = False,
                 mean=None, std=None):
        super().__init__(in_channels, mean, std)
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be three positive integers, got {list(widths)}")
        w0 = 2 * in_channels * 4
        self.stem = nn.Conv2d(in_channels, w0, 2, padding=0, bias=True)
        self.stem.weight.requires_grad_(bool(train_stem))
        groups, cin = airbench_groups(w0, widths, image_size - 1, _DiracConv,
                                      lambda w: _AirBatchNorm(w, learn_scale=bool(bn_scale)))
        layers: list[nn.Module] = [self.stem, nn.GELU(), *groups]
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        linear = nn.Linear(cin, num_classes, bias=False)
        with torch.no_grad():
            linear.weight.div_(linear.weight.std())
        self.head = nn.Sequential(linear, Scale(1 / cin))
        # saved with the weights, so a trained or loaded model is never re-initialised
        self.register_buffer("data_initialised", torch.zeros((), dtype=torch.bool))

    @property
    def stem_bias(self) -> nn.Parameter:
        """The whitening stem's bias: trained for ``TrainConfig.stem_bias_epochs`` epochs, then frozen."""
        return self.stem.bias
