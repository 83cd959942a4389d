"""Common base for all registry models: normalisation inside, features + head."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from poisonlab.registry import Registry


class Classifier(nn.Module):
    """A classifier taking float NCHW images in [0, 1].

    Sub-classes define ``self.body`` (image -> penultimate feature vector) and
    ``self.head`` (features -> logits). Normalisation by the training set's
    channel mean/std is part of the model, so a saved model carries it.
    """

    body: nn.Module
    head: nn.Module
    summary: str = ""
    """One line for ``poisonlab list``."""

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


MODELS: Registry[Classifier] = Registry("model")
"""Every model registers itself here, in the module that defines it (``@MODELS.register("name")``)."""


@torch.no_grad()
def whitening_filters(x: torch.Tensor, size: int = 2, eps: float = 5e-4) -> torch.Tensor:
    """PCA-whitening filters of the ``size`` x ``size`` patches of ``x`` (float NCHW, already normalised).

    Returns ``(C*size*size, C, size, size)`` filters: eigenvectors of the patch covariance scaled by
    ``1/sqrt(eigenvalue + eps)``, so convolving with them gives decorrelated unit-variance patch
    components (airbench's whitened stem, Keller Jordan 2024).
    """
    c = x.shape[1]
    patches = x.unfold(2, size, 1).unfold(3, size, 1)  # N, C, H-s+1, W-s+1, s, s
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size).double()
    patches = patches - patches.mean(0)
    cov = patches.T @ patches / len(patches)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs.T / torch.sqrt(evals + eps)[:, None]).reshape(c * size * size, c, size, size).float()


class Scale(nn.Module):
    """Multiplies by a constant (a head's fixed logit scale)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class WhitenedStem:
    """Mixin for a classifier whose ``self.stem`` is a 2x2 convolution with ``2*C*4`` filters set from data.

    The model must also register a boolean buffer ``data_initialised`` (saved with the weights, so a
    trained or loaded model is never re-initialised). :func:`poisonlab.training.fit` calls
    :meth:`data_init` on a sample of the training set before the first step.
    """

    stem: nn.Conv2d
    data_initialised: torch.Tensor
    normalize: "Callable[[torch.Tensor], torch.Tensor]"

    @property
    def needs_data_init(self) -> bool:
        return not bool(self.data_initialised)

    @torch.no_grad()
    def data_init(self, x: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to PCA-whiten 2x2 patches of ``x`` (float NCHW in [0, 1], a few thousand images).

        Whitened inputs let the first epochs make progress at a high learning rate.
        """
        w = whitening_filters(self.normalize(x.float()), 2, eps)
        self.stem.weight.copy_(torch.cat([w, -w]))
        self.stem.bias.zero_()
        self.data_initialised.fill_(True)


def airbench_groups(cin: int, widths: Sequence[int], size: int,
                    conv: Callable[[int, int], nn.Module],
                    norm: Callable[[int], nn.Module]) -> tuple[list[nn.Module], int]:
    """airbench's conv groups: per width ``w``, (conv, max-pool 2, norm, GELU, conv, norm, GELU).

    ``size`` is the side of the incoming feature map; pooling stops once it is 1 so small images work.
    Returns the layers and the last width.
    """
    layers: list[nn.Module] = []
    for w in widths:
        w = int(w)
        pool: nn.Module = nn.MaxPool2d(2) if size >= 2 else nn.Identity()
        size = size // 2 if size >= 2 else size
        layers += [conv(cin, w), pool, norm(w), nn.GELU(), conv(w, w), norm(w), nn.GELU()]
        cin = w
    return layers, cin
