"""Common base for all registry models: normalisation inside, features + head."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Classifier(nn.Module):
    """A classifier taking float NCHW images in [0, 1].

    Sub-classes define ``self.body`` (image -> penultimate feature vector) and
    ``self.head`` (features -> logits). Normalisation by the training set's
    channel mean/std is part of the model, so a saved model carries it.
    """

    body: nn.Module
    head: nn.Module

    def __init__(self, in_channels: int, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        mean = list(mean) if mean is not None else [0.5] * in_channels
        std = list(std) if std is not None else [0.25] * in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (what activation clustering and spectral signatures use)."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @property
    def last_conv(self) -> nn.Conv2d:
        """The last convolution layer (fine-pruning prunes its channels)."""
        convs = [m for m in self.body.modules() if isinstance(m, nn.Conv2d)]
        return convs[-1]


def count_parameters(model: nn.Module, trainable_only: bool = True, include_buffers: bool = False) -> int:
    """Number of parameters; ``include_buffers`` adds batch-norm running mean/var (as Keras counts them)."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if include_buffers:
        for name, b in model.named_buffers():
            if name.endswith("running_mean") or name.endswith("running_var"):
                n += b.numel()
    return n
