"""Aggregation rules and their audits over plain arrays.

``updates`` is always a float array ``(n_clients, d)``: one flattened model
(or model update) per client. The Flower strategies in
:mod:`poisonlab.federated.strategies` aggregate with Flower's own code; these
functions are the readable reference the tests compare them with, and they
compute what the strategies report: which clients a robust rule left out.

Rules: FedAvg (McMahan et al. 2017), coordinate-wise median and trimmed mean
(Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017), norm clipping
(Sun et al. 2019, "Can you really backdoor federated learning?").
"""

from __future__ import annotations

import numpy as np

from poisonlab.validate import check_beta, check_krum


def fedavg(updates: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of the rows (weights = number of local examples; equal if None)."""
    u = np.asarray(updates, dtype=np.float64)
    w = np.ones(len(u)) if weights is None else np.asarray(weights, dtype=np.float64)
    return (w[:, None] * u).sum(0) / w.sum()


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """Coordinate-wise median of the rows."""
    return np.median(np.asarray(updates), axis=0)


def trimmed_mean(updates: np.ndarray, beta: float) -> np.ndarray:
    """Coordinate-wise mean after dropping the ``int(beta * n)`` lowest and highest values."""
    check_beta(beta)
    u = np.sort(np.asarray(updates), axis=0)
    k = int(beta * len(u))
    return u[k:len(u) - k].mean(0)


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum score per client: sum of squared distances to its ``n - f - 2`` nearest neighbours."""
    u = np.asarray(updates, dtype=np.float64)
    n = len(u)
    check_krum(n, f)
    sq = (u * u).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * u @ u.T, 0)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :n - f - 2].sum(1)


def krum_select(updates: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Indices of the ``m`` lowest-scoring clients (Krum: ``m = 1``; Multi-Krum averages them)."""
    check_krum(len(updates), f, m)
    return np.sort(np.argsort(krum_scores(updates, f), kind="stable")[:m])


def clip_updates(updates: np.ndarray, max_norm: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale every row to L2 norm at most ``max_norm``; also return which rows were clipped."""
    u = np.asarray(updates, dtype=np.float64)
    norms = np.linalg.norm(u, axis=1)
    factor = np.minimum(1.0, max_norm / np.maximum(norms, 1e-12))
    return u * factor[:, None], norms > max_norm


def trimmed_share(updates: np.ndarray, beta: float) -> np.ndarray:
    """Per client, the share of its coordinates a trimmed mean at ``beta`` cuts off (lowest or highest ``int(beta n)``)."""
    u = np.asarray(updates)
    n = len(u)
    k = int(beta * n)
    if k == 0:
        return np.zeros(n)
    rank = np.argsort(np.argsort(u, axis=0, kind="stable"), axis=0, kind="stable")
    cut = (rank < k) | (rank >= n - k)
    return cut.mean(1)


def coordinate_excluded(updates: np.ndarray, beta: float) -> np.ndarray:
    """Clients a coordinate-wise rule effectively ignored.

    A coordinate-wise rule drops values, not clients. A client counts as
    excluded when the share of its coordinates cut at ``beta`` lies more than
    half-way from what chance gives an honest client (``2 int(beta n) / n``)
    to 1. The median is audited with ``beta = 0.25`` (values outside the
    middle half).
    """
    n = len(updates)
    chance = 2 * int(beta * n) / n
    if chance == 0:
        return np.zeros(n, dtype=bool)
    return trimmed_share(updates, beta) > (1 + chance) / 2


def exclusion_metrics(excluded: np.ndarray, malicious: np.ndarray) -> dict[str, float]:
    """Precision and recall of the excluded set against the known malicious clients (booleans per sampled client).

    Precision is NaN when nothing was excluded, recall NaN when no malicious client took part.
    """
    ex, mal = np.asarray(excluded, dtype=bool), np.asarray(malicious, dtype=bool)
    tp = int((ex & mal).sum())
    return {"excl_precision": tp / ex.sum() if ex.any() else float("nan"),
            "excl_recall": tp / mal.sum() if mal.any() else float("nan"),
            "n_excluded": int(ex.sum()), "n_malicious": int(mal.sum()), "tp": tp}
