"""Targeted label attacks: class-pair flipping and nearest-neighbour flipping around a target image."""

from __future__ import annotations

from typing import Any

import numpy as np

from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, n_poison
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_range, check_rate


def _check_class(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ParameterError(f"{name} must be a class index (int >= 0), got {value!r}")
    return int(value)


def soft_confusion(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = mean predicted probability of class j over samples of true class i.

    Unlike the arg-max confusion matrix it still shows which classes a model
    finds similar when it classifies (nearly) every sample correctly, as it
    does on the data it was trained on.
    """
    c = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(c, labels, probs.astype(np.float64))
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return c / np.maximum(counts, 1)[:, None]


def most_confused_pairs(confusion: np.ndarray, n_pairs: int) -> list[list[int]]:
    """The ``n_pairs`` most-confused class pairs of a (row-normalised) confusion matrix.

    Pairs are ranked by the symmetric off-diagonal mass ``C[i, j] + C[j, i]`` and
    chosen greedily so that no class is in two pairs. Each pair is returned as
    ``[source, destination]`` with the source the class more often mistaken for
    the other (``C[source, dest] >= C[dest, source]``).
    """
    k = len(confusion)
    if 2 * n_pairs > k:
        raise ParameterError(f"n_pairs={n_pairs} needs {2 * n_pairs} distinct classes, the data has {k}")
    sym = confusion + confusion.T
    iu, ju = np.triu_indices(k, 1)
    order = np.lexsort((ju, iu, -sym[iu, ju]))  # ties broken by class index, so the choice is deterministic
    used: set[int] = set()
    pairs: list[list[int]] = []
    for o in order:
        i, j = int(iu[o]), int(ju[o])
        if i in used or j in used:
            continue
        pairs.append([i, j] if confusion[i, j] >= confusion[j, i] else [j, i])
        used |= {i, j}
        if len(pairs) == n_pairs:
            break
    return pairs


@ATTACKS.register("targeted_flip")
class TargetedLabelFlip(Attack):
    """Targeted (class-pair) label flipping.

    For each pair ``[source, destination]``, ``rate`` of the SOURCE class's
    training samples (chosen at random) are relabelled ``destination``; with
    ``symmetric=True`` the same fraction of the destination class also moves to
    the source. The CIFAR-10 label-flipping study flipped 20% of labels between
    frequently confused pairs (e.g. cat/dog); see also Tolpegin et al., "Data
    Poisoning Attacks Against Federated Learning Systems" (2020), which flips a
    source class to a chosen target class.

    Pairs are given (``pairs=[[3, 5], [1, 9]]``, one flat pair ``[3, 5]``, or the
    string ``"3:5,1:9"``, handy in TOML configs where a list-valued parameter is
    a grid axis: ``pairs = [[3, 5], [1, 9]]`` there means two runs with one
    pair each) or, with ``pairs="auto"``,
    the ``n_pairs`` most-confused pairs of a clean model, disjoint
    (:func:`most_confused_pairs`). Where the confusion comes from
    (``confusion``):

    - ``"soft"`` (default): the clean surrogate ``context.clean_model`` (the
      runner's baseline, trained on the whole clean training set) predicts the
      training set, and the confusion is the mean predicted probability of each
      class per true class (:func:`soft_confusion`). The test set is NOT used:
      it is reserved for measuring the attack, and picking pairs on it would
      leak it into the attack. Because the model has seen these samples, the
      arg-max confusion would be nearly diagonal; the probabilities still carry
      the class-similarity structure, at no extra training.
    - ``"holdout"``: a fresh surrogate is trained with ``context.train_fn`` on a
      stratified ``1 - holdout`` share of the training set and the arg-max
      confusion matrix is measured on the held-out rest (unbiased, costs one
      more training run).

    The chosen pairs and the confusion matrix are recorded in
    ``Poisoning.extra``.

    Args:
        rate: fraction of EACH source class relabelled, (0, 1].
        pairs: ``"auto"``, a list of ``[source, destination]`` class pairs, one flat
            pair, or ``"source:destination,..."``.
        n_pairs: number of pairs chosen with ``pairs="auto"``.
        symmetric: also flip ``rate`` of each destination class to its source.
        confusion: ``"soft"`` or ``"holdout"`` (only used with ``pairs="auto"``).
        holdout: held-out share of the training set for ``confusion="holdout"``, (0, 0.9].
        confusion_samples: ``confusion="soft"`` predicts at most this many training
            samples (a stratified subset; 10,000 estimate a 10-class matrix well
            and save most of the prediction time on CIFAR-10).
    """

    family = "label"

    def __init__(self, rate: float = 0.2, pairs: list[list[int]] | str = "auto", n_pairs: int = 2,
                 symmetric: bool = False, confusion: str = "soft", holdout: float = 0.2,
                 confusion_samples: int = 10_000):
        self.rate = check_rate(rate)
        self.n_pairs = int(check_range(n_pairs, "n_pairs", 1, 10_000))
        self.symmetric = bool(symmetric)
        self.confusion = check_choice(confusion, "confusion", ("soft", "holdout"))
        self.holdout = float(check_range(holdout, "holdout", 0, 0.9, lo_open=True))
        self.confusion_samples = int(check_range(confusion_samples, "confusion_samples", 10, 10 ** 9))
        self.pairs: list[list[int]] | str = "auto" if pairs == "auto" else self._check_pairs(pairs)
        # the clean surrogate is only needed to choose pairs, and only from its soft confusion
        self.needs_clean_model = self.pairs == "auto" and self.confusion == "soft"

    @staticmethod
    def _parse_pairs(text: str) -> list[list[int]]:
        try:
            return [[int(a), int(b)] for a, b in (item.split(":") for item in text.split(","))]
        except ValueError:
            raise ParameterError(f"pairs must be 'auto', 'source:destination,...' (e.g. '3:5,1:9') or a list of "
                                 f"(source, destination) pairs, got {text!r}") from None

    @classmethod
    def _check_pairs(cls, pairs: Any) -> list[list[int]]:
        if isinstance(pairs, str):
            pairs = cls._parse_pairs(pairs)
        if (isinstance(pairs, (list, tuple)) and len(pairs) == 2
                and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in pairs)):
            pairs = [list(pairs)]  # one flat pair, e.g. what a config grid hands over for pairs = [[3, 5], [1, 9]]
        if not isinstance(pairs, (list, tuple)) or not pairs:
            raise ParameterError(f"pairs must be 'auto' or a non-empty list of (source, destination) pairs, "
                                 f"got {pairs!r}")
        out = []
        for p in pairs:
            if not isinstance(p, (list, tuple)) or len(p) != 2:
                raise ParameterError(f"pairs: each pair must be (source, destination), got {p!r}")
            s, d = _check_class(p[0], "pairs source"), _check_class(p[1], "pairs destination")
            if s == d:
                raise ParameterError(f"pairs: source and destination must differ, got {p!r}")
            out.append([s, d])
        sources = [s for s, _ in out]
        if len(set(sources)) != len(sources):
            raise ParameterError(f"pairs: a class may be the source of one pair only, got {out!r}")
        return out

    def _sources(self, pairs: list[list[int]]) -> list[tuple[int, int]]:
        moves = [(s, d) for s, d in pairs]
        if self.symmetric:
            moves += [(d, s) for s, d in pairs if (d, s) not in moves]
        return moves

    def check(self, train: ImageSet) -> None:
        k = train.num_classes
        counts = train.class_counts()
        if self.pairs == "auto":
            if 2 * self.n_pairs > k:
                raise ParameterError(f"{self.registry_name}: n_pairs={self.n_pairs} needs {2 * self.n_pairs} "
                                     f"distinct classes, {train.name or 'the dataset'} has {k}")
            # the pairs are not known yet: every class must be able to give one sample
            n_poison(self.rate, int(counts.min()), self.registry_name)
            return
        for s, d in self._sources(self.pairs):
            for c in (s, d):
                if c >= k:
                    raise ParameterError(f"{self.registry_name}: pairs class {c} is not a class of "
                                         f"{train.name or 'the dataset'} (allowed 0..{k - 1})")
            n_poison(self.rate, int(counts[s]), f"{self.registry_name} (source class {s})")

    def _confusion(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> np.ndarray:
        from poisonlab.metrics import confusion_matrix
        from poisonlab.training import predict_proba

        k = train.num_classes
        if self.confusion == "soft":
            sample = train
            if len(train) > self.confusion_samples:
                sample = train.stratified_subset(self.confusion_samples, seed=int(rng.integers(2 ** 31)))
            return soft_confusion(predict_proba(context.clean_model, sample), sample.labels, k)
        if context.train_fn is None:
            raise ParameterError(f"{self.registry_name}: confusion='holdout' needs context.train_fn to train "
                                 "a surrogate on the rest of the training set")
        rest, held, _, _ = train.split(self.holdout, seed=int(rng.integers(2 ** 31)))
        model = context.train_fn(rest)
        pred = predict_proba(model, held).argmax(1)
        cm = confusion_matrix(held.labels, pred, k).astype(np.float64)
        return cm / np.maximum(cm.sum(1, keepdims=True), 1)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        extra: dict[str, Any] = {}
        if self.pairs == "auto":
            conf = self._confusion(train, rng, context)
            pairs = most_confused_pairs(conf, self.n_pairs)
            extra["confusion"] = np.round(conf, 5).tolist()
            extra["confusion_source"] = self.confusion
        else:
            pairs = self.pairs
        extra["pairs"] = pairs
        labels = train.labels.copy()
        chosen = []
        for s, d in self._sources(pairs):
            pool = np.nonzero(train.labels == s)[0]  # original labels: a flipped sample never flips again
            k = n_poison(self.rate, len(pool), f"{self.registry_name} (source class {s})")
            idx = rng.choice(pool, size=k, replace=False)
            labels[idx] = d
            chosen.append(idx)
        idx = np.sort(np.concatenate(chosen))
        return train.with_data(labels=labels), self._record(idx, train.labels[idx], extra=extra)


def neighbour_distances(features: np.ndarray, target: np.ndarray, metric: str = "euclidean") -> np.ndarray:
    """Distance of every row of ``features`` ``(N, D)`` to ``target`` ``(D,)``: Euclidean, or 1 - cosine similarity."""
    f = np.asarray(features, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(f, axis=1) * np.linalg.norm(t)
        return 1 - (f @ t) / np.maximum(norms, 1e-12)
    return np.sqrt(((f - t) ** 2).sum(1))


@ATTACKS.register("nn_flip")
class NearestNeighbourFlip(Attack):
    """Nearest-neighbour targeted label flipping.

    Picks one target test image, finds the ``k`` training samples closest to it
    in a feature space (``feature_space``, ``metric``) and relabels them
    ``adversarial_class``, so that a model trained on the poisoned set
    misclassifies the target. The ResNet-18 study relabelled the 250 training
    images nearest to a deer (penultimate features of a clean model, Euclidean
    distance: the defaults) as "dog", after which the deer was classified dog
    with probability 0.92. Samples already labelled ``adversarial_class`` are
    skipped (relabelling them would change nothing), so exactly ``k`` labels change.

    Feature spaces: ``"penultimate"`` (the clean surrogate ``context.clean_model``'s
    penultimate layer, as the study), ``"pixels"`` (the raw images, no model: the
    neighbours a victim with a different feature extractor shares). Metrics:
    ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity; ignores the feature norm,
    which in a ReLU network grows with the image's contrast).
    ``benchmarks/targeted_attacks.py nn_flip`` sweeps ``k`` and both settings.

    The record's ``target_indices=[t]`` and ``adversarial_labels=[adversarial_class]``
    make the evaluation report ``target_success`` and the target's class
    probabilities after the attack; ``extra["target_probs_before"]`` holds the
    clean model's probabilities for the target, ``extra["target_index"]`` the
    test index.

    Args:
        k: number of training samples relabelled, >= 1.
        target_index: index into ``context.test`` of the target image, or None to
            take the first test image of ``target_class`` that the clean model
            classifies correctly.
        target_class: true class of the automatically chosen target (4 = deer on CIFAR-10).
        adversarial_class: the class the target should be given (5 = dog on CIFAR-10).
        feature_space: ``"penultimate"`` or ``"pixels"``.
        metric: ``"euclidean"`` or ``"cosine"``.
    """

    family = "targeted"
    needs_clean_model = True  # it picks a target the clean model gets right, whatever the feature space

    def __init__(self, k: int = 250, target_index: int | None = None, target_class: int = 4,
                 adversarial_class: int = 5, feature_space: str = "penultimate", metric: str = "euclidean"):
        self.k = int(check_range(k, "k", 1, 10 ** 9))
        if target_index is not None:
            target_index = _check_class(target_index, "target_index")
        self.target_index = target_index
        self.target_class = _check_class(target_class, "target_class")
        self.adversarial_class = _check_class(adversarial_class, "adversarial_class")
        if self.target_class == self.adversarial_class and target_index is None:
            raise ParameterError("adversarial_class must differ from target_class")
        self.feature_space = check_choice(feature_space, "feature_space", ("penultimate", "pixels"))
        self.metric = check_choice(metric, "metric", ("euclidean", "cosine"))

    def check(self, train: ImageSet) -> None:
        n = train.num_classes
        for name in ("target_class", "adversarial_class"):
            v = getattr(self, name)
            if v >= n:
                raise ParameterError(f"{self.registry_name}: {name}={v} is not a class of "
                                     f"{train.name or 'the dataset'} (allowed 0..{n - 1})")
        available = int((train.labels != self.adversarial_class).sum())
        if self.k > available:
            raise ParameterError(f"{self.registry_name}: k={self.k} exceeds the {available} training samples "
                                 f"not already labelled {self.adversarial_class}")

    def _pick_target(self, test: ImageSet, clean_model) -> tuple[int, np.ndarray]:
        from poisonlab.training import predict_proba

        if self.target_index is not None:
            if self.target_index >= len(test):
                raise ParameterError(f"{self.registry_name}: target_index={self.target_index} is outside the "
                                     f"test set (allowed 0..{len(test) - 1})")
            t = self.target_index
            return t, predict_proba(clean_model, test.images[t:t + 1])[0]
        cand = np.nonzero(test.labels == self.target_class)[0]
        probs = predict_proba(clean_model, test.subset(cand)) if len(cand) else np.zeros((0, test.num_classes))
        ok = np.nonzero(probs.argmax(1) == self.target_class)[0] if len(cand) else []
        if not len(ok):
            raise ParameterError(f"{self.registry_name}: no test image of target_class={self.target_class} is "
                                 "classified correctly by the clean model; give target_index")
        return int(cand[ok[0]]), probs[ok[0]]

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        from poisonlab.training import extract_features

        if context.test is None:
            raise ParameterError(f"{self.registry_name} picks its target from the test set: give context.test")
        model = context.clean_model
        t, probs_before = self._pick_target(context.test, model)
        if self.feature_space == "penultimate":
            f_train = extract_features(model, train)
            f_target = extract_features(model, context.test.images[t:t + 1])
        else:
            f_train = train.images.reshape(len(train), -1).astype(np.float32) / 255
            f_target = context.test.images[t:t + 1].reshape(1, -1).astype(np.float32) / 255
        dist = neighbour_distances(f_train, f_target[0], self.metric)
        dist[train.labels == self.adversarial_class] = np.inf
        # stable sort: ties resolved by index, so the choice does not depend on the seed
        idx = np.sort(np.argsort(dist, kind="stable")[:self.k])
        labels = train.labels.copy()
        labels[idx] = self.adversarial_class
        extra = {"target_index": t, "target_true_class": int(context.test.labels[t]),
                 "target_probs_before": np.asarray(probs_before, dtype=float).round(6).tolist(),
                 "max_neighbour_distance": float(dist[idx].max()), "feature_space": self.feature_space,
                 "metric": self.metric}
        return train.with_data(labels=labels), self._record(
            idx, train.labels[idx], target_indices=np.array([t]),
            adversarial_labels=np.array([self.adversarial_class]), extra=extra)
