"""The seed architectures of the studies poisonlab replicates, and a fast default net."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from poisonlab.models.base import MODELS, Classifier, Scale, WhitenedStem, airbench_groups


def _conv_bn(cin: int, cout: int, act: nn.Module) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), act]


@MODELS.register("vgg_like")
class VGGLike(Classifier):
    """VGG-like CNN of the CIFAR-10 label-flipping study.

    conv 32-32 / pool / conv 64-64 / pool, each conv followed by batch norm and
    ReLU, then dense 512 and the output layer (softmax applied by the loss).
    """

    summary = "VGG-like 32-32-64-64 + dense 512 (CIFAR-10 label-flipping study)"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 dropout: float = 0.0, mean=None, std=None):
        super().__init__(in_channels, mean, std)
        r = nn.ReLU(inplace=True)
        s = image_size // 4
        self.body = nn.Sequential(
            *_conv_bn(in_channels, 32, r), *_conv_bn(32, 32, r), nn.MaxPool2d(2),
            *_conv_bn(32, 64, r), *_conv_bn(64, 64, r), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * s * s, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.head = nn.Linear(512, num_classes)


@MODELS.register("cnn3")
class CNN3(Classifier):
    """Three-block CNN of the backdoor-trigger thesis.

    Blocks of two 3x3 convs (64, 128, 256 filters) with batch norm and
    LeakyReLU(0.1), max pooling and dropout (0.3, 0.3, 0.4), then dense 512 +
    batch norm + LeakyReLU + dropout 0.5 and dense ``num_classes``.
    3,251,018 trainable parameters on 32x32x3 (3,253,834 with BN statistics).
    """

    summary = "3 blocks x 2 convs 64/128/256 + dense 512 (backdoor-trigger thesis)"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, mean=None, std=None):
        super().__init__(in_channels, mean, std)
        layers: list[nn.Module] = []
        cin = in_channels
        for cout, p in ((64, 0.3), (128, 0.3), (256, 0.4)):
            layers += _conv_bn(cin, cout, nn.LeakyReLU(0.1, inplace=True))
            layers += _conv_bn(cout, cout, nn.LeakyReLU(0.1, inplace=True))
            layers += [nn.MaxPool2d(2), nn.Dropout(p)]
            cin = cout
        s = image_size // 8
        layers += [nn.Flatten(), nn.Linear(256 * s * s, 512), nn.BatchNorm1d(512),
                   nn.LeakyReLU(0.1, inplace=True), nn.Dropout(0.5)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)


@MODELS.register("mnist_cnn")
class MnistCNN(Classifier):
    """Small CNN of the MNIST PCA/K-means study.

    conv 32 / pool / conv 64 / pool / conv 128 (unpadded) / pool, ReLU, dense 128,
    dense 10: 160,202 parameters on 28x28x3, 159,626 on 28x28x1.
    """

    summary = "conv 32/64/128 + dense 128 (MNIST PCA/K-means study)"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, mean=None, std=None):
        super().__init__(in_channels, mean, std)
        s = ((image_size // 2) // 2 - 2) // 2
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(128 * s * s, 128), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(128, num_classes)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


@MODELS.register("resnet18")
class ResNet18(Classifier):
    """ResNet-18, CIFAR variant (He et al. 2016): 3x3 stem, no stem pooling; 11,173,962 parameters."""

    summary = "ResNet-18, CIFAR variant (3x3 stem, no stem pooling)"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, mean=None, std=None):
        super().__init__(in_channels, mean, std)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)


@MODELS.register("fastnet")
class FastNet(WhitenedStem, Classifier):
    """The fast default net: a small airbench-style CNN tuned for CPU training.

    A 2x2 stem convolution whose weights are set by :meth:`data_init` to
    whiten 2x2 patches of the training images (PCA whitening, both signs of
    each component, as in Keller Jordan's airbench, 2024), then three groups
    of (conv 3x3, max-pool 2, BN, GELU, conv 3x3, BN, GELU), global max
    pooling and a scaled linear head. Widths are reduced from airbench's so
    a 2-core CPU trains CIFAR-10 in minutes; unlike airbench the stem and the
    batch-norm scales stay trainable (see :class:`poisonlab.models.airnet.AirNet`
    for the faithful airbench94 network).
    """

    summary = "fast default net (airbench-style, small widths) for quick CPU runs"

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 widths: Sequence[int] = (64, 128, 256), mean=None, std=None):
        super().__init__(in_channels, mean, std)
        w0 = 2 * in_channels * 4
        self.stem = nn.Conv2d(in_channels, w0, 2, padding=0, bias=True)
        groups, cin = airbench_groups(w0, widths, image_size - 1,
                                      lambda i, o: nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d)
        layers: list[nn.Module] = [self.stem, nn.GELU(), *groups]
        layers += [nn.AdaptiveMaxPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(cin, num_classes, bias=False), Scale(1 / 9))
        # saved with the weights, so a trained or loaded model is never re-initialised
        self.register_buffer("data_initialised", torch.zeros((), dtype=torch.bool))
