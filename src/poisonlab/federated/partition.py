"""Split a training set among federated clients: IID or Dirichlet non-IID.

Both functions take the label array and return one sorted index array per
client; the arrays are disjoint and together cover every sample.
"""

from __future__ import annotations

import numpy as np

from poisonlab.errors import ParameterError
from poisonlab.validate import check_range


def _check_clients(n_samples: int, num_clients: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ParameterError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > n_samples:
        raise ParameterError(f"num_clients={num_clients} is more than the {n_samples} training samples")


def iid_partition(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle and deal the samples into ``num_clients`` parts of (almost) equal size."""
    n = len(labels)
    _check_clients(n, num_clients)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(p) for p in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients with proportions ~ Dir(alpha).

    The usual non-IID benchmark (Hsu et al. 2019, "Measuring the effects of
    non-identical data distribution"): a small ``alpha`` (0.1) gives each
    client one or two dominant classes, a large one (100) is close to IID.
    Draws are repeated until every client holds at least ``min_size`` samples.

    Args:
        labels: integer class label per training sample.
        num_clients: number of parts.
        alpha: Dirichlet concentration, > 0.
        seed: makes the split repeatable.
        min_size: smallest acceptable part.

    Returns:
        ``num_clients`` sorted, disjoint index arrays covering ``range(len(labels))``.
    """
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, num_clients)
    check_range(alpha, "alpha", 0, 1e9, lo_open=True)
    if min_size * num_clients > n:
        raise ParameterError(f"min_size={min_size} x num_clients={num_clients} exceeds the {n} samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.nonzero(labels == c)[0])
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ParameterError(
        f"dirichlet partition: alpha={alpha} left a client with fewer than {min_size} samples in "
        f"{max_tries} draws; raise alpha, use fewer clients or more data")


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[np.ndarray]:
    """``iid_partition`` or ``dirichlet_partition`` by name (``scheme`` = ``iid`` | ``dirichlet``)."""
    if scheme == "iid":
        return iid_partition(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    raise ParameterError(f"partition must be 'iid' or 'dirichlet', got {scheme!r}")


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean over clients of the share of their largest class (1/K for perfectly balanced parts, 1 for one class each)."""
    labels = np.asarray(labels)
    k = int(labels.max()) + 1 if len(labels) else 1
    shares = [np.bincount(labels[p], minlength=k).max() / max(1, len(p)) for p in parts]
    return float(np.mean(shares))
