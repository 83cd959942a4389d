"""Loss outliers: drop training samples whose loss is abnormally high.

The first defence of the ResNet-18 poisoning study: a mislabelled or poisoned
sample disagrees with what the rest of its class teaches, so the model keeps a
high loss on it. With ``cross_validated=True`` the loss comes from k-fold
out-of-sample predictions (a memorising model otherwise drives every training
loss to ~0).
"""

from __future__ import annotations

import numpy as np

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import robust_z, top_k_mask
from poisonlab.validate import check_fraction_or_none, check_int, check_range


def loss_outlier_scores(pred_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy loss ``-log p[label]`` of every sample.

    Args:
        pred_probs: ``(N, K)`` class probabilities (in-sample or out-of-sample).
        labels: ``(N,)`` given labels.

    Returns:
        ``(N,)`` losses; higher = more suspicious.
    """
    p = np.asarray(pred_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    return -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))


def loss_outlier_flags(losses: np.ndarray, z_threshold: float = 2.5, drop_fraction: float | None = None) -> np.ndarray:
    """Flag the top ``drop_fraction`` losses, or those whose robust z-score of log-loss exceeds ``z_threshold``.

    The log makes the heavy-tailed loss distribution roughly symmetric, so a
    median/MAD threshold is meaningful.
    """
    if drop_fraction is not None:
        return top_k_mask(losses, int(round(drop_fraction * len(losses))))
    return robust_z(np.log(np.asarray(losses) + 1e-6)) > z_threshold


@DEFENSES.register("loss_outliers")
class LossOutliers(Filter):
    """Drop samples with abnormally high training loss (ResNet-18 study, first defence).

    Args:
        z_threshold: flag samples whose robust z-score of log-loss exceeds it, (0, 100].
        drop_fraction: if given, drop exactly this fraction of highest-loss samples instead, (0, 1).
        cross_validated: use out-of-sample k-fold probabilities (``ctx.cv_pred_probs``) instead of
            the poisoned model's in-sample ones; slower (k extra trainings, shared with
            confident learning) but not fooled by memorisation.
        folds: k for the cross-validation, [2, 20].
    """

    def __init__(self, z_threshold: float = 2.5, drop_fraction: float | None = None,
                 cross_validated: bool = False, folds: int = 5):
        self.z_threshold = float(check_range(z_threshold, "z_threshold", 0, 100, lo_open=True))
        self.drop_fraction = check_fraction_or_none(drop_fraction, "drop_fraction")
        self.cross_validated = bool(cross_validated)
        self.folds = check_int(folds, "folds", 2, 20)

    def score(self, ctx: DefenseContext) -> FilterOutput:
        probs = ctx.cv_pred_probs(self.folds) if self.cross_validated else ctx.pred_probs()
        losses = loss_outlier_scores(probs, ctx.train.labels)
        return FilterOutput(losses, loss_outlier_flags(losses, self.z_threshold, self.drop_fraction))
