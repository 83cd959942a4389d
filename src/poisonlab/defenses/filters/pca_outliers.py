"""PCA outliers (the MNIST PCA/K-means poisoning study): per class, samples
poorly explained by the class's top principal components are suspicious.

Score = squared reconstruction error of the class-centred sample from its
class's top ``n_components`` principal axes; flag by a per-class robust
z-score. Works on penultimate features (default) or raw pixels.
"""

from __future__ import annotations

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import (as_features, class_indices, pca_reconstruction_error,
                                                per_class_robust_z, top_k_mask)
from poisonlab.validate import check_choice, check_fraction_or_none, check_int, check_range


def pca_outlier_scores(features: np.ndarray, labels: np.ndarray, n_components: int = 10, seed: int = 0) -> np.ndarray:
    """Per-class PCA reconstruction error.

    Args:
        features: ``(N, D)`` features or flattened pixels.
        labels: ``(N,)`` given labels.
        n_components: principal axes kept per class.

    Returns:
        ``(N,)`` reconstruction errors; higher = more suspicious. Comparable within a class.
    """
    f = as_features(features, labels)
    s = np.zeros(len(f))
    for _, idx in class_indices(labels):
        s[idx] = pca_reconstruction_error(f[idx], n_components, seed)
    return s


def threshold_flags(scores: np.ndarray, labels: np.ndarray, z_threshold: float,
                    drop_fraction: float | None) -> np.ndarray:
    """Flag per-class robust z above ``z_threshold``, or the top ``drop_fraction`` of z overall."""
    z = per_class_robust_z(scores, labels)
    if drop_fraction is not None:
        return top_k_mask(z, int(round(drop_fraction * len(z))))
    return z > z_threshold


def pixels_or_features(ctx: DefenseContext, space: str) -> np.ndarray:
    if space == "pixels":
        return ctx.train.images.reshape(len(ctx.train), -1).astype(np.float32) / 255.0
    return ctx.features()


@DEFENSES.register("pca_outliers")
class PCAOutliers(Filter):
    """Per-class PCA reconstruction-error outliers (MNIST PCA/K-means study).

    Args:
        n_components: principal axes per class, [1, 4096].
        z_threshold: flag when the per-class robust z-score of the error exceeds it, (0, 100].
        drop_fraction: if given, drop this fraction with the highest z-scores instead, (0, 1).
        space: ``features`` (penultimate layer) or ``pixels``.
    """

    def __init__(self, n_components: int = 10, z_threshold: float = 3.0, drop_fraction: float | None = None,
                 space: str = "features"):
        self.n_components = check_int(n_components, "n_components", 1, 4096)
        self.z_threshold = float(check_range(z_threshold, "z_threshold", 0, 100, lo_open=True))
        self.drop_fraction = check_fraction_or_none(drop_fraction, "drop_fraction")
        self.space = check_choice(space, "space", ("features", "pixels"))

    def score(self, ctx: DefenseContext) -> FilterOutput:
        s = pca_outlier_scores(pixels_or_features(ctx, self.space), ctx.train.labels, self.n_components, ctx.seed)
        return FilterOutput(s, threshold_flags(s, ctx.train.labels, self.z_threshold, self.drop_fraction))
