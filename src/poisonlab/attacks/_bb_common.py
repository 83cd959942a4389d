"""Helpers shared by the BackdoorBench attacks (``wanet``, ``input_aware``, ``bpp``, ``trojannn``,
``low_frequency``): picking the poisoned and the "cross"/"negative" samples, an additive pattern
trigger, and running a torch image transform over uint8 images in batches.

Private module (leading underscore): the attack auto-import skips it; the attack modules import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from poisonlab.attacks.base import Trigger, n_poison

from poisonlab.validate import check_range
from poisonlab.data.imageset import ImageSet, to_uint8_nhwc
from poisonlab.errors import ParameterError


def check_target(target: int) -> int:
    """A class index (int, not bool) in [0, 10000]."""
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ParameterError(f"target must be a class index (int), got {target!r}")
    return int(check_range(int(target), "target", 0, 10_000))


def pick_backdoor(train: ImageSet, rate: float, target: int, rng: np.random.Generator, who: str) -> np.ndarray:
    """Sorted indices of ``round(rate * len(train))`` non-target samples (all-to-one dirty label)."""
    pool = np.nonzero(train.labels != target)[0]
    k = n_poison(rate, len(train), who)
    if k > len(pool):
        raise ParameterError(f"{who}: rate={rate} asks for {k} poisoned samples but only {len(pool)} are "
                             f"outside the target class")
    return np.sort(rng.choice(pool, size=k, replace=False))


def pick_extra(n: int, taken: np.ndarray, ratio: float, rate: float, rng: np.random.Generator, who: str,
               name: str) -> np.ndarray:
    """Sorted indices of ``round(ratio * rate * n)`` samples outside ``taken`` (cross / negative samples).

    The count follows BackdoorBench's batch rule: ``ratio`` times the poisoned share, drawn from any class.
    """
    k = int(round(ratio * rate * n))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    free = np.setdiff1d(np.arange(n), taken)
    if k > len(free):
        raise ParameterError(f"{who}: {name}={ratio} with rate={rate} asks for {k} extra samples but only "
                             f"{len(free)} are not poisoned; lower {name} or rate")
    return np.sort(rng.choice(free, size=k, replace=False))


def stamp(train: ImageSet, idx: np.ndarray, trigger: Trigger, target: int) -> tuple[np.ndarray, np.ndarray]:
    """Copies of ``train``'s images and labels with ``trigger`` applied at ``idx`` and those labels set to ``target``."""
    images, labels = train.images.copy(), train.labels.copy()
    images[idx] = trigger.apply(train.images[idx])
    labels[idx] = target
    return images, labels


def changed_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean per image: True where uint8 images ``a`` and ``b`` differ anywhere."""
    return (a != b).reshape(len(a), -1).any(1)


def map_uint8(images: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Apply ``fn`` (float NCHW in [0, 1] -> same) to uint8 NHWC ``images`` in batches; uint8 NHWC out (rounded)."""
    if len(images) == 0:
        return images.copy()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).to(device)
            x = x.permute(0, 3, 1, 2).float().div_(255)
            out.append(to_uint8_nhwc(fn(x)))
    return np.concatenate(out)


def torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from ``rng`` (so an attack's torch randomness follows its seed)."""
    return torch.Generator().manual_seed(int(rng.integers(2 ** 62)))


@dataclass(eq=False)
class AdditivePatternTrigger(Trigger):
    """A fixed pattern added to every image: ``clip(x + 255 * pattern)``.

    ``pattern`` is float32 ``(H, W, C)`` in [-1, 1] pixel units, made for one image shape
    (TrojanNN's optimised patch, the low-frequency universal perturbation).
    """

    pattern: np.ndarray

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        if tuple(self.pattern.shape) != tuple(shape):
            raise ParameterError(f"this trigger was made for {self.pattern.shape[0]}x{self.pattern.shape[1]}x"
                                 f"{self.pattern.shape[2]} images and cannot be applied to {shape[0]}x{shape[1]}x"
                                 f"{shape[2]} images")

    def apply(self, images: np.ndarray) -> np.ndarray:
        self.check_fits(images.shape[1:])
        x = images.astype(np.float32) + np.float32(255.0) * self.pattern.astype(np.float32)[None]
        return np.clip(np.rint(x), 0, 255).astype(np.uint8)
