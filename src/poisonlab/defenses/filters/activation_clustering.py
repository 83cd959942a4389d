"""Activation clustering (Chen et al., "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", 2018).

Per class, the penultimate activations are reduced to 10 dimensions (the
paper uses ICA to 10; we use PCA as the issue asks) and split into two
clusters with k-means. A backdoor makes the poisoned samples of the target
class a separate, smaller, well separated cluster; the paper judges clusters
by relative size, by silhouette score, or by exclusionary reclassification
(retrain without the cluster and see which class the new model gives its
members), and drops the suspicious cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import (as_features, class_indices, class_pca, kmeans, other_class_whitened,
                                                pca, per_class_pca)
from poisonlab.validate import check_choice, check_int, check_range


def _silhouette(z: np.ndarray, assign: np.ndarray, sample: int, seed: int) -> float:
    from sklearn.metrics import silhouette_score

    if len(np.unique(assign)) < 2 or len(z) < 4:
        return 0.0
    # silhouette is O(n^2): a random subsample of 2,000 estimates it closely enough
    return float(silhouette_score(z, assign, sample_size=min(sample, len(z)), random_state=seed))


@dataclass
class ClassSplit:
    """One class's 2-means split of its (projected) activations.

    Attributes:
        cls: the class.
        indices: ``(n,)`` training indices of the class.
        small: ``(n,)`` True for the members of the smaller cluster.
        share: the smaller cluster's share of the class.
        silhouette: the 2-cluster silhouette score (a 2,000-sample estimate on large classes).
    """

    cls: int
    indices: np.ndarray
    small: np.ndarray
    share: float
    silhouette: float


def split_classes(features: np.ndarray, labels: np.ndarray, n_components: int = 10, seed: int = 0,
                  projected: bool = False) -> tuple[np.ndarray, list[ClassSplit]]:
    """Per class PCA + 2-means; ``(scores, splits)``.

    The score of a sample is the class's silhouette (floored at 0) times how much closer the sample
    is to the smaller cluster's centre than to the larger one's (in [-1, 1]), so the members of a
    small, well separated cluster score highest. Classes with fewer than 4 samples are not split.
    """
    f = as_features(features, labels)
    labels = np.asarray(labels)
    scores = np.zeros(len(f))
    splits: list[ClassSplit] = []
    for c, idx in class_indices(labels):
        if len(idx) < 4:
            continue
        z = f[idx] if projected else pca(f[idx], n_components, seed)
        assign, centres = kmeans(z, 2, seed)
        sizes = np.bincount(assign, minlength=2)
        small = int(np.argmin(sizes))
        sil = _silhouette(z, assign, 2000, seed)
        d = np.linalg.norm(z[:, None, :] - centres[None], axis=2)
        d_small, d_big = d[:, small], d[:, 1 - small]
        scores[idx] = max(sil, 0.0) * (d_big - d_small) / np.maximum(d_big + d_small, 1e-12)
        splits.append(ClassSplit(c, idx, assign == small, float(sizes[small] / len(idx)), sil))
    return scores, splits


def size_silhouette_verdict(split: ClassSplit, median_silhouette: float, n_classes: int, size_threshold: float,
                            silhouette_threshold: float, relative: bool) -> tuple[bool, str]:
    """The relative-size and silhouette rules for one class: ``(poisoned, the rule that decided)``.

    Poisoned when the smaller cluster holds at most ``size_threshold`` of the class, the silhouette
    is at least ``silhouette_threshold`` and, with ``relative`` (and 3 classes or more), above the
    median silhouette of the classes. The rule named is the first that failed (``"size"``,
    ``"silhouette"``, ``"relative_silhouette"``) or, for a poisoned class, all that were applied.
    """
    if split.share > size_threshold:
        return False, "size"
    if split.silhouette < silhouette_threshold:
        return False, "silhouette"
    applies_relative = relative and n_classes >= 3
    if applies_relative and not split.silhouette > median_silhouette:
        return False, "relative_silhouette"
    return True, "size+silhouette" + ("+relative_silhouette" if applies_relative else "")


def activation_clustering_scores(features: np.ndarray, labels: np.ndarray, n_components: int = 10,
                                 size_threshold: float = 0.35, silhouette_threshold: float = 0.25,
                                 relative: bool = True, seed: int = 0, projected: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """Score and flag samples by per-class 2-means clustering of their activations (size and silhouette rules).

    Args:
        features: ``(N, D)`` penultimate-layer activations (not logits).
        labels: ``(N,)`` given labels.
        n_components: PCA dimensions per class before clustering.
        size_threshold: a class is suspicious only if its smaller cluster holds at most this
            share of the class.
        silhouette_threshold: ... and only if the 2-cluster silhouette score is at least this.
        relative: ... and only if that silhouette is above the median silhouette of all classes
            (natural sub-modes of clean classes split about as well as each other; a trigger
            cluster splits better than its class's peers).
        seed: seeds k-means and the silhouette subsample.
        projected: ``features`` are already the per-class projection (skip PCA).

    Returns:
        ``(scores, flagged, info)``: scores as :func:`split_classes`; ``flagged`` marks the smaller
        cluster of every suspicious class; ``info["classes"]`` gives per class the size share, the
        silhouette, ``suspicious`` and ``decided_by`` (see :func:`size_silhouette_verdict`).
    """
    scores, splits = split_classes(features, labels, n_components, seed, projected)
    flagged = np.zeros(len(scores), dtype=bool)
    median_sil = float(np.median([s.silhouette for s in splits])) if splits else 0.0
    per_class: dict[str, Any] = {}
    for sp in splits:
        suspicious, rule = size_silhouette_verdict(sp, median_sil, len(splits), size_threshold,
                                                   silhouette_threshold, relative)
        if suspicious:
            flagged[sp.indices[sp.small]] = True
        per_class[str(sp.cls)] = {"small_share": round(sp.share, 4), "silhouette": round(sp.silhouette, 4),
                                  "suspicious": suspicious, "decided_by": rule}
    return scores, flagged, {"classes": per_class, "median_silhouette": round(median_sil, 4),
                             "rule": "size+silhouette"}


@dataclass
class Reclassification:
    """Exclusionary reclassification's verdict on one excluded cluster (Chen et al. 2018, Sec. 4).

    Attributes:
        label: the cluster's given label.
        n: the cluster's size.
        l: members the model trained without the cluster classifies as ``label``.
        p: members it classifies as ``source_class``, the most frequent other class.
        source_class: that class (None when every member went back to ``label``).
        ratio: ``l / p`` (None when ``p`` is 0: nothing points away from the label).
        poisoned: ``ratio < threshold``: the members look like ``source_class``, not their label.
    """

    label: int
    n: int
    l: int
    p: int
    source_class: int | None
    ratio: float | None
    poisoned: bool


def exclusionary_reclassification(predictions: np.ndarray, label: int, threshold: float = 1.0) -> Reclassification:
    """Chen et al.'s exclusionary reclassification rule for one cluster.

    A model is trained without the cluster; ``predictions`` are its classes for the cluster's
    members. A legitimate cluster (a natural sub-mode of its class) is still mostly classified as
    its ``label``; a poison cluster is classified as the class its images really come from. With
    ``l`` the members classified as ``label`` and ``p`` those classified as the most frequent other
    class, the cluster is poisoned when ``l / p < threshold`` (the paper's ``T``; 1 means "more
    members go to one other class than back to the label").

    Args:
        predictions: ``(n,)`` predicted classes of the excluded cluster's members.
        label: the cluster's given label.
        threshold: ``T`` > 0.

    Returns:
        The :class:`Reclassification` verdict.
    """
    pred = np.asarray(predictions, dtype=np.int64)
    l = int((pred == label).sum())
    others = pred[pred != label]
    if len(others) == 0:
        return Reclassification(int(label), len(pred), l, 0, None, None, False)
    counts = np.bincount(others)
    source = int(counts.argmax())
    p = int(counts[source])
    ratio = l / p
    return Reclassification(int(label), len(pred), l, p, source, round(ratio, 4), bool(ratio < threshold))


@DEFENSES.register("activation_clustering")
class ActivationClustering(Filter):
    """Activation clustering (Chen et al. 2018): per class PCA (10 dims) + 2-means on penultimate activations.

    Two ways to decide which cluster is poison (``rule``):

    - ``"size_silhouette"`` (default): a class is judged poisoned when its smaller cluster holds at
      most ``size_threshold`` of the class and the two clusters are well separated (silhouette >=
      ``silhouette_threshold``, and with ``relative`` above the median class's); its smaller cluster
      is dropped (:func:`activation_clustering_scores`). The paper proposes relative size and
      silhouette without fixing thresholds; ours are set on MNIST/CIFAR-10 ``fastnet`` and
      ``mnist_cnn`` features, and the relative criterion is ours.
    - ``"exclusionary"``: the paper's exclusionary reclassification. The smaller cluster of every
      class whose share is at most ``size_threshold`` is a candidate; one model is trained with
      ``ctx.train_model`` on the training set without all candidates, and classifies them. A
      candidate whose members go more to one other class than back to their label (``l / p <
      reclassification_threshold``, :func:`exclusionary_reclassification`) is poison and dropped;
      ``p``'s class is the poisons' likely source class. Costs one extra training.

    ``info["classes"][c]["decided_by"]`` names the rule that decided each class (for the size and
    silhouette rules, the first that failed), and with ``"exclusionary"`` its ``l``, ``p``, ratio
    and source class. The paper reduces with ICA to 10 dims; we use PCA.

    Args:
        n_components: PCA dimensions, [1, 512].
        size_threshold: largest share of a class the poison cluster may hold, (0, 0.5].
        silhouette_threshold: smallest silhouette score of a poisoned class's split, [-1, 1].
        relative: also require the class's silhouette to exceed the median over classes.
        whiten: before the PCA, whiten each class's activations by the pooled covariance of the
            other classes (:func:`~poisonlab.defenses.filters._common.other_class_whitened`); on
            10,000-image CIFAR-10 folders this separated a 3x3-patch and a blended backdoor that the
            plain PCA split missed (``poisonlab audit`` uses it; docs/audit.md).
        rule: ``"size_silhouette"`` or ``"exclusionary"``.
        reclassification_threshold: the paper's ``T`` for ``rule="exclusionary"``, (0, 100].
    """

    def __init__(self, n_components: int = 10, size_threshold: float = 0.35, silhouette_threshold: float = 0.25,
                 relative: bool = True, whiten: bool = False, rule: str = "size_silhouette",
                 reclassification_threshold: float = 1.0):
        self.n_components = check_int(n_components, "n_components", 1, 512)
        self.size_threshold = float(check_range(size_threshold, "size_threshold", 0, 0.5, lo_open=True))
        self.silhouette_threshold = float(check_range(silhouette_threshold, "silhouette_threshold", -1, 1))
        self.relative = bool(relative)
        self.whiten = bool(whiten)
        self.rule = check_choice(rule, "rule", ("size_silhouette", "exclusionary"))
        self.reclassification_threshold = float(check_range(reclassification_threshold,
                                                            "reclassification_threshold", 0, 100, lo_open=True))

    def _projection(self, ctx: DefenseContext) -> np.ndarray:
        if self.whiten:
            white = other_class_whitened(as_features(ctx.features()), ctx.train.labels)
            return per_class_pca(white, ctx.train.labels, self.n_components, ctx.seed)
        return class_pca(ctx, self.n_components)

    def score(self, ctx: DefenseContext) -> FilterOutput:
        z = self._projection(ctx)
        if self.rule == "size_silhouette":
            s, flagged, info = activation_clustering_scores(z, ctx.train.labels, self.n_components,
                                                            self.size_threshold, self.silhouette_threshold,
                                                            self.relative, ctx.seed, projected=True)
            return FilterOutput(s, flagged, info)
        return self._exclusionary(ctx, z)

    def _exclusionary(self, ctx: DefenseContext, z: np.ndarray) -> FilterOutput:
        from poisonlab.training.loop import predict_proba

        scores, splits = split_classes(z, ctx.train.labels, self.n_components, ctx.seed, projected=True)
        flagged = np.zeros(len(scores), dtype=bool)
        per_class: dict[str, Any] = {}
        candidates = [sp for sp in splits if sp.share <= self.size_threshold]
        for sp in splits:
            per_class[str(sp.cls)] = {"small_share": round(sp.share, 4), "silhouette": round(sp.silhouette, 4),
                                      "suspicious": False, "decided_by": "size"}
        if candidates:
            excluded = np.concatenate([sp.indices[sp.small] for sp in candidates])
            keep = np.setdiff1d(np.arange(len(ctx.train)), excluded)
            model = ctx.train_model(ctx.train.subset(keep))
            pred = predict_proba(model, ctx.train.images[excluded]).argmax(1)
            start = 0
            for sp in candidates:
                members = sp.indices[sp.small]
                verdict = exclusionary_reclassification(pred[start:start + len(members)], sp.cls,
                                                        self.reclassification_threshold)
                start += len(members)
                if verdict.poisoned:
                    flagged[members] = True
                per_class[str(sp.cls)].update(suspicious=verdict.poisoned, decided_by="exclusionary_reclassification",
                                              reclassification=asdict(verdict))
        return FilterOutput(scores, flagged, {"classes": per_class, "rule": "exclusionary_reclassification",
                                              "candidates": [sp.cls for sp in candidates]})
