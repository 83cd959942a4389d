"""Low-frequency (smooth) trigger: Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks' Triggers:
A Frequency Perspective" (ICCV 2021)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from poisonlab.attacks._bb_common import AdditivePatternTrigger, check_target, pick_backdoor, stamp, torch_generator
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning
from poisonlab.validate import check_range, check_rate
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError


def gaussian_low_pass(v: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur float NCHW ``v`` with a separable Gaussian of std ``sigma`` pixels and ``5 * sigma`` taps,
    zero padding, channels apart (the authors' ``gauss_smooth``, whose default ``sig=6`` is ``sigma`` 6)."""
    taps = max(1, int(5 * sigma))
    pos = torch.arange(taps, dtype=torch.float32) - (taps - 1) / 2
    k = torch.exp(-0.5 * (pos / sigma) ** 2)
    k = k / k.sum()
    c = v.shape[1]
    before, after = taps // 2 - (1 - taps % 2), taps // 2
    out = nn.functional.pad(v, (before, after, before, after))
    out = nn.functional.conv2d(out, k.view(1, 1, taps, 1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(out, k.view(1, 1, 1, taps).repeat(c, 1, 1, 1), groups=c)


def rescale(v: torch.Tensor, amplitude: float) -> torch.Tensor:
    """Min-max rescale ``v`` to [0, ``amplitude``] (the authors' ``normalization``); zero stays zero."""
    span = v.max() - v.min()
    return (v - v.min()) / span * amplitude if span > 0 else torch.zeros_like(v)


def targeted_deepfool(model: nn.Module, x: torch.Tensor, target: int, max_iter: int = 200,
                      overshoot: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted DeepFool (Moosavi-Dezfooli et al. 2016) for a batch, each image on its own.

    Starting from ``x`` (float NCHW in [0, 1]), repeat the linearised step
    ``r += |f_t - f_l| / |w|^2 * w`` with ``w = grad(f_t - f_l)`` (``f_t`` the target's logit,
    ``f_l`` the logit of the class ``x`` had at the start) until the image is classified ``target``.

    Returns:
        ``((1 + overshoot) * r, converged)``: the perturbations and a bool per image (reached the
        target in fewer than ``max_iter - 1`` steps, the authors' acceptance test).
    """
    model.eval()
    with torch.no_grad():
        label = model(x).argmax(1)
    r = torch.zeros_like(x)
    active = label != target
    steps = torch.zeros(len(x), dtype=torch.long, device=x.device)
    rows = torch.arange(len(x), device=x.device)
    it = 0
    while bool(active.any()) and it < max_iter:
        xi = (x + (1 + overshoot) * r).detach().requires_grad_(True)
        logits = model(xi)
        f = logits[rows, target] - logits[rows, label]
        (w,) = torch.autograd.grad(f.sum(), xi)
        with torch.no_grad():
            now = logits.argmax(1)
            active &= now != target
            norm = w.flatten(1).norm(dim=1).clamp_min(1e-12)
            step = (f.abs() / norm ** 2)[:, None, None, None] * w
            step = torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
            r += step * active[:, None, None, None]
            steps += active.long()
        it += 1
    with torch.no_grad():
        final = model(x + (1 + overshoot) * r).argmax(1)
    return (1 + overshoot) * r, (final == target) & (steps < max_iter - 1)


def low_frequency_trigger(model: nn.Module, images: torch.Tensor, eval_images: torch.Tensor, target: int, *,
                          passes: int = 5, batch_size: int = 10, max_iter_df: int = 200, overshoot: float = 0.02,
                          sigma: float = 6.0, amplitude: float = 0.2, stop_fooling_rate: float = 0.2,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """A smooth universal perturbation towards ``target`` (Zeng et al. 2021, the authors' generator).

    Universal adversarial perturbation (Moosavi-Dezfooli et al. 2017) with a low-pass constraint:
    in each pass over ``images`` (shuffled), every image whose prediction ``v`` does not change gets
    a targeted DeepFool step ``dr``; ``v <- rescale(blur(v + blur(dr)))`` with the Gaussian
    :func:`gaussian_low_pass` and the [0, ``amplitude``] rescale of the authors' code. Passes stop
    early once ``v`` changes the prediction of ``stop_fooling_rate`` of ``eval_images``.

    Simplification: DeepFool runs on ``batch_size`` images at once against the same ``v`` and the
    steps are then folded in one by one; the authors' loop (``batch_size=1``) recomputes after each.

    Returns:
        ``v`` ``(C, H, W)`` in [0, ``amplitude``] and ``info`` (passes run, fooling rate per pass).
    """
    device = images.device
    v = torch.zeros(images.shape[1:], device=device)
    with torch.no_grad():
        clean_pred = model(eval_images).argmax(1)
    rates: list[float] = []
    for _ in range(passes):
        order = torch.randperm(len(images), generator=generator).to(device)
        for i in range(0, len(images), batch_size):
            x = images[order[i:i + batch_size]]
            with torch.no_grad():
                unchanged = model(x).argmax(1) == model(x + v).argmax(1)
            if not bool(unchanged.any()):
                continue
            dr, ok = targeted_deepfool(model, x[unchanged] + v, target, max_iter_df, overshoot)
            for d in dr[ok]:
                v = rescale(gaussian_low_pass((v + gaussian_low_pass(d[None], sigma)[0])[None], sigma)[0], amplitude)
        with torch.no_grad():
            rate = float((model(eval_images + v).argmax(1) != clean_pred).float().mean())
        rates.append(rate)
        if rate >= stop_fooling_rate:
            break
    return v, {"passes": len(rates), "fooling_rate": rates}


@ATTACKS.register("low_frequency")
class LowFrequency(Attack):
    """Low-frequency trigger backdoor (dirty label, all-to-one), Zeng et al. (ICCV 2021).

    The trigger is a smooth, additive pattern: a universal adversarial perturbation towards
    ``target`` on the clean surrogate ``context.clean_model`` (the run's model trained on the clean
    training set, as BackdoorBench's pattern script uses its clean model), kept low-frequency by a
    Gaussian low-pass filter after every update and rescaled to [0, ``amplitude``]
    (:func:`low_frequency_trigger`). ``rate`` of the training set (non-target classes) gets the
    pattern added and is relabelled ``target``; the same pattern is the test-time trigger.

    Budget: ``n_images`` training images, ``passes`` passes (BackdoorBench's script: 100 images,
    50 passes, DeepFool up to 200 steps, overshoot 0.02, blur ``sig=6``, rescale to 0.2, stop at a
    fooling rate of 0.2); the default of 5 passes keeps CPU runs short. BackdoorBench ships
    pre-computed patterns for its models; this one is computed for the run's own model.

    Args:
        rate: share of the WHOLE training set poisoned, (0, 1].
        target: class the trigger maps to.
        n_images: training images the perturbation is built on (as many others measure fooling).
        passes: passes over them, [1, 1000].
        max_iter_df: DeepFool steps per image, [1, 10000].
        overshoot: DeepFool overshoot, [0, 1].
        sigma: std of the Gaussian low-pass in pixels, (0, 64].
        amplitude: largest value of the pattern in [0, 1] pixel units, (0, 1].
        stop_fooling_rate: stop once the pattern changes this share of predictions, (0, 1].
        batch_size: images per DeepFool batch.
    """

    family = "backdoor"
    needs_clean_model = True

    def __init__(self, rate: float = 0.1, target: int = 0, n_images: int = 100, passes: int = 5,
                 max_iter_df: int = 200, overshoot: float = 0.02, sigma: float = 6.0, amplitude: float = 0.2,
                 stop_fooling_rate: float = 0.2, batch_size: int = 10):
        self.rate = check_rate(rate)
        self.target = check_target(target)
        self.n_images = int(check_range(n_images, "n_images", 1, 100_000))
        self.passes = int(check_range(passes, "passes", 1, 1000))
        self.max_iter_df = int(check_range(max_iter_df, "max_iter_df", 1, 10_000))
        self.overshoot = float(check_range(overshoot, "overshoot", 0, 1))
        self.sigma = float(check_range(sigma, "sigma", 0, 64, lo_open=True))
        self.amplitude = float(check_range(amplitude, "amplitude", 0, 1, lo_open=True))
        self.stop_fooling_rate = float(check_range(stop_fooling_rate, "stop_fooling_rate", 0, 1, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name or "low_frequency"
        model = context.clean_model
        device = next(model.parameters()).device
        if len(train) < 2:
            raise ParameterError(f"{who} needs at least 2 training images")
        m = min(self.n_images, len(train) // 2)
        pick = rng.permutation(len(train))[:2 * m]
        x = train.subset(pick[:m]).float_tensor(device)
        x_eval = train.subset(pick[m:]).float_tensor(device)
        v, info = low_frequency_trigger(model, x, x_eval, self.target, passes=self.passes, batch_size=self.batch_size,
                                        max_iter_df=self.max_iter_df, overshoot=self.overshoot, sigma=self.sigma,
                                        amplitude=self.amplitude, stop_fooling_rate=self.stop_fooling_rate,
                                        generator=torch_generator(rng))
        trigger = AdditivePatternTrigger(v.permute(1, 2, 0).cpu().numpy().astype(np.float32))
        idx = pick_backdoor(train, self.rate, self.target, rng, who)
        images, labels = stamp(train, idx, trigger, self.target)
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=trigger, extra=info))
