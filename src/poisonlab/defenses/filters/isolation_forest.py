"""Isolation-forest data sanitisation (Liu, Ting and Zhou, "Isolation Forest",
ICDM 2008), applied to penultimate features as an anomaly detector over the
training set: samples that random axis-aligned splits isolate quickly are
anomalous. Fitted per class by default, since a poisoned sample is anomalous
for the class it claims, not for the whole data set.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import as_features, class_indices, pca
from poisonlab.errors import ParameterError
from poisonlab.validate import check_int, check_range


def isolation_forest_scores(features: np.ndarray, labels: np.ndarray | None = None, n_estimators: int = 100,
                            contamination: float | str = "auto", n_components: int | None = 32,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly score of every sample by an isolation forest (per class if ``labels`` is given).

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` labels; None fits one forest on all samples.
        n_estimators: trees per forest.
        contamination: expected outlier share, or ``"auto"`` (the paper's 0.5 score threshold).
        n_components: reduce to this many PCA dims first (None: keep all); speeds the forest up
            and removes directions of pure noise.
        seed: seeds the forest.

    Returns:
        ``(scores, flagged)``: score = negated sklearn ``score_samples`` (higher = more anomalous).
    """
    from sklearn.ensemble import IsolationForest

    f = as_features(features, labels)
    groups = [(0, np.arange(len(f)))] if labels is None else class_indices(labels)
    scores = np.zeros(len(f))
    flagged = np.zeros(len(f), dtype=bool)
    for _, idx in groups:
        if len(idx) < 8:
            continue
        x = pca(f[idx], n_components, seed) if n_components else f[idx]
        forest = IsolationForest(n_estimators=n_estimators, contamination=contamination, random_state=seed,
                                 max_samples=min(256, len(idx))).fit(x)
        scores[idx] = -forest.score_samples(x)
        flagged[idx] = forest.predict(x) == -1
    return scores, flagged


@DEFENSES.register("isolation_forest")
class IsolationForestFilter(Filter):
    """Isolation forest (Liu et al. 2008) on penultimate features, per class by default.

    Args:
        n_estimators: trees, [10, 2000].
        contamination: ``"auto"`` or the expected outlier share in (0, 0.5].
        n_components: PCA dims before the forest, [1, 4096], or None for raw features.
        per_class: one forest per class (default) or one for all samples.
    """

    def __init__(self, n_estimators: int = 100, contamination: float | str = "auto", n_components: int | None = 32,
                 per_class: bool = True):
        self.n_estimators = check_int(n_estimators, "n_estimators", 10, 2000)
        if contamination != "auto":
            if isinstance(contamination, str):
                raise ParameterError(f"contamination must be 'auto' or in (0, 0.5], got {contamination!r}")
            check_range(contamination, "contamination", 0, 0.5, lo_open=True)
        self.contamination: Any = contamination
        self.n_components = None if n_components is None else check_int(n_components, "n_components", 1, 4096)
        self.per_class = bool(per_class)

    def score(self, ctx: DefenseContext) -> FilterOutput:
        s, flagged = isolation_forest_scores(ctx.features(), ctx.train.labels if self.per_class else None,
                                             self.n_estimators, self.contamination, self.n_components, ctx.seed)
        return FilterOutput(s, flagged)
