"""Shared helpers of the perturbation attacks (class-wise, error-minimizing, FGSM,
gradient matching, feature collision): budgets in pixel units, writing float
perturbations back into uint8 images, batched input gradients, target picking.

Private module (leading underscore): the attack auto-import skips it; the
attack modules import it directly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
# re-exported: attack modules written before poisonlab.validate existed import them from here
from poisonlab.validate import check_class, check_target_pair  # noqa: F401


def eps_levels(epsilon: float) -> int:
    """An L-inf budget in [0, 1] pixel units as whole uint8 grey levels (8/255 -> 8), rounded down."""
    return int(np.floor(epsilon * 255 + 1e-6))


def apply_delta(images: np.ndarray, delta: np.ndarray | torch.Tensor, epsilon: float) -> np.ndarray:
    """Add a float perturbation (NHWC or NCHW, pixel units 0..1) to uint8 NHWC ``images``.

    The perturbation is rounded to whole grey levels and clipped to the budget
    *before* it is added, so that ``|poisoned - clean| <= epsilon * 255`` holds
    exactly in uint8 (rounding after adding could exceed it by one level).
    """
    if isinstance(delta, torch.Tensor):
        d = delta.detach().cpu().float()
        if d.ndim == 4 and d.shape[1] == images.shape[3] and d.shape[1:] != images.shape[1:]:
            d = d.permute(0, 2, 3, 1)  # NCHW -> NHWC
        d = d.numpy()
    else:
        d = np.asarray(delta, dtype=np.float32)
    k = eps_levels(epsilon)
    d_int = np.clip(np.rint(d * 255), -k, k).astype(np.int16)
    return np.clip(images.astype(np.int16) + d_int, 0, 255).astype(np.uint8)


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean per image: True where the uint8 images ``a`` and ``b`` differ anywhere."""
    return (a != b).reshape(len(a), -1).any(1)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def to_nchw_float(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC numpy -> float NCHW tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)


def fgsm_direction(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """sign(d CE(model(x), y) / dx) for uint8 NHWC ``images``, in batches; float NCHW on the CPU.

    The model is put in eval mode (batch-norm statistics are not touched) and
    its parameter gradients are neither used nor accumulated.
    """
    model.eval()
    dev = model_device(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = to_nchw_float(images[i:i + batch_size], dev).requires_grad_(True)
        y = torch.from_numpy(labels[i:i + batch_size]).to(dev)
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        out.append(g.sign().cpu())
    return torch.cat(out) if out else torch.empty(0)


def targets_from_context(attack, context, rng: np.random.Generator, n_targets: int) -> tuple[nn.Module, np.ndarray, int, int]:
    """A targeted attack's targets: check that ``context`` has the test set, then :func:`pick_targets`
    with the attack's ``target_index``, ``target_class`` and ``adversarial_class``.

    Returns ``(clean model, target indices, target class, adversarial class)``.
    """
    who = attack.registry_name
    if context.test is None:
        raise ParameterError(f"{who} needs the test set (context.test) to pick its target")
    model = context.clean_model
    ti, tc, ac = pick_targets(context.test, model, rng, who, attack.target_index, attack.target_class,
                              attack.adversarial_class, n_targets)
    return model, ti, tc, ac


def pick_targets(
    test: ImageSet,
    model: nn.Module,
    rng: np.random.Generator,
    who: str,
    target_index: int | Sequence[int] | None,
    target_class: int | None,
    adversarial_class: int | None,
    n_targets: int,
) -> tuple[np.ndarray, int, int]:
    """Choose the target test image(s) and the adversarial class of a targeted attack.

    Given ``target_index`` (one index or a list), those images are the targets and
    ``target_class`` is their true class (they must share one). Otherwise
    ``n_targets`` images of ``target_class`` (drawn with ``rng`` if None) that
    ``model`` classifies correctly are drawn at random. ``adversarial_class``
    defaults to a random class other than the target class.

    Returns ``(target_indices, target_class, adversarial_class)``.
    """
    k = test.num_classes
    if target_index is not None:
        ti = np.atleast_1d(np.asarray(target_index, dtype=np.int64))
        if ti.size == 0 or ti.min() < 0 or ti.max() >= len(test):
            raise ParameterError(f"{who}: target_index={target_index!r} outside the test set (allowed 0..{len(test) - 1})")
        classes = np.unique(test.labels[ti])
        if len(classes) != 1:
            raise ParameterError(f"{who}: target_index images must share one class, got classes {classes.tolist()}")
        if target_class is not None and int(classes[0]) != target_class:
            raise ParameterError(f"{who}: target_index {ti.tolist()} has class {int(classes[0])}, "
                                 f"not target_class={target_class}")
        tc = int(classes[0])
    else:
        tc = int(rng.integers(k)) if target_class is None else int(target_class)
        pool = np.nonzero(test.labels == tc)[0]
        if len(pool):
            probs = predict_classes(model, test.images[pool])
            correct = pool[probs == tc]
            pool = correct if len(correct) >= n_targets else pool  # fall back if the surrogate is that weak
        if len(pool) < n_targets:
            raise ParameterError(f"{who}: n_targets={n_targets} but the test set has only {len(pool)} "
                                 f"images of class {tc}")
        ti = np.sort(rng.choice(pool, size=n_targets, replace=False))
    if adversarial_class is None:
        ac = int(rng.choice([c for c in range(k) if c != tc]))
    else:
        ac = int(adversarial_class)
    if ac == tc:
        raise ParameterError(f"{who}: adversarial_class={ac} equals the target's class")
    return ti, tc, ac


@torch.no_grad()
def predict_classes(model: nn.Module, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    dev = model_device(model)
    out = [model(to_nchw_float(images[i:i + batch_size], dev)).argmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.int64)
