"""How close training runs to the machine's limit: FLOPs of a step and the matmul peak.

``step_flops`` counts a real training step (forward, backward and optimiser, Muon's Newton-Schulz
matmuls included) with :class:`torch.utils.flop_counter.FlopCounterMode`; ``matmul_peak_tflops``
times a large matrix product in the same dtype and thread count. Their ratio, achieved over peak,
is the model FLOP utilisation (MFU) that docs/performance.md reports.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from poisonlab.data.imageset import ImageSet
from poisonlab.training.loop import TrainConfig, prepare, train_epoch


def step_flops(model: nn.Module, train: ImageSet, cfg: TrainConfig, *, stem_frozen: bool = False) -> float:
    """FLOPs of one optimiser step of ``cfg`` (one batch of ``cfg.batch_size`` images of ``train``).

    Runs the step on a deep copy of ``model`` (the model is left untouched). ``stem_frozen`` counts a
    step after ``cfg.stem_bias_epochs``, when no gradient flows into a whitened stem any more.
    """
    model = copy.deepcopy(model)
    n = min(len(train), cfg.batch_size)
    one_step = cfg.model_copy(update={"epochs": 1, "batch_size": n,
                                      "stem_bias_epochs": 0 if stem_frozen else cfg.stem_bias_epochs})
    state = prepare(model, train.subset(range(n)), one_step, sample_weight=None, seed=0, device=None,
                    freeze_body=False, batch_weight_fn=None)
    with FlopCounterMode(display=False) as counter:
        train_epoch(state, 0)
    return float(counter.get_total_flops())


def training_flops(model: nn.Module, train: ImageSet, cfg: TrainConfig) -> float:
    """FLOPs of a whole :func:`~poisonlab.training.fit` of ``cfg`` on ``train`` (steps x FLOPs per step).

    Counted on one full batch per phase (with and without the stem's bias gradient) and scaled to the
    number of images; the last, partial batch of an epoch is counted pro rata.
    """
    sample = train.subset(range(min(len(train), cfg.batch_size)))
    per_image = step_flops(model, sample, cfg) / len(sample)
    stem_epochs = min(cfg.stem_bias_epochs or 0, cfg.epochs) if cfg.stem_bias_epochs is not None else cfg.epochs
    frozen_per_image = per_image
    if stem_epochs < cfg.epochs and getattr(model, "stem_bias", None) is not None:
        frozen_per_image = step_flops(model, sample, cfg, stem_frozen=True) / len(sample)
    return len(train) * (stem_epochs * per_image + (cfg.epochs - stem_epochs) * frozen_per_image)


def matmul_peak_tflops(dtype: torch.dtype = torch.bfloat16, n: int = 4096, repeats: int = 5,
                       device: torch.device | str = "cpu") -> float:
    """TFLOP/s of an ``n x n`` matrix product in ``dtype`` (best of ``repeats`` after two warm-ups)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 2):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12
