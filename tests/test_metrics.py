import numpy as np
import pytest

from poisonlab.metrics import (attack_success_rate, confusion_matrix, defense_effectiveness_rating,
                               detection_metrics, macro_f1, per_class_accuracy, robust_accuracy)


def test_asr_excludes_target_class():
    y = np.array([0, 0, 1, 2, 3])
    pred = np.array([0, 0, 0, 2, 0])
    assert attack_success_rate(y, pred, 0) == pytest.approx(2 / 3)
    assert robust_accuracy(y, pred, 0) == pytest.approx(1 / 3)


def test_confusion_and_per_class():
    y = np.array([0, 1, 1, 2])
    p = np.array([0, 1, 2, 2])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert per_class_accuracy(y, p, 3).tolist() == [1.0, 0.5, 1.0]
    assert 0 < macro_f1(y, p, 3) < 1


def test_detection_metrics():
    truth = np.array([1, 1, 0, 0, 0], bool)
    flagged = np.array([1, 0, 1, 0, 0], bool)
    m = detection_metrics(truth, flagged, scores=np.array([0.9, 0.8, 0.7, 0.1, 0.2]))
    assert m["det_precision"] == 0.5 and m["det_recall"] == 0.5
    assert m["det_auroc"] == 1.0
    assert m["clean_lost"] == pytest.approx(1 / 3)


def test_der():
    assert defense_effectiveness_rating(0.9, 0.1, 0.85, 0.83) == pytest.approx((0.8 - 0.02 + 1) / 2)
    assert defense_effectiveness_rating(0.1, 0.2, 0.8, 0.9) == 0.5
