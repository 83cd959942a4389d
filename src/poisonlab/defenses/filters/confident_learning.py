"""Confident learning for flipped labels (Northcutt, Jiang and Chuang, "Confident
Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021), through
cleanlab's :func:`cleanlab.filter.find_label_issues`.

The probabilities must be out-of-sample: ``ctx.cv_pred_probs(folds)`` trains
``folds`` models, each predicting the fold it did not see (shared by every
filter of the run through ``ctx.cache``).
"""

from __future__ import annotations

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_int

FILTER_BY = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


def confident_learning_scores(labels: np.ndarray, pred_probs: np.ndarray, filter_by: str = "prune_by_noise_rate",
                              min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label issues by confident learning.

    Args:
        labels: ``(N,)`` given labels.
        pred_probs: ``(N, K)`` out-of-sample class probabilities (k-fold cross-validation).
        filter_by: cleanlab's pruning rule.
        min_confidence: additionally require the suggested class's probability to reach this
            (0 = cleanlab's decision alone); raises precision when the model is weak.

    Returns:
        ``(scores, flagged, suggested_labels)``: score = 1 - p[given label] (cleanlab's
        self-confidence quality, inverted: higher = more suspicious); ``flagged`` cleanlab's label
        issues; ``suggested_labels`` the most probable class of each sample.
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(pred_probs, dtype=np.float32)
    if p.ndim != 2 or len(p) != len(y):
        raise ParameterError(f"pred_probs must be (N={len(y)}, K), got shape {p.shape}")
    p = p / np.maximum(p.sum(1, keepdims=True), 1e-12)
    flagged = np.zeros(len(y), dtype=bool)
    present = np.unique(y)
    if len(present) >= 2:
        # cleanlab needs every class of pred_probs present in labels: work on the present ones
        sub = p[:, present]
        sub = sub / np.maximum(sub.sum(1, keepdims=True), 1e-12)
        remap = np.searchsorted(present, y)
        flagged = find_label_issues(remap, sub, filter_by=filter_by, n_jobs=1)
    quality = get_label_quality_scores(np.searchsorted(present, y), p[:, present] / np.maximum(
        p[:, present].sum(1, keepdims=True), 1e-12), method="self_confidence")
    suggested = p.argmax(1)
    if min_confidence > 0:
        flagged &= p[np.arange(len(y)), suggested] >= min_confidence
    flagged &= suggested != y
    return 1.0 - quality, flagged, suggested


@DEFENSES.register("confident_learning")
class ConfidentLearning(Filter):
    """Confident learning (Northcutt et al. 2021) via cleanlab's find_label_issues on k-fold CV probabilities.

    ``info["suggested_labels"]`` holds the most probable class of every sample, and
    ``info["n_suggested_relabel"]`` how many flagged samples have a suggestion.

    Args:
        folds: k for the out-of-sample probabilities, [2, 20].
        filter_by: cleanlab's rule, one of prune_by_noise_rate (default), prune_by_class, both,
            confident_learning, predicted_neq_given.
        min_confidence: also require the suggested class's probability >= this, [0, 1].
    """

    def __init__(self, folds: int = 5, filter_by: str = "prune_by_noise_rate", min_confidence: float = 0.0):
        from poisonlab.validate import check_range

        self.folds = check_int(folds, "folds", 2, 20)
        self.filter_by = check_choice(filter_by, "filter_by", FILTER_BY)
        self.min_confidence = float(check_range(min_confidence, "min_confidence", 0, 1))

    def score(self, ctx: DefenseContext) -> FilterOutput:
        probs = ctx.cv_pred_probs(self.folds)
        s, flagged, suggested = confident_learning_scores(ctx.train.labels, probs, self.filter_by, self.min_confidence)
        return FilterOutput(s, flagged, {"suggested_labels": suggested, "n_suggested_relabel": int(flagged.sum())})
