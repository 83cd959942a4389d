"""Gradient matching (Geiping et al., "Witches' Brew: Industrial Scale Data
Poisoning via Gradient Matching", ICLR 2021): clean-label, targeted."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.attacks._perturb import apply_delta, changed, model_device, targets_from_context, to_nchw_float
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.training.augment import augment_batch
from poisonlab.validate import check_class, check_range, check_target_pair


def _flat_grad_params(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def alignment_loss(poison_grad: Sequence[torch.Tensor], target_grad: Sequence[torch.Tensor],
                   target_norm: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between two parameter gradients (lists of tensors), over all parameters at once."""
    dot = sum((pg * tg).sum() for pg, tg in zip(poison_grad, target_grad))
    pnorm = torch.sqrt(sum(pg.pow(2).sum() for pg in poison_grad) + 1e-20)
    return 1 - dot / (pnorm * target_norm)


@ATTACKS.register("gradient_matching")
class GradientMatching(Attack):
    """Witches' Brew: perturb a few adversarial-class training images (labels kept)
    so that training on them pushes the model to classify target test image(s)
    as the adversarial class.

    On the clean surrogate ``f`` (``context.clean_model``, eval mode) the target
    gradient ``g_t = grad_theta CE(f(x_t), y_adv)`` is computed once (mean over
    the targets). The poisons' perturbations ``delta`` (L-inf ``epsilon``) are
    optimised by signed gradient descent to minimise ``1 - cos(grad_theta
    CE(f(aug(x_p + delta)), y_p), g_t)`` -- the poisons' training gradient, with
    their true labels, points where the target's adversarial gradient points.
    ``aug`` is a differentiable random crop-shift (``shift`` pixels, reflect
    padding) and horizontal flip done with tensor ops, so that the poison
    survives the victim's augmentation. Poisons are optimised in batches of
    ``batch_size`` (each batch's gradient matched separately, as in the paper's
    poison batches). ``restarts`` independent random starts are run and the one
    with the lowest final loss kept. The step size decays by 10x at 3/8, 5/8 and
    7/8 of the steps (the paper's schedule).

    Targets: ``target_index`` (one test index or a list of one class), or
    ``n_targets`` correctly classified test images of ``target_class`` drawn at
    random (random class if None). ``adversarial_class`` defaults to a random
    other class. Several targets in one poisoning share one set of poisons
    (matched to the mean target gradient); to measure success over several
    targets the benchmark instead runs one poisoning per target (the paper's
    protocol), see ``benchmarks/attack_generation.py``.

    Paper defaults vs ours: budget 1% and epsilon 16/255 as in the paper and the
    issue; the paper runs 240 signed-Adam steps with 8 restarts on a GPU; on a
    2-core CPU we default to 30 signed-gradient steps and 1 restart so that the
    CIFAR-10 default (500 poisons) finishes within the issue's 10 minutes; raise
    ``steps``/``restarts`` where time allows.

    Args:
        budget: fraction of the training set poisoned (all from the adversarial class), (0, 1].
        epsilon: L-inf budget in pixel units, [0, 1] (default 16/255).
        target_index: test index (or list) of the target(s).
        target_class: class of automatically chosen targets.
        adversarial_class: the class the targets should be given.
        n_targets: number of automatically chosen targets.
        steps: optimisation steps per restart.
        restarts: random restarts.
        step_size: initial signed step in pixel units (default epsilon / 4).
        shift: augmentation shift in pixels (0 disables; default 2 for images >= 16 px, else 1).
        flip: augmentation horizontal flips.
        batch_size: poisons per optimisation batch.

    The record has ``target_indices`` and ``adversarial_labels`` (the metrics
    then report ``target_success``); ``extra`` holds the alignment (cosine
    similarity, averaged over poison batches) at the first and last step.
    """

    family = "targeted"
    needs_clean_model = True

    def __init__(self, budget: float = 0.01, epsilon: float = 16 / 255, target_index: int | list[int] | None = None,
                 target_class: int | None = None, adversarial_class: int | None = None, n_targets: int = 1,
                 steps: int = 30, restarts: int = 1, step_size: float | None = None, shift: int | None = None,
                 flip: bool = True, batch_size: int = 256):
        self.budget = float(check_range(budget, "budget", 0, 1, lo_open=True))
        self.epsilon = float(check_range(epsilon, "epsilon", 0, 1, lo_open=True))
        self.target_index = target_index
        self.target_class, self.adversarial_class = check_target_pair(target_class, adversarial_class)
        self.n_targets = int(check_range(n_targets, "n_targets", 1, 10**6))
        self.steps = int(check_range(steps, "steps", 1, 100_000))
        self.restarts = int(check_range(restarts, "restarts", 1, 1000))
        self.step_size = float(check_range(self.epsilon / 4 if step_size is None else step_size,
                                           "step_size", 0, 1, lo_open=True))
        self.shift = None if shift is None else int(check_range(shift, "shift", 0, 16))
        self.flip = bool(flip)
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))

    def check(self, train: ImageSet) -> None:
        who = self.registry_name
        check_class(self.target_class, "target_class", train.num_classes, who)
        check_class(self.adversarial_class, "adversarial_class", train.num_classes, who)
        k = self._n_poisons(len(train))
        if self.adversarial_class is not None:
            have = int((train.labels == self.adversarial_class).sum())
            if k > have:
                raise ParameterError(f"{who}: budget={self.budget} asks for {k} poisons but adversarial_class="
                                     f"{self.adversarial_class} has only {have} training images")

    def _n_poisons(self, n: int) -> int:
        k = int(round(self.budget * n))
        if k < 1:
            raise ParameterError(f"{self.registry_name}: budget={self.budget} leaves fewer than one poisoned sample "
                                 f"among {n} (raise budget)")
        return k

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name
        model, ti, tc, ac = targets_from_context(self, context, rng, self.n_targets)
        k = self._n_poisons(len(train))
        pool = np.nonzero(train.labels == ac)[0]
        if k > len(pool):
            raise ParameterError(f"{who}: budget={self.budget} asks for {k} poisons but class {ac} has only "
                                 f"{len(pool)} training images")
        idx = np.sort(rng.choice(pool, size=k, replace=False))
        torch_seed = int(rng.integers(2**31))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            delta, info = self._brew(model, train.images[idx], ac, context.test.images[ti], torch_seed)
        images = train.images.copy()
        images[idx] = apply_delta(train.images[idx], delta, self.epsilon)
        idx = idx[changed(images[idx], train.images[idx])]
        info.update(target_class=tc, adversarial_class=ac)
        return (train.with_data(images=images),
                self._record(idx, train.labels[idx], target_indices=ti, adversarial_labels=np.full(len(ti), ac),
                             extra=info))

    def _brew(self, model: nn.Module, poisons: np.ndarray, adv: int, targets: np.ndarray,
              seed: int) -> tuple[torch.Tensor, dict]:
        """Optimise the perturbations; returns (N, C, H, W) on the CPU and a summary."""
        model.eval()
        dev = model_device(model)
        params = _flat_grad_params(model)
        xt = to_nchw_float(targets, dev)
        yt = torch.full((len(xt),), adv, device=dev)
        tgrad = [g.detach() for g in torch.autograd.grad(F.cross_entropy(model(xt), yt), params)]
        tnorm = torch.sqrt(sum(g.pow(2).sum() for g in tgrad))
        x0 = to_nchw_float(poisons, dev)
        y0 = torch.full((len(x0),), adv, device=dev)
        h = x0.shape[-1]
        shift = self.shift if self.shift is not None else (2 if h >= 16 else 1)
        gen = torch.Generator().manual_seed(seed)
        eps = self.epsilon
        milestones = {int(self.steps * f) for f in (3 / 8, 5 / 8, 7 / 8)}
        best, best_loss, runs = None, float("inf"), []
        for _ in range(self.restarts):
            delta = (torch.rand(x0.shape, generator=gen) * 2 - 1).mul_(eps).to(dev)
            delta = (x0 + delta).clamp(0, 1) - x0
            step, curve = self.step_size, []
            for s in range(self.steps):
                if s in milestones:
                    step /= 10
                losses = []
                for i in range(0, len(x0), self.batch_size):
                    sl = slice(i, i + self.batch_size)
                    d = delta[sl].clone().requires_grad_(True)
                    x = augment_batch(x0[sl] + d, shift, self.flip, gen=gen)
                    pgrad = torch.autograd.grad(F.cross_entropy(model(x), y0[sl]), params, create_graph=True)
                    loss = alignment_loss(pgrad, tgrad, tnorm)
                    (g,) = torch.autograd.grad(loss, d)
                    with torch.no_grad():
                        nd = (delta[sl] - step * g.sign()).clamp(-eps, eps)
                        delta[sl] = (x0[sl] + nd).clamp(0, 1) - x0[sl]
                    losses.append(float(loss.detach()) * (min(i + self.batch_size, len(x0)) - i))
                curve.append(1 - sum(losses) / len(x0))
            final = self._loss(model, params, x0, y0, delta, tgrad, tnorm)
            runs.append({"alignment_per_step": [round(c, 4) for c in curve], "final_alignment": 1 - final})
            if final < best_loss:
                best, best_loss = delta.detach().clone(), final
        chosen = min(range(len(runs)), key=lambda r: -runs[r]["final_alignment"])
        info = {"alignment_first": runs[chosen]["alignment_per_step"][0],
                "alignment_last": runs[chosen]["alignment_per_step"][-1],
                "final_alignment": runs[chosen]["final_alignment"], "restart_chosen": chosen,
                "alignment_per_step": runs[chosen]["alignment_per_step"]}
        return best.cpu(), info

    def _loss(self, model, params, x0, y0, delta, tgrad, tnorm) -> float:
        """Alignment loss of the current poisons without augmentation, averaged over batches."""
        tot = 0.0
        for i in range(0, len(x0), self.batch_size):
            sl = slice(i, i + self.batch_size)
            pgrad = torch.autograd.grad(F.cross_entropy(model(x0[sl] + delta[sl]), y0[sl]), params)
            tot += float(alignment_loss(pgrad, tgrad, tnorm)) * len(x0[sl])
        return tot / len(x0)
