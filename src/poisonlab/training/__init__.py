"""Training: the one loop (:func:`fit`), its config and presets, batched augmentation, prediction."""

from poisonlab.training.augment import augment_batch
from poisonlab.training.crossval import cross_val_pred_probs
from poisonlab.training.device import resolve_device, use_bf16
from poisonlab.training.loop import (
    PRESETS,
    TrainConfig,
    evaluate_loss_acc,
    extract_features,
    fit,
    predict_logits,
    predict_proba,
)
from poisonlab.training.muon import Muon

__all__ = ["TrainConfig", "PRESETS", "fit", "predict_proba", "predict_logits", "extract_features", "augment_batch",
           "evaluate_loss_acc", "resolve_device", "use_bf16", "Muon"]
