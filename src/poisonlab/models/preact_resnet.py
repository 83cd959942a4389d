"""PreAct-ResNet-18, BackdoorBench's CIFAR-10 victim.

He et al., "Identity Mappings in Deep Residual Networks" (ECCV 2016): each block applies BN and
ReLU *before* its convolutions, and the identity (or a 1x1 projection of the pre-activated input,
when the shape changes) is added to the second convolution's output with no activation after the
sum. The CIFAR variant as BackdoorBench uses it (Wu et al., NeurIPS 2022 Datasets and Benchmarks):
a 3x3 stem of 64 filters without BN or pooling, four stages of two blocks (64, 128, 256, 512;
stride 2 from the second stage on), no BN after the last stage, global average pooling and a
linear head. 11,171,146 trainable parameters on 32x32x3 with 10 classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.models.base import MODELS, Classifier


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut (identity, or a 1x1 conv of the pre-activation)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


@MODELS.register("preact_resnet18")
class PreActResNet18(Classifier):
    """PreAct-ResNet-18 (CIFAR variant, BackdoorBench's victim); see the module docstring."""

    summary = "PreAct-ResNet-18, CIFAR variant (BackdoorBench's victim)"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, mean=None, std=None):
        super().__init__(in_channels, mean, std)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)
