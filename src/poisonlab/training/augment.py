"""Batched data augmentation on float NCHW tensors (no per-sample Python)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Pad every image by ``padding`` (reflect) and cut a random window of the original size per image."""
    if padding <= 0:
        return x
    n, c, h, w = x.shape
    mode = "reflect" if padding < min(h, w) else "constant"
    xp = F.pad(x, (padding,) * 4, mode=mode)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device="cpu").to(x.device)
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + dx[:, None]  # (n, w)
    n_idx = torch.arange(n, device=x.device)[:, None, None, None]
    c_idx = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[n_idx, c_idx, rows[:, None, :, None], cols[:, None, None, :]]


def random_flip(x: torch.Tensor, gen: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability 1/2, or exactly those where ``mask`` (bool, (N,)) is set."""
    if mask is None:
        mask = torch.rand(x.shape[0], generator=gen, device="cpu").to(x.device) < 0.5
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def brightness_contrast(x: torch.Tensor, brightness: float, contrast: float,
                        gen: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness shift in [-b, b] and contrast factor in [1-c, 1+c], per image; output clipped to [0, 1]."""
    n = x.shape[0]
    if contrast > 0:
        f = 1 + (torch.rand(n, generator=gen, device="cpu") * 2 - 1).to(x.device) * contrast
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - m) * f[:, None, None, None] + m
    if brightness > 0:
        b = (torch.rand(n, generator=gen, device="cpu") * 2 - 1).to(x.device) * brightness
        x = x + b[:, None, None, None]
    return x.clamp(0, 1)


def augment_batch(x: torch.Tensor, crop_padding: int = 0, flip: bool = False, brightness: float = 0.0,
                  contrast: float = 0.0, gen: torch.Generator | None = None,
                  flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the configured augmentations to a float NCHW batch in [0, 1].

    ``flip_mask`` chooses which images to mirror (airbench's alternating flip) instead of a coin toss.
    """
    if crop_padding:
        x = random_crop(x, crop_padding, gen)
    if flip:
        x = random_flip(x, gen, flip_mask)
    if brightness or contrast:
        x = brightness_contrast(x, brightness, contrast, gen)
    return x
