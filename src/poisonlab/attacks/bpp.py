"""BppAttack: Wang, Zhai and Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural
Networks via Image Quantization and Contrastive Adversarial Learning" (CVPR 2022)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poisonlab.attacks._bb_common import changed_rows, check_target, pick_backdoor, pick_extra, stamp
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger
from poisonlab.validate import check_range, check_rate
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError


def quantize(images: np.ndarray, levels: int, dithering: bool = True) -> np.ndarray:
    """Reduce uint8 NHWC ``images`` to ``levels`` values per channel (colour-depth shrinking).

    Each value ``v`` becomes ``round(v / 255 * (levels - 1)) / (levels - 1) * 255``. With
    ``dithering`` the rounding error of every pixel is spread to its unprocessed neighbours by
    Floyd-Steinberg's weights (7/16 right, 3/16 below-left, 5/16 below, 1/16 below-right), pixel
    by pixel in raster order as in the paper's code, but for all images and channels at once.
    """
    step = 255.0 / (levels - 1)
    if not dithering:
        return np.clip(np.rint(np.rint(images / step) * step), 0, 255).astype(np.uint8)
    x = images.astype(np.float64)  # N, H, W, C; errors accumulate in place
    n, h, w, _ = x.shape
    for y in range(h):
        for c in range(w):
            old = x[:, y, c].copy()
            new = np.rint(old / step) * step
            x[:, y, c] = new
            err = old - new
            if c + 1 < w:
                x[:, y, c + 1] += err * (7 / 16)
            if y + 1 < h:
                if c > 0:
                    x[:, y + 1, c - 1] += err * (3 / 16)
                x[:, y + 1, c] += err * (5 / 16)
                if c + 1 < w:
                    x[:, y + 1, c + 1] += err * (1 / 16)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass
class QuantizationTrigger(Trigger):
    """BppAttack's trigger: the image itself at ``levels`` colour levels per channel, optionally dithered."""

    levels: int = 8
    dithering: bool = True

    def apply(self, images: np.ndarray) -> np.ndarray:
        return quantize(images, self.levels, self.dithering)


@ATTACKS.register("bpp")
class Bpp(Attack):
    """BppAttack (dirty label, all-to-one), Wang et al. (CVPR 2022): colour-depth shrinking as the trigger.

    ``rate`` of the training set (non-target classes) is quantised to ``levels`` values per channel
    (with Floyd-Steinberg dithering by default, as in the paper; :func:`quantize`) and relabelled
    ``target``; the same quantisation of a test image is the test-time trigger.

    The paper's contrastive "negative" samples are an option (``neg_ratio`` > 0): another
    ``neg_ratio`` x ``rate`` of the set (any class, not poisoned) gets the quantisation residual of a
    random other training image added, ``x + (Q(x') - x')``, and keeps its label, so that the
    model learns the exact quantisation rather than any small perturbation. As in the authors' code
    and BackdoorBench, the residual comes from another image; both re-draw the poisoned and
    negative samples every mini-batch (the attacker controls training), here they are fixed once.

    Defaults: BackdoorBench's 8 levels (3 bits) and 10%; BackdoorBench switches dithering off
    (``dithering = false``) and uses ``neg_ratio`` 0.1 (its "original" preset: 20% poisoned,
    0.2); the paper dithers.

    Args:
        rate: share of the WHOLE training set poisoned, (0, 1].
        target: class the trigger maps to.
        levels: colour levels per channel after shrinking, [2, 128] (BackdoorBench ``squeeze_num``).
        dithering: Floyd-Steinberg dithering of the quantisation.
        neg_ratio: negative samples per poisoned sample, [0, 10] (0: none).
    """

    family = "backdoor"

    def __init__(self, rate: float = 0.1, target: int = 0, levels: int = 8, dithering: bool = True,
                 neg_ratio: float = 0.0):
        self.rate = check_rate(rate)
        self.target = check_target(target)
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
            raise ParameterError(f"levels must be an integer, got {levels!r}")
        self.levels = int(check_range(levels, "levels", 2, 128))
        if not isinstance(dithering, bool):
            raise ParameterError(f"dithering must be true or false, got {dithering!r}")
        self.dithering = dithering
        self.neg_ratio = float(check_range(neg_ratio, "neg_ratio", 0, 10))
        self.trigger = QuantizationTrigger(self.levels, self.dithering)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name or "bpp"
        bd = pick_backdoor(train, self.rate, self.target, rng, who)
        neg = pick_extra(len(train), bd, self.neg_ratio, self.rate, rng, who, "neg_ratio")
        images, labels = stamp(train, bd, self.trigger, self.target)
        if len(neg):
            donors = rng.integers(0, len(train), size=len(neg))
            residual = self.trigger.apply(train.images[donors]).astype(np.int16) - train.images[donors]
            images[neg] = np.clip(train.images[neg].astype(np.int16) + residual, 0, 255).astype(np.uint8)
            neg = neg[changed_rows(images[neg], train.images[neg])]
        idx = np.union1d(bd, neg)
        extra = {"n_backdoor": int(len(bd)), "n_negative": int(len(neg))}
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=self.trigger, extra=extra))
