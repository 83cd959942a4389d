"""Helpers shared by the training-time, repair and detection defences (not a defence itself)."""

from __future__ import annotations

import copy

import numpy as np
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.training.device import use_bf16
from poisonlab.training.loop import TrainConfig, fit

MIN_CLEAN_PER_CLASS = 5
"""A trusted clean set needs at least this many images per class of the task (on average)."""


def finetune_augment(data: ImageSet) -> dict:
    """The augmentation of every fine-tune on the trusted set (FT, FP, NC, NAD, FT-SAM), as
    :class:`~poisonlab.training.TrainConfig` fields: BackdoorBench's training transform, a random crop
    with 4 pixels of padding on 28-32 pixel images (an eighth of the side; none below 16 pixels, where
    BackdoorBench has no dataset and one pixel is already an eighth of the 8x8 digits), plus a
    horizontal flip for colour images (BackdoorBench flips CIFAR-10, not MNIST: a mirrored digit is
    another glyph). Without it, 100 epochs on 2,500 CIFAR-10 images memorise the set and leave
    BadNets in place (docs/BACKDOORBENCH.md)."""
    side = data.images.shape[1]
    return dict(crop_padding=round(side / 8) if side >= 16 else 0, flip=data.images.shape[-1] == 3)


def require_clean_set(ctx, who: str, min_per_class: int = MIN_CLEAN_PER_CLASS) -> ImageSet:
    """``ctx.clean_set``, or a :class:`ParameterError` saying why it cannot be used."""
    clean = ctx.clean_set
    if clean is None:
        raise ParameterError(f"{who} needs a trusted clean set (ctx.clean_set) and none was given")
    need = min_per_class * ctx.train.num_classes
    if len(clean) < need:
        raise ParameterError(
            f"{who}: the trusted clean set has {len(clean)} images, fewer than the {need} it needs "
            f"({min_per_class} per class for {ctx.train.num_classes} classes); raise clean_fraction")
    return clean


def finetune_copy(model: nn.Module, data: ImageSet, *, epochs: int, lr: float, batch_size: int, seed: int = 0,
                  progress: bool = False, description: str = "fine-tune") -> tuple[nn.Module, list[dict]]:
    """Fine-tune a deep copy of ``model`` on ``data`` (SGD with momentum, cosine decay, no warm-up, the
    random crop and flip of :func:`finetune_augment`).

    The copy keeps any forward hooks of ``model`` (fine-pruning's channel masks stay on).
    """
    tuned = copy.deepcopy(model)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=min(batch_size, len(data)), schedule="cosine",
                      warmup_fraction=0.0, **finetune_augment(data))
    hist = fit(tuned, data, cfg, seed=seed, progress=progress, description=description)
    return tuned, hist


def loop_bf16(model: nn.Module, data: ImageSet) -> bool:
    """Whether a defence's own loop over ``data`` runs under bfloat16 autocast: the rule that
    :func:`poisonlab.training.fit` applies to :func:`finetune_copy` (:func:`poisonlab.training.use_bf16`
    with ``"auto"``), so that a defence never mixes two precisions. Enter it with
    :func:`poisonlab.training.device.autocast` around the forward pass only; take losses in float32."""
    return use_bf16("auto", next(model.parameters()).device, data.images.shape[2])


def pick(n: int, rate: float, seed: int) -> np.ndarray:
    """Sorted indices of ``round(rate * n)`` (at least one) of ``n`` items, seeded."""
    k = max(1, int(round(rate * n)))
    return np.sort(np.random.default_rng(seed).choice(n, size=min(k, n), replace=False))
