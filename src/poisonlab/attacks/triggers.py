"""Whole-image trigger backdoors: sinusoidal noise, SIG (clean label) and blended.

Every trigger is a picklable dataclass :class:`~poisonlab.attacks.base.Trigger`
with ``apply(uint8 NHWC) -> uint8 NHWC``; it builds its pattern from the image
shape, so the same trigger works on 8x8 grayscale digits and 32x32 colour
CIFAR-10, and the test-time trigger is exactly the training-time one.

Dirty-label backdoors (``sinusoidal``, ``blended``) reuse
:class:`~poisonlab.attacks.badnets.PoisonByTrigger`: ``rate`` is a fraction of
the whole training set, drawn from the non-target classes and relabelled to
``target``. The clean-label ``sig`` poisons only target-class images and keeps
every label; its ``rate`` is a fraction of the target class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger, sample_from_class
from poisonlab.attacks.badnets import PoisonByTrigger
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_range, check_rate


def _add_signal(images: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """``images`` uint8 NHWC plus ``signal`` (H, W, C or broadcastable, in [0, 1] units), clipped and rounded."""
    x = images.astype(np.float32) + np.float32(255.0) * signal.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_frequency(freq: float, n: int, axis: str) -> None:
    # at or above Nyquist the sampled sinusoid aliases (at exactly n/2 cycles it is identically zero)
    if freq >= n / 2:
        raise ParameterError(f"trigger frequency={freq} cycles along {axis} does not fit in {n}-pixel images "
                             f"(must be below {n / 2:g}, the Nyquist limit)")


@dataclass
class SinusoidalTrigger(Trigger):
    """A 2-D plane-wave sinusoid, the same in every channel, added to the image.

    ``signal(y, x) = intensity * sin(2*pi*(freq_x * x / W + freq_y * y / H))``
    in [0, 1] pixel units, then clipped to the valid range. Frequencies are in
    cycles per image side and must stay below half the side (Nyquist).
    """

    intensity: float = 0.03
    freq_x: float = 3.0
    freq_y: float = 3.0

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        h, w, _ = shape
        _check_frequency(self.freq_x, w, "x (width)")
        _check_frequency(self.freq_y, h, "y (height)")

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The additive signal ``(H, W, 1)`` in [0, 1] units for images of ``shape``."""
        h, w, _ = shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        s = self.intensity * np.sin(2 * np.pi * (self.freq_x * xx / w + self.freq_y * yy / h))
        return s[..., None]

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        return _add_signal(images, self.pattern(images.shape[1:]))


@dataclass
class SIGTrigger(Trigger):
    """Barni et al.'s horizontal sinusoidal signal: ``delta * sin(2*pi*j*frequency/W)`` over column j.

    The same in every row and channel; ``delta`` in [0, 1] pixel units (20/255 in
    the paper), ``frequency`` in cycles per image width (6 in the paper).
    """

    delta: float = 20 / 255
    frequency: float = 6.0

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        _check_frequency(self.frequency, shape[1], "x (width)")

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The additive signal ``(1, W, 1)`` in [0, 1] units."""
        w = shape[1]
        j = np.arange(w, dtype=np.float64)
        return (self.delta * np.sin(2 * np.pi * j * self.frequency / w))[None, :, None]

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        return _add_signal(images, self.pattern(images.shape[1:]))


BLEND_PATTERNS = ("noise", "checkerboard")


@dataclass
class BlendedTrigger(Trigger):
    """Chen et al.'s blended injection: ``x' = (1 - alpha) * x + alpha * pattern``.

    ``pattern`` is ``"noise"`` (uniform random uint8 noise, one value per pixel and
    channel, drawn from ``pattern_seed`` for the image shape, so training and test
    images get the same noise) or ``"checkerboard"`` (alternating black and white
    squares of ``cell`` pixels).
    """

    alpha: float = 0.2
    pattern_name: str = "noise"
    pattern_seed: int = 0
    cell: int = 1

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        h, w, _ = shape
        if self.pattern_name == "checkerboard" and 2 * self.cell > min(h, w):
            raise ParameterError(f"checkerboard cell={self.cell} is too large for {h}x{w} images "
                                 f"(two cells must fit, so at most {min(h, w) // 2})")

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The blend pattern, uint8 ``(H, W, C)``."""
        h, w, c = shape
        if self.pattern_name == "noise":
            return np.random.default_rng(self.pattern_seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)
        yy, xx = np.mgrid[0:h, 0:w]
        board = ((yy // self.cell + xx // self.cell) % 2).astype(np.uint8) * 255
        return np.repeat(board[..., None], c, axis=2)

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        p = self.pattern(images.shape[1:]).astype(np.float32)
        x = (1 - self.alpha) * images.astype(np.float32) + self.alpha * p
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _check_target(target: int) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ParameterError(f"target must be a class index (int), got {target!r}")
    return int(check_range(int(target), "target", 0, 10_000))


@ATTACKS.register("sinusoidal")
class SinusoidalBackdoor(PoisonByTrigger):
    """Sinusoidal noise trigger backdoor (dirty label), as in the backdoor-trigger thesis.

    A low-amplitude 2-D sinusoid (:class:`SinusoidalTrigger`) is added to ``rate``
    of the training set, drawn from the non-target classes, which are relabelled
    ``target``. The thesis used intensity 0.03, target 0 and 10% (it found the
    rate mattered: 8%, 10%, 15%); it does not fix the frequency, we default to 3
    cycles per image side along x and y, which also fits 8x8 digits.

    Args:
        rate: fraction of the WHOLE training set poisoned, (0, 1].
        target: class triggered inputs are mapped to.
        intensity: amplitude of the sinusoid in [0, 1] pixel units.
        freq_x, freq_y: cycles per image width / height, > 0 and below half the side.
    """

    family = "backdoor"

    def __init__(self, rate: float = 0.10, target: int = 0, intensity: float = 0.03, freq_x: float = 3.0,
                 freq_y: float = 3.0):
        self.rate = check_rate(rate)
        self.target = _check_target(target)
        self.intensity = float(check_range(intensity, "intensity", 0, 1, lo_open=True))
        self.freq_x = float(check_range(freq_x, "freq_x", 0, 4096, lo_open=True))
        self.freq_y = float(check_range(freq_y, "freq_y", 0, 4096, lo_open=True))
        self.trigger = SinusoidalTrigger(self.intensity, self.freq_x, self.freq_y)


@ATTACKS.register("blended")
class BlendedBackdoor(PoisonByTrigger):
    """Blended injection backdoor (dirty label): Chen et al., "Targeted Backdoor Attacks on Deep
    Learning Systems Using Data Poisoning" (2017).

    ``rate`` of the training set (non-target classes) is blended with a fixed
    pattern at ``alpha`` and relabelled ``target``; the same blend is the
    test-time trigger. Chen et al. blended a cartoon image or random noise; to
    ship no third-party image we offer seeded uniform noise (default) and a
    checkerboard. alpha 0.2 is the issue's default (Chen et al. used 0.2 for
    poisoning with the cartoon pattern).

    Args:
        rate: fraction of the WHOLE training set poisoned, (0, 1].
        target: class triggered inputs are mapped to.
        alpha: blend weight of the pattern, (0, 1].
        pattern: ``"noise"`` or ``"checkerboard"``.
        pattern_seed: seed of the noise pattern (independent of the attack seed,
            which only picks the poisoned samples).
        cell: checkerboard square size in pixels.
    """

    family = "backdoor"

    def __init__(self, rate: float = 0.10, target: int = 0, alpha: float = 0.2, pattern: str = "noise",
                 pattern_seed: int = 0, cell: int = 1):
        self.rate = check_rate(rate)
        self.target = _check_target(target)
        self.alpha = float(check_range(alpha, "alpha", 0, 1, lo_open=True))
        self.pattern = check_choice(pattern, "pattern", BLEND_PATTERNS)
        self.pattern_seed = int(check_range(pattern_seed, "pattern_seed", 0, 2 ** 32 - 1))
        self.cell = int(check_range(cell, "cell", 1, 4096))
        self.trigger = BlendedTrigger(self.alpha, self.pattern, self.pattern_seed, self.cell)


@ATTACKS.register("sig")
class SIG(Attack):
    """SIG clean-label backdoor: Barni, Kallas and Tondi, "A new backdoor attack in CNNs by
    training set corruption without label poisoning" (ICIP 2019).

    The horizontal sinusoid :class:`SIGTrigger` (delta 20/255, frequency 6, as in
    the paper) is added to ``rate`` of the TARGET-CLASS training images only;
    no label changes, so the poisoned samples look correctly labelled. At test
    time the same signal is added to images of other classes. The paper studies
    several poisoned fractions of the target class; the default here (0.5) is
    our choice, not the paper's.

    Args:
        rate: fraction of the target class's training images poisoned, (0, 1].
        target: the target class (only its images are touched).
        delta: amplitude of the sinusoid in [0, 1] pixel units.
        frequency: cycles per image width, > 0 and below half the width.
    """

    family = "clean-label"

    def __init__(self, rate: float = 0.5, target: int = 0, delta: float = 20 / 255, frequency: float = 6.0):
        self.rate = check_rate(rate)
        self.target = _check_target(target)
        self.delta = float(check_range(delta, "delta", 0, 1, lo_open=True))
        self.frequency = float(check_range(frequency, "frequency", 0, 4096, lo_open=True))
        self.trigger = SIGTrigger(self.delta, self.frequency)

    def _pool_size(self, train: ImageSet) -> int:
        return int((train.labels == self.target).sum())

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        idx = sample_from_class(train, self.target, self.rate, rng, self.registry_name)
        images = train.images.copy()
        images[idx] = self.trigger.apply(train.images[idx])
        return (train.with_data(images=images),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=self.trigger))
