"""Evaluation metrics over plain arrays, and :func:`evaluate` for a model on a test set.

Attack success rate (ASR) follows BackdoorBench: among test images whose true
class is not the target, the share classified as the target once the
trigger is applied. Robust accuracy: the share of those triggered images
still classified as their true class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import f1_score, precision_recall_fscore_support, roc_auc_score

if TYPE_CHECKING:
    from torch import nn

    from poisonlab.attacks.base import Poisoning
    from poisonlab.data.imageset import ImageSet


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else float("nan")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int | None = None) -> float:
    labels = np.arange(num_classes) if num_classes else None
    return float(f1_score(y_true, y_pred, average="macro", labels=labels, zero_division=0))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[i, j]`` = number of samples of true class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(cm) / cm.sum(1)


def attack_success_rate(y_true: np.ndarray, y_pred_triggered: np.ndarray, target: int) -> float:
    """Share of non-target-class images classified as ``target`` after the trigger."""
    m = np.asarray(y_true) != target
    return float((np.asarray(y_pred_triggered)[m] == target).mean()) if m.any() else float("nan")


def robust_accuracy(y_true: np.ndarray, y_pred_triggered: np.ndarray, target: int) -> float:
    """Share of non-target-class triggered images still classified as their true class."""
    m = np.asarray(y_true) != target
    return float((np.asarray(y_pred_triggered)[m] == np.asarray(y_true)[m]).mean()) if m.any() else float("nan")


def detection_metrics(is_poison: np.ndarray, flagged: np.ndarray, scores: np.ndarray | None = None) -> dict[str, float]:
    """Precision, recall, F1 of a keep/drop decision, and AUROC of suspicion scores.

    Args:
        is_poison: ground truth, True for samples the attack touched.
        flagged: the filter's decision, True for samples it removes.
        scores: suspicion scores (higher = more suspicious), optional.
    """
    is_poison = np.asarray(is_poison, dtype=bool)
    flagged = np.asarray(flagged, dtype=bool)
    p, r, f, _ = precision_recall_fscore_support(is_poison, flagged, average="binary", zero_division=0)
    out = {
        "det_precision": float(p), "det_recall": float(r), "det_f1": float(f),
        "n_flagged": int(flagged.sum()),
        "clean_lost": float((flagged & ~is_poison).sum() / max(1, (~is_poison).sum())),
    }
    if scores is not None and 0 < is_poison.sum() < len(is_poison):
        s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0, posinf=1e300, neginf=-1e300)
        out["det_auroc"] = float(roc_auc_score(is_poison, s))
    else:
        out["det_auroc"] = float("nan")
    return out


def robust_z(x: np.ndarray, min_mad: float | None = None) -> np.ndarray:
    """Robust z-scores ``(x - median) / (1.4826 MAD)``: a minority of outliers does not inflate the scale.

    1.4826 MAD estimates a normal standard deviation. ``min_mad``: when given, the scale is floored at
    it (Neural Cleanse's anomaly index); when None, a MAD of (almost) zero falls back to the standard
    deviation, or 1 if that is zero too (the filters' per-class scores).
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return x
    med = np.median(x)
    mad = 1.4826 * np.median(np.abs(x - med))
    if min_mad is not None:
        mad = max(mad, min_mad)
    elif mad <= 1e-12:
        mad = x.std() or 1.0
    return (x - med) / mad


def defense_effectiveness_rating(asr_before: float, asr_after: float, acc_before: float, acc_after: float) -> float:
    """DER = (max(0, ASR drop) - max(0, clean-accuracy drop) + 1) / 2 (BackdoorBench), in [0, 1]."""
    return (max(0.0, asr_before - asr_after) - max(0.0, acc_before - acc_after) + 1) / 2


def evaluate(model: "nn.Module", test: "ImageSet", poisoning: "Poisoning | None" = None,
             batch_size: int = 1024, tta_flip: bool = False, tta: str | None = None) -> dict[str, Any]:
    """Clean metrics of ``model`` on ``test``, plus attack metrics if ``poisoning`` has a trigger or targets.

    ``tta`` names the test-time views averaged ("none", "flip", "flip_translate"; see
    :func:`poisonlab.training.predict_logits`); ``tta_flip=True`` is the older spelling of "flip".

    Returns a dict with ``clean_acc, macro_f1, per_class_acc, confusion`` and,
    for backdoors, ``asr, robust_acc, confusion_triggered``; for targeted
    attacks, ``target_success`` and the target's class probabilities.
    """
    from poisonlab.training.loop import predict_proba

    k = test.num_classes
    probs = predict_proba(model, test, batch_size=batch_size, tta_flip=tta_flip, tta=tta)
    pred = probs.argmax(1)
    out: dict[str, Any] = {
        "clean_acc": accuracy(test.labels, pred),
        "macro_f1": macro_f1(test.labels, pred, k),
        "per_class_acc": per_class_accuracy(test.labels, pred, k).tolist(),
        "confusion": confusion_matrix(test.labels, pred, k).tolist(),
        "asr": float("nan"),
        "robust_acc": float("nan"),
    }
    if poisoning is None:
        return out
    if poisoning.has_trigger:
        trig = poisoning.apply_trigger(test.images)
        tpred = predict_proba(model, trig, batch_size=batch_size, tta_flip=tta_flip, tta=tta).argmax(1)
        t = poisoning.target_class
        out["asr"] = attack_success_rate(test.labels, tpred, t)
        out["robust_acc"] = robust_accuracy(test.labels, tpred, t)
        out["confusion_triggered"] = confusion_matrix(test.labels, tpred, k).tolist()
    if poisoning.target_indices is not None and len(poisoning.target_indices):
        ti = np.asarray(poisoning.target_indices)
        adv = np.asarray(poisoning.adversarial_labels)
        tp = probs[ti]
        out["target_success"] = float((tp.argmax(1) == adv).mean())
        out["target_probs"] = tp.tolist()
        out["asr"] = out["target_success"]
    return out
