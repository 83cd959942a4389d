"""Label-flipping attacks."""

from __future__ import annotations

import numpy as np

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, n_poison
from poisonlab.data.imageset import ImageSet
from poisonlab.validate import check_rate


@ATTACKS.register("random_flip")
class RandomLabelFlip(Attack):
    """Random label flipping: a fraction of labels replaced by a different, uniformly chosen class.

    The CIFAR-10 label-flipping study flipped 20% of the training labels
    (accuracy 82% -> 78%). See also Biggio et al., "Support vector machines
    under adversarial label noise" (2011).

    Args:
        rate: fraction of the training set to flip, in (0, 1].
    """

    family = "label"

    def __init__(self, rate: float = 0.2):
        self.rate = check_rate(rate)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        k = n_poison(self.rate, len(train), self.registry_name)
        idx = np.sort(rng.choice(len(train), size=k, replace=False))
        labels = train.labels.copy()
        shift = rng.integers(1, train.num_classes, size=k)  # never 0: the new class always differs
        labels[idx] = (labels[idx] + shift) % train.num_classes
        return train.with_data(labels=labels), self._record(idx, train.labels[idx])
