"""Helpers shared by the filters: per-class PCA, robust z-scores, top-k flags, validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from poisonlab.errors import ParameterError
from poisonlab.metrics import robust_z
# re-exported: filter modules written before poisonlab.validate existed import them from here
from poisonlab.validate import check_fraction_or_none, check_int  # noqa: F401


def as_features(features: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Check and convert ``features`` to a float32 ``(N, D)`` array (and ``labels`` to match)."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim == 1:
        f = f[:, None]
    if f.ndim != 2:
        f = f.reshape(len(f), -1)
    if labels is not None and len(labels) != len(f):
        raise ParameterError(f"features has {len(f)} rows but labels has {len(labels)} entries")
    if not np.isfinite(f).all():
        f = np.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0)
    return f


def class_indices(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``[(class, indices of that class)]`` for every class present in ``labels``."""
    labels = np.asarray(labels)
    return [(int(c), np.nonzero(labels == c)[0]) for c in np.unique(labels)]


def pca(x: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """Project centred ``x`` onto its top ``n_components`` principal axes.

    A randomised low-rank SVD (Halko et al. 2011, ``torch.svd_lowrank``)
    instead of a full SVD: the filters only need a few axes of a few hundred
    feature dimensions, and this keeps 50,000 samples well under a second.
    """
    n, d = x.shape
    k = int(min(n_components, d, max(1, n - 1)))
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    xt = xt - xt.mean(0, keepdim=True)
    if n < 2:
        return np.zeros((n, k), dtype=np.float32)
    torch.manual_seed(seed)
    if k >= min(n, d) // 2:  # small problem: an exact SVD is cheaper than oversampling
        _, _, v = torch.linalg.svd(xt, full_matrices=False)
        v = v[:k].T
    else:
        _, _, v = torch.svd_lowrank(xt, q=min(k + 10, min(n, d)), niter=4)
        v = v[:, :k]
    return (xt @ v).numpy()


def pca_reconstruction_error(x: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """Squared distance of each (centred) row of ``x`` to its projection on the top principal axes."""
    xc = x - x.mean(0, keepdims=True)
    z = pca(x, n_components, seed)
    return np.maximum((xc.astype(np.float64) ** 2).sum(1) - (z.astype(np.float64) ** 2).sum(1), 0.0)


def per_class_pca(x: np.ndarray, labels: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """Each class's rows of ``x`` projected onto that class's top ``n_components`` principal axes.

    Returns ``(N, min(n_components, D))`` float32; a class with fewer samples than axes fills
    only the leading columns.
    """
    out = np.zeros((len(x), min(n_components, x.shape[1])), dtype=np.float32)
    for _, idx in class_indices(labels):
        z = pca(x[idx], n_components, seed)
        out[idx, : z.shape[1]] = z
    return out


def class_pca(ctx: Any, n_components: int) -> np.ndarray:
    """Per-class PCA of ``ctx.features()`` to ``n_components`` dims, cached in ``ctx.cache``.

    Several filters (activation clustering, PCA + k-means) start from the same
    projection; the runner shares ``ctx.cache`` between the defences of one
    poisoned set, so it is computed once.
    """
    key = f"class_pca_{n_components}"
    if key not in ctx.cache:
        ctx.cache[key] = per_class_pca(as_features(ctx.features()), ctx.train.labels, n_components, ctx.seed)
    return ctx.cache[key]


def other_class_whitened(features: np.ndarray, labels: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    """Whiten each class's features by the pooled within-class covariance of the *other* classes.

    A dirty-label backdoor puts all its poisons into one class, so the other
    classes give an estimate of how clean images vary that the poisons do not
    contaminate (the idea of robust-covariance whitening in SPECTRE, Hayase et
    al. 2021, with the other classes as the robust estimate). Directions in
    which clean images hardly vary but a trigger moves the features are
    stretched, so a trigger cluster separates where plain PCA sees only the
    class's natural variation.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` labels.
        ridge: eigenvalues below ``ridge x`` the largest are raised to it (rank-deficient features).

    Returns:
        ``(N, D)`` float32 whitened, per-class median-centred features (all zero with fewer
        than two classes).
    """
    f = as_features(features, labels).astype(np.float64)
    labels = np.asarray(labels)
    groups = class_indices(labels)
    white = np.zeros_like(f)
    if len(groups) < 2:
        return white.astype(np.float32)
    scatter = {c: np.cov(f[idx].T, bias=True) * len(idx) if len(idx) > 1 else np.zeros((f.shape[1],) * 2)
               for c, idx in groups}
    total = sum(scatter.values())
    n_total = sum(len(idx) for _, idx in groups)
    for c, idx in groups:
        dof = max(1, n_total - len(idx) - (len(groups) - 1))
        cov = (total - scatter[c]) / dof
        w, v = np.linalg.eigh(np.atleast_2d(cov))
        w = np.maximum(w, ridge * max(float(w.max()), 1e-12))
        x = f[idx] - np.median(f[idx], axis=0)
        white[idx] = (x @ v) / np.sqrt(w)
    return white.astype(np.float32)


def per_class_robust_z(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """:func:`robust_z` within each class, so classes of different spread share one threshold."""
    out = np.zeros(len(scores), dtype=np.float64)
    for _, idx in class_indices(labels):
        out[idx] = robust_z(scores[idx])
    return out


def top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` highest scores (ties broken by index)."""
    m = np.zeros(len(scores), dtype=bool)
    k = int(max(0, min(k, len(scores))))
    if k:
        m[np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]] = True
    return m


def kmeans(x: np.ndarray, n_clusters: int, seed: int = 0, n_init: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """k-means (k-means++ start, Lloyd iterations): ``(assignment, centres)``."""
    from sklearn.cluster import KMeans

    k = int(min(n_clusters, len(x)))
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64), x.mean(0, keepdims=True)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=100).fit(x)
    return km.labels_.astype(np.int64), km.cluster_centers_
