"""WaNet: Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack" (ICLR 2021)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from poisonlab.attacks._bb_common import (changed_rows, check_target, map_uint8, pick_backdoor, pick_extra, stamp,
                                          torch_generator)
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger
from poisonlab.validate import check_range, check_rate
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError


def warp_grid(noise: np.ndarray, h: int, w: int, s: float, grid_rescale: float) -> torch.Tensor:
    """WaNet's warping field for ``h`` x ``w`` images: ``(1, h, w, 2)`` sampling positions in [-1, 1].

    ``noise`` ``(2, k, k)`` holds the random control-point displacements (x then y); they are
    upsampled bicubically to the image size, scaled by ``s`` / side, added to the identity grid,
    multiplied by ``grid_rescale`` and clipped to the image (the paper's Eq. 4-5).
    """
    ctrl = torch.from_numpy(np.asarray(noise, dtype=np.float32))[None]
    field = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    identity = torch.stack((xx, yy), 2)[None]  # grid_sample reads (x, y)
    scale = torch.tensor([s / w, s / h])
    return ((identity + field * scale) * grid_rescale).clamp(-1, 1)


@dataclass(eq=False)
class WarpTrigger(Trigger):
    """WaNet's trigger: every image is resampled through one fixed smooth warping field.

    ``noise`` ``(2, k, k)`` are the control-point displacements (uniform in [-1, 1], scaled so their
    mean magnitude is 1); the field is built for each image shape by :func:`warp_grid`, so the same
    trigger applies to training and test images. The warp is bilinear, on [0, 1] images, rounded to uint8.
    """

    noise: np.ndarray
    s: float = 0.5
    grid_rescale: float = 1.0

    def apply(self, images: np.ndarray) -> np.ndarray:
        return self.warp(images)

    def warp(self, images: np.ndarray, jitter: torch.Generator | None = None) -> np.ndarray:
        """Warp uint8 NHWC ``images``; with ``jitter`` each image's field also gets its own uniform
        noise of up to half a pixel (WaNet's "noise mode" cross samples), drawn from that generator."""
        h, w = images.shape[1:3]
        grid = warp_grid(self.noise, h, w, self.s, self.grid_rescale)

        def fn(x: torch.Tensor) -> torch.Tensor:
            g = grid.expand(len(x), -1, -1, -1)
            if jitter is not None:
                d = torch.rand(len(x), h, w, 2, generator=jitter) * 2 - 1
                g = (g + d * torch.tensor([2.0 / w, 2.0 / h]) / 2).clamp(-1, 1)
            return F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=True)

        return map_uint8(images, fn)


@ATTACKS.register("wanet")
class WaNet(Attack):
    """WaNet warping backdoor (dirty label, all-to-one), Nguyen and Tran (ICLR 2021).

    Trigger: a fixed, smooth elastic warp of the whole image (:class:`WarpTrigger`): ``k`` x ``k``
    random control points, upsampled to the image, strength ``s``, ``grid_rescale`` as in the paper.
    ``rate`` of the training set (non-target classes) is warped and relabelled ``target``; in the
    paper's *noise mode* another ``cross_ratio`` x ``rate`` of the set (any class, not already
    poisoned) is warped with the field plus per-image random noise (up to half a pixel) and KEEPS its
    label, which teaches the model that only the exact warp means ``target`` (harder to detect).
    Every image whose pixels changed is in ``record.indices``; ``extra`` has the counts.

    Defaults are the paper's and BackdoorBench's: k=4, s=0.5, grid_rescale=1, cross_ratio=2, 10%.
    The paper and BackdoorBench warp a share of every mini-batch afresh during training (the attacker
    controls training); here the poisoned set is fixed once, as a data-poisoning attack must be, so
    the cross samples carry one random noise draw each instead of a new one every epoch.

    Args:
        rate: share of the WHOLE training set warped and relabelled, (0, 1].
        target: class the warp maps to.
        k: control grid size, [2, 64].
        s: warping strength, (0, 64] (pixels of displacement are about ``s * noise / 2``).
        grid_rescale: rescale of the warped grid, (0, 2].
        cross_ratio: noise-mode samples per poisoned sample, [0, 10] (0 switches noise mode off).
    """

    family = "backdoor"

    def __init__(self, rate: float = 0.1, target: int = 0, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0):
        self.rate = check_rate(rate)
        self.target = check_target(target)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ParameterError(f"k must be an integer grid size, got {k!r}")
        self.k = int(check_range(k, "k", 2, 64))
        self.s = float(check_range(s, "s", 0, 64, lo_open=True))
        self.grid_rescale = float(check_range(grid_rescale, "grid_rescale", 0, 2, lo_open=True))
        self.cross_ratio = float(check_range(cross_ratio, "cross_ratio", 0, 10))

    def check(self, train: ImageSet) -> None:
        super().check(train)
        if self.k > min(train.shape[:2]):
            raise ParameterError(f"wanet: k={self.k} control points do not fit in {train.shape[0]}x{train.shape[1]} "
                                 f"images (at most {min(train.shape[:2])})")
        n = len(train)
        need = n_bd = int(round(self.rate * n))
        need += int(round(self.cross_ratio * self.rate * n))
        if need > n:
            raise ParameterError(f"wanet: rate={self.rate} with cross_ratio={self.cross_ratio} needs {need} "
                                 f"samples ({n_bd} poisoned + cross), more than the {n} in the set")

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name or "wanet"
        noise = rng.uniform(-1, 1, size=(2, self.k, self.k)).astype(np.float32)
        noise /= np.abs(noise).mean()  # mean magnitude 1, as in the paper's code
        trigger = WarpTrigger(noise, self.s, self.grid_rescale)
        bd = pick_backdoor(train, self.rate, self.target, rng, who)
        cross = pick_extra(len(train), bd, self.cross_ratio, self.rate, rng, who, "cross_ratio")
        images, labels = stamp(train, bd, trigger, self.target)
        if len(cross):
            images[cross] = trigger.warp(train.images[cross], jitter=torch_generator(rng))
            cross = cross[changed_rows(images[cross], train.images[cross])]  # a flat image may not change
        idx = np.union1d(bd, cross)
        extra = {"n_backdoor": int(len(bd)), "n_cross": int(len(cross))}
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=trigger, extra=extra))
