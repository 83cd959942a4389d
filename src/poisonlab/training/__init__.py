"""Training: the one loop (:func:`fit`), its config, batched augmentation, prediction."""

from poisonlab.training.augment import augment_batch
from poisonlab.training.crossval import cross_val_pred_probs
from poisonlab.training.loop import (
    TrainConfig,
    evaluate_loss_acc,
    extract_features,
    fit,
    predict_logits,
    predict_proba,
)

__all__ = ["TrainConfig", "fit", "predict_proba", "predict_logits", "extract_features", "augment_batch",
           "evaluate_loss_acc"]
