"""Global k-means label vote (the ResNet-18 poisoning study's clustering defence).

All penultimate features are clustered together with k-means (10 clusters by
default, one per class); each cluster takes the label most of its members
carry, and samples whose label disagrees with their cluster's are dropped.
It targets flipped labels: a flipped sample sits among the features of its
true class.
"""

from __future__ import annotations

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import as_features, kmeans
from poisonlab.validate import check_int


def kmeans_vote_scores(features: np.ndarray, labels: np.ndarray, n_clusters: int = 10,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cluster ``features`` with k-means and compare each label with its cluster's majority label.

    Args:
        features: ``(N, D)`` penultimate features.
        labels: ``(N,)`` given labels.
        n_clusters: k.
        seed: seeds k-means.

    Returns:
        ``(scores, flagged, cluster_label)``: score = 1 - share of the sample's cluster carrying its
        label (higher = more suspicious); flagged = label differs from the cluster's majority label;
        ``cluster_label`` the majority label of each sample's cluster (a suggested label).
    """
    f = as_features(features, labels)
    y = np.asarray(labels, dtype=np.int64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # direction matters, not scale
    assign, _ = kmeans(f, n_clusters, seed, n_init=1)
    k = int(assign.max()) + 1
    counts = np.zeros((k, int(y.max()) + 1))
    np.add.at(counts, (assign, y), 1)
    share = counts / counts.sum(1, keepdims=True)
    majority = counts.argmax(1)
    scores = 1.0 - share[assign, y]
    return scores, y != majority[assign], majority[assign]


@DEFENSES.register("kmeans_vote")
class KMeansVote(Filter):
    """Global k-means (10 clusters) on penultimate features; drop samples disagreeing with their cluster's label.

    Args:
        n_clusters: k, [2, 1000]; the ResNet-18 study used the number of classes (10).
    """

    def __init__(self, n_clusters: int = 10):
        self.n_clusters = check_int(n_clusters, "n_clusters", 2, 1000)

    def score(self, ctx: DefenseContext) -> FilterOutput:
        s, flagged, suggested = kmeans_vote_scores(ctx.features(), ctx.train.labels, self.n_clusters, ctx.seed)
        return FilterOutput(s, flagged, {"suggested_labels": suggested})
