"""BadNets patch backdoor (Gu et al., "BadNets: Identifying Vulnerabilities in the
Machine Learning Model Supply Chain", 2017)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger, n_poison
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_range, check_rate

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass
class PatchTrigger(Trigger):
    """A solid square of ``size`` pixels at ``intensity`` (0..1 of white) in a corner, ``margin`` pixels in."""

    size: int = 5
    intensity: float = 0.85
    corner: str = "bottom-right"
    margin: int = 0

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        h, w, _ = shape
        if self.size + self.margin > min(h, w):
            raise ParameterError(
                f"trigger size={self.size} (+ margin {self.margin}) does not fit in {h}x{w} images"
            )

    def _slices(self, h: int, w: int) -> tuple[slice, slice]:
        s, m = self.size, self.margin
        rows = slice(h - m - s, h - m) if self.corner.startswith("bottom") else slice(m, m + s)
        cols = slice(w - m - s, w - m) if self.corner.endswith("right") else slice(m, m + s)
        return rows, cols

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        out = images.copy()
        r, c = self._slices(*images.shape[1:3])
        out[:, r, c, :] = np.uint8(round(self.intensity * 255))
        return out

    def mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Boolean (H, W) mask of the trigger's pixels."""
        m = np.zeros(shape[:2], dtype=bool)
        r, c = self._slices(*shape[:2])
        m[r, c] = True
        return m


class PoisonByTrigger(Attack):
    """Shared logic of dirty-label trigger backdoors: pick ``rate`` of the
    non-target samples, stamp the trigger, relabel them ``target``.

    Sub-classes set ``self.trigger``, ``self.rate`` and ``self.target``.
    """

    family = "backdoor"
    trigger: Trigger
    rate: float
    target: int

    def _pool_size(self, train: ImageSet) -> int:
        return int((train.labels != self.target).sum())

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        pool = np.nonzero(train.labels != self.target)[0]
        k = n_poison(self.rate, len(train), self.registry_name)
        idx = np.sort(rng.choice(pool, size=min(k, len(pool)), replace=False))
        images = train.images.copy()
        images[idx] = self.trigger.apply(train.images[idx])
        labels = train.labels.copy()
        labels[idx] = self.target
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=self.trigger))


@ATTACKS.register("badnets")
class BadNets(PoisonByTrigger):
    """BadNets: a square patch in a corner, labels set to the target class.

    Defaults follow the backdoor-trigger thesis (5x5, intensity 0.85,
    bottom-right, target 0, 6% of the training set); BackdoorBench's default
    (3x3 white, 10%) is the ``badnets_bb`` preset. The ``rate`` is a fraction
    of the whole training set; poisoned samples are drawn from the non-target
    classes so that every one of them has its label changed.

    Args:
        rate: fraction of the training set poisoned, (0, 1].
        target: class triggered inputs are mapped to.
        size: side of the square in pixels (must fit in the image).
        intensity: pixel value of the square, fraction of white, [0, 1].
        corner: one of bottom-right, bottom-left, top-right, top-left.
        margin: distance of the square from the image border in pixels.
    """

    def __init__(self, rate: float = 0.06, target: int = 0, size: int = 5, intensity: float = 0.85,
                 corner: str = "bottom-right", margin: int = 0):
        self.rate = check_rate(rate)
        self.target = int(check_range(target, "target", 0, 10_000))
        self.size = int(check_range(size, "size", 1, 4096))
        self.intensity = float(check_range(intensity, "intensity", 0, 1))
        self.corner = check_choice(corner, "corner", CORNERS)
        self.margin = int(check_range(margin, "margin", 0, 4096))
        self.trigger = PatchTrigger(self.size, self.intensity, self.corner, self.margin)

    def params(self) -> dict:
        return {k: getattr(self, k) for k in ("rate", "target", "size", "intensity", "corner", "margin")}


@ATTACKS.register("badnets_bb")
def badnets_backdoorbench(rate: float = 0.1, target: int = 0, size: int = 3, intensity: float = 1.0,
                          corner: str = "bottom-right", margin: int = 0) -> BadNets:
    """BadNets with BackdoorBench's defaults: 3x3 white square, bottom-right, target 0, 10%."""
    a = BadNets(rate, target, size, intensity, corner, margin)
    return a
