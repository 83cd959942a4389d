"""The attack interface.

An :class:`Attack` is built with its parameters (validated there, errors name
the parameter and its allowed range) and called with
``attack.poison(train, seed=..., context=...)``. It returns the poisoned
:class:`ImageSet` and a :class:`Poisoning` record: which training indices it
touched, their original labels, its parameters and, for backdoors, the
:class:`Trigger` to stamp on test images.
"""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.registry import Registry
# re-exported: attack modules written before poisonlab.validate existed import them from here
from poisonlab.validate import check_choice, check_range, check_rate  # noqa: F401

if TYPE_CHECKING:
    from torch import nn


class Trigger(ABC):
    """Something stamped on images at test time: ``apply(uint8 NHWC) -> uint8 NHWC``."""

    @abstractmethod
    def apply(self, images: np.ndarray) -> np.ndarray:
        """Return a stamped copy of ``images`` (uint8 NHWC)."""

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        """Raise :class:`ParameterError` if the trigger cannot be applied to images of ``shape`` (H, W, C)."""


@dataclass
class Poisoning:
    """What an attack did to a training set.

    Attributes:
        attack: registry name of the attack.
        params: the attack's parameters.
        indices: training-set indices whose image or label changed (sorted).
        original_labels: labels at ``indices`` before the attack.
        target_class: the class a backdoor maps triggered inputs to.
        trigger: applied to test images to measure ASR (None for label-only attacks).
        target_indices: test-set indices a targeted attack aims at.
        adversarial_labels: the labels it wants those targets to get.
        seconds: time taken to generate the poison.
        extra: attack-specific information (JSON-serialisable).
    """

    attack: str
    params: dict[str, Any]
    indices: np.ndarray
    original_labels: np.ndarray
    target_class: int | None = None
    trigger: Trigger | None = None
    target_indices: np.ndarray | None = None
    adversarial_labels: np.ndarray | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_trigger(self) -> bool:
        return self.trigger is not None and self.target_class is not None

    def apply_trigger(self, images: np.ndarray) -> np.ndarray:
        if self.trigger is None:
            raise ValueError(f"attack {self.attack!r} has no test-time trigger")
        return self.trigger.apply(images)

    def poison_mask(self, n: int) -> np.ndarray:
        """Boolean mask over a training set of ``n`` samples: True where the attack touched it."""
        m = np.zeros(n, dtype=bool)
        m[self.indices] = True
        return m

    def summary(self) -> dict[str, Any]:
        return {
            "attack": self.attack, "params": self.params, "n_poisoned": int(len(self.indices)),
            "target_class": self.target_class, "seconds": self.seconds,
            "target_indices": None if self.target_indices is None else np.asarray(self.target_indices).tolist(),
            "adversarial_labels": None if self.adversarial_labels is None else np.asarray(self.adversarial_labels).tolist(),
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class AttackContext:
    """What an attack may use beside the training set.

    ``clean_model`` is a model trained on the clean training set (the
    experiment runner's baseline): attacks that need a surrogate (feature
    space, gradients, confusion matrix) take it from here. ``test`` lets a
    targeted attack pick its target image(s).
    """

    test: ImageSet | None = None
    clean_model: "nn.Module | None" = None
    train_fn: Callable[[ImageSet], "nn.Module"] | None = None
    device: str = "cpu"
    progress: bool = False


class Attack(ABC):
    """Base class of every attack. Sub-classes implement :meth:`_poison`.

    Class attributes:
        family: ``label``, ``backdoor``, ``clean-label`` or ``targeted``.
        needs_clean_model: True if :meth:`poison` needs ``context.clean_model``.
    """

    family: ClassVar[str] = "label"
    needs_clean_model: ClassVar[bool] = False
    registry_name: ClassVar[str] = ""

    def params(self) -> dict[str, Any]:
        """The constructor parameters and their current values."""
        sig = inspect.signature(type(self).__init__)
        return {k: _plain(getattr(self, k)) for k in sig.parameters if k != "self" and hasattr(self, k)}

    def check(self, train: ImageSet) -> None:
        """Check the parameters against ``train`` (target class exists, trigger fits ...) before any work."""
        target = getattr(self, "target", None)
        if isinstance(target, (int, np.integer)) and not 0 <= target < train.num_classes:
            raise ParameterError(
                f"{self.registry_name}: target={target} is not a class of {train.name or 'the dataset'} "
                f"(allowed 0..{train.num_classes - 1})"
            )
        trig = getattr(self, "trigger", None)
        if isinstance(trig, Trigger):
            trig.check_fits(train.shape)
        rate = getattr(self, "rate", None)
        if rate is not None:
            n_poison(rate, self._pool_size(train), self.registry_name)

    def _pool_size(self, train: ImageSet) -> int:
        """How many samples the attack may choose from (the rate applies to the whole set by default)."""
        return len(train)

    def poison(self, train: ImageSet, seed: int = 0, context: AttackContext | None = None) -> tuple[ImageSet, Poisoning]:
        """Poison ``train``; deterministic for ``seed``. The input set is not modified."""
        self.check(train)
        context = context or AttackContext()
        if self.needs_clean_model and context.clean_model is None:
            if context.train_fn is None:
                raise ParameterError(f"{self.registry_name} needs a clean surrogate model (context.clean_model)")
            context.clean_model = context.train_fn(train)
        t0 = time.perf_counter()
        poisoned, record = self._poison(train, np.random.default_rng(seed), context)
        record.seconds = time.perf_counter() - t0
        record.indices = np.sort(np.asarray(record.indices, dtype=np.int64))
        return poisoned, record

    @abstractmethod
    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        """Return the poisoned copy of ``train`` and the record; ``rng`` is seeded by :meth:`poison`."""

    def _record(self, indices: np.ndarray, original_labels: np.ndarray, **kw: Any) -> Poisoning:
        return Poisoning(attack=self.registry_name, params=self.params(), indices=np.asarray(indices),
                         original_labels=np.asarray(original_labels), **kw)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def _plain(v: Any) -> Any:
    if isinstance(v, Trigger):
        return type(v).__name__
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def n_poison(rate: float, n: int, who: str = "attack") -> int:
    """Number of samples a ``rate`` poisons among ``n``; fewer than one is an error."""
    k = int(round(rate * n))
    if k < 1:
        raise ParameterError(f"{who}: rate={rate} leaves fewer than one poisoned sample among {n} (raise rate)")
    return min(k, n)


def sample_from_class(train: ImageSet, cls: int, rate: float, rng: np.random.Generator, who: str) -> np.ndarray:
    """Sorted indices of ``rate`` of the samples of class ``cls`` (clean-label attacks poison one class)."""
    pool = np.nonzero(train.labels == cls)[0]
    k = n_poison(rate, len(pool), who)
    return np.sort(rng.choice(pool, size=k, replace=False))





ATTACKS: Registry[Attack] = Registry("attack")
