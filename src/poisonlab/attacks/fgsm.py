"""FGSM adversarial poisoning (perturbations of Goodfellow et al., "Explaining and
Harnessing Adversarial Examples", ICLR 2015, used as training-set poison)."""

from __future__ import annotations

import numpy as np

from poisonlab.attacks._perturb import apply_delta, changed, fgsm_direction, predict_classes
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, n_poison
from poisonlab.data.imageset import ImageSet
from poisonlab.validate import check_choice, check_range, check_rate


@ATTACKS.register("fgsm")
class FGSMPoison(Attack):
    """FGSM perturbations from the clean surrogate added to a fraction of the training set.

    For each chosen image ``x`` with label ``y``: ``x' = clip(x + epsilon *
    sign(grad_x CE(f(x), y)))``, where ``f`` is ``context.clean_model`` (the
    runner's clean baseline; evaluated in eval mode). The MNIST study used this
    as its second attack.

    Labels are kept (``flip_labels=False``, a clean-label attack) or flipped
    (``flip_labels=True``) to ``flip_to``:
      - ``predicted``: the class the surrogate predicts for the perturbed image;
        where FGSM did not change the prediction, the surrogate's most likely
        class other than the true one (so every flipped label really changes);
      - ``random``: a uniformly drawn class other than the true one.

    Args:
        epsilon: L-inf step in pixel units, [0, 1] (8/255 ~ 0.031; MNIST work often uses 0.1-0.3).
        rate: fraction of the training set poisoned, (0, 1].
        flip_labels: also change the labels of the poisoned images.
        flip_to: ``predicted`` or ``random`` (used when ``flip_labels``).
        batch_size: images per gradient batch.

    The record's ``indices`` are the images whose pixels or label changed;
    ``extra["fooled"]`` is the share of poisoned images the surrogate
    misclassifies after the perturbation.
    """

    family = "clean-label"
    needs_clean_model = True

    def __init__(self, epsilon: float = 8 / 255, rate: float = 0.1, flip_labels: bool = False,
                 flip_to: str = "predicted", batch_size: int = 256):
        self.epsilon = float(check_range(epsilon, "epsilon", 0, 1, lo_open=True))
        self.rate = check_rate(rate)
        self.flip_labels = bool(flip_labels)
        self.flip_to = check_choice(flip_to, "flip_to", ("predicted", "random"))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        model = context.clean_model
        k = n_poison(self.rate, len(train), self.registry_name)
        idx = np.sort(rng.choice(len(train), size=k, replace=False))
        y = train.labels[idx]
        direction = fgsm_direction(model, train.images[idx], y, self.batch_size)
        images = train.images.copy()
        images[idx] = apply_delta(train.images[idx], direction * self.epsilon, self.epsilon)
        adv_pred = predict_classes(model, images[idx])
        labels = train.labels.copy()
        if self.flip_labels:
            if self.flip_to == "random":
                new = (y + rng.integers(1, train.num_classes, size=k)) % train.num_classes
            else:
                new = adv_pred.copy()
                same = new == y
                if same.any():
                    from poisonlab.training import predict_logits

                    logits = predict_logits(model, images[idx[same]])
                    logits[np.arange(int(same.sum())), y[same]] = -np.inf
                    new[same] = logits.argmax(1).numpy()
            labels[idx] = new
        touched = changed(images[idx], train.images[idx]) | (labels[idx] != y)
        fooled = float((adv_pred != y).mean())
        idx = idx[touched]
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], extra={"fooled": fooled}))
