"""K-means outliers (the MNIST PCA/K-means poisoning study): per class,
samples far from the class's cluster centre are suspicious.

Each class is clustered with k-means; the centre of its largest cluster is
the class's centre (with ``n_clusters=1``, its mean). Score = distance to that
centre; flag by a per-class robust z-score.
"""

from __future__ import annotations

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import as_features, class_indices, kmeans
from poisonlab.defenses.filters.pca_outliers import pixels_or_features, threshold_flags
from poisonlab.validate import check_choice, check_fraction_or_none, check_int, check_range


def distance_to_main_centre(x: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Euclidean distance of each row of ``x`` to the centre of the largest of ``n_clusters`` k-means clusters."""
    assign, centres = kmeans(x, n_clusters, seed)
    main = int(np.bincount(assign).argmax())
    return np.linalg.norm(x - centres[main][None], axis=1)


def kmeans_outlier_scores(features: np.ndarray, labels: np.ndarray, n_clusters: int = 1, seed: int = 0) -> np.ndarray:
    """Per-class distance to the class's (main) k-means centre.

    Args:
        features: ``(N, D)`` features or flattened pixels.
        labels: ``(N,)`` given labels.
        n_clusters: k-means clusters per class; the largest one's centre is used.

    Returns:
        ``(N,)`` distances; higher = more suspicious. Comparable within a class.
    """
    f = as_features(features, labels)
    s = np.zeros(len(f))
    for _, idx in class_indices(labels):
        s[idx] = distance_to_main_centre(f[idx], n_clusters, seed)
    return s


@DEFENSES.register("kmeans_outliers")
class KMeansOutliers(Filter):
    """Per-class distance to the class's main k-means centre (MNIST PCA/K-means study).

    Args:
        n_clusters: clusters per class, [1, 100] (1: the class mean).
        z_threshold: flag when the per-class robust z-score of the distance exceeds it, (0, 100].
        drop_fraction: if given, drop this fraction with the highest z-scores instead, (0, 1).
        space: ``features`` (penultimate layer) or ``pixels``.
    """

    def __init__(self, n_clusters: int = 1, z_threshold: float = 3.0, drop_fraction: float | None = None,
                 space: str = "features"):
        self.n_clusters = check_int(n_clusters, "n_clusters", 1, 100)
        self.z_threshold = float(check_range(z_threshold, "z_threshold", 0, 100, lo_open=True))
        self.drop_fraction = check_fraction_or_none(drop_fraction, "drop_fraction")
        self.space = check_choice(space, "space", ("features", "pixels"))

    def score(self, ctx: DefenseContext) -> FilterOutput:
        s = kmeans_outlier_scores(pixels_or_features(ctx, self.space), ctx.train.labels, self.n_clusters, ctx.seed)
        return FilterOutput(s, threshold_flags(s, ctx.train.labels, self.z_threshold, self.drop_fraction))
