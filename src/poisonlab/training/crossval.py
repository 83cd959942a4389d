"""k-fold out-of-sample class probabilities: what confident learning and the audit need."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from poisonlab.data.imageset import ImageSet


def cross_val_pred_probs(train_model: Callable[..., Any], data: ImageSet, folds: int = 5, seed: int = 0,
                         on_fold: Callable[[int, Any, np.ndarray, np.ndarray], None] | None = None,
                         describe: bool = False) -> np.ndarray:
    """Class probabilities for every image of ``data`` from a model that did not train on it.

    The images are split into ``folds`` stratified folds (shuffled with ``seed``); for each fold a
    model is trained on the others with ``train_model(imageset)`` and predicts the held-out fold.

    Args:
        train_model: ``train_model(imageset) -> model`` (a trained classifier).
        data: the labelled images.
        folds: k, at least 2; each class needs at least ``folds`` images.
        seed: shuffles the folds.
        on_fold: called as ``on_fold(i, model, test_idx, test_probs)`` after fold ``i`` (0-based) has
            predicted its held-out images, e.g. to log its accuracy or keep its model.
        describe: also pass ``description="fold i/k"`` to ``train_model`` (its progress bar's label).

    Returns:
        ``(N, K)`` float32 probabilities, K = ``data.num_classes``.
    """
    from sklearn.model_selection import StratifiedKFold

    from poisonlab.training.loop import predict_proba

    probs = np.zeros((len(data), data.num_classes), dtype=np.float32)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for i, (tr, te) in enumerate(skf.split(np.zeros(len(data)), data.labels)):
        model = train_model(data.subset(tr), **({"description": f"fold {i + 1}/{folds}"} if describe else {}))
        probs[te] = predict_proba(model, data.subset(te))
        if on_fold is not None:
            on_fold(i, model, te, probs[te])
    return probs
