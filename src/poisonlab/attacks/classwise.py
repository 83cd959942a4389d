"""Class-wise clean-label perturbations: a fixed random pattern per class, and
error-minimizing ("unlearnable") noise (Huang et al., "Unlearnable Examples:
Making Personal Data Unexploitable", ICLR 2021).

Both add one small pattern per class (or, for sample-wise error-minimizing
noise, one per image) to training images and keep every label. A network
trained on such data can latch on to the pattern instead of the image content:
its training accuracy rises while its test accuracy falls (the CIFAR-10
study's clean-label attack: validation accuracy 82% -> 67%).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from poisonlab.attacks._perturb import apply_delta, changed, to_nchw_float
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError
from poisonlab.validate import check_choice, check_class, check_range, check_rate


def _class_pool(train: ImageSet, classes: list[int] | None) -> np.ndarray:
    if classes is None:
        return np.arange(len(train))
    return np.nonzero(np.isin(train.labels, classes))[0]


def _choose_per_class(labels: np.ndarray, pool: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """``rate`` of every class's samples in ``pool`` (at least one per class present), sorted."""
    if rate >= 1.0:
        return np.sort(pool)
    chosen = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        k = max(1, int(round(rate * len(members))))
        chosen.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


class _ClassWise(Attack):
    family = "clean-label"
    rate: float
    classes: list[int] | None

    def _check_classes(self, train: ImageSet) -> None:
        for c in self.classes or []:
            check_class(c, "classes", train.num_classes, self.registry_name)

    def _pool_size(self, train: ImageSet) -> int:
        return len(_class_pool(train, self.classes))


@ATTACKS.register("classwise_random")
class ClassWiseRandom(_ClassWise):
    """One fixed random pattern per class, added to that class's training images; labels unchanged.

    The clean-label attack of the CIFAR-10 study (validation accuracy 82% ->
    67% while training accuracy rose); it is also the "random noise" baseline
    of Huang et al. (2021). Each class ``c`` gets a pattern ``delta_c`` of the
    image's shape, drawn once from ``rng``: uniform in ``[-epsilon, epsilon]``
    (``pattern="uniform"``, Huang et al.'s baseline) or ``+-epsilon`` with random
    signs (``pattern="sign"``, the strongest pattern within the budget). The
    pattern is rounded to whole grey levels, so ``|poisoned - clean| <=
    epsilon`` holds exactly on uint8 images.

    Args:
        epsilon: L-inf budget in pixel units, [0, 1] (default 8/255).
        rate: fraction of each (chosen) class's images perturbed, (0, 1]; default all.
        classes: classes to perturb (default: every class).
        pattern: ``uniform`` or ``sign``.

    The record's ``indices`` are the images that actually changed (an image
    already saturated where its pattern pushes is left as it is);
    ``extra["patterns"]`` holds the integer patterns (K, H, W, C) in grey levels.
    """

    def __init__(self, epsilon: float = 8 / 255, rate: float = 1.0, classes: list[int] | None = None,
                 pattern: str = "uniform"):
        self.epsilon = float(check_range(epsilon, "epsilon", 0, 1, lo_open=True))
        self.rate = check_rate(rate)
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and not self.classes:
            raise ParameterError("classes must name at least one class (or be left out for all)")
        self.pattern = check_choice(pattern, "pattern", ("uniform", "sign"))

    def check(self, train: ImageSet) -> None:
        self._check_classes(train)
        super().check(train)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        shape = (train.num_classes, *train.shape)
        if self.pattern == "uniform":
            patterns = rng.uniform(-self.epsilon, self.epsilon, size=shape).astype(np.float32)
        else:
            patterns = (rng.choice([-1.0, 1.0], size=shape) * self.epsilon).astype(np.float32)
        idx = _choose_per_class(train.labels, _class_pool(train, self.classes), self.rate, rng)
        images = train.images.copy()
        images[idx] = apply_delta(train.images[idx], patterns[train.labels[idx]], self.epsilon)
        idx = idx[changed(images[idx], train.images[idx])]
        levels = np.clip(np.rint(patterns * 255), -math.floor(self.epsilon * 255 + 1e-6),
                         math.floor(self.epsilon * 255 + 1e-6)).astype(int)
        return (train.with_data(images=images),
                self._record(idx, train.labels[idx], extra={"patterns": levels.tolist()}))


@ATTACKS.register("error_minimizing")
class ErrorMinimizing(_ClassWise):
    """Error-minimizing noise (Huang et al. 2021, "Unlearnable Examples"), class-wise or sample-wise.

    Min-min bi-level optimisation against a surrogate trained on the fly:
    repeat {``train_steps`` SGD steps of the surrogate on the perturbed data;
    ``noise_steps`` signed-gradient (PGD) steps that *lower* the surrogate's loss
    on the perturbed data, projected onto the L-inf ball} until the surrogate's
    accuracy on the perturbed data reaches ``stop_accuracy`` or ``max_rounds``
    rounds have run. The noise is then added to the training images; labels
    are unchanged. Everything is batched; the surrogate is built from the model
    registry (default ``fastnet``) and never leaves the attack.

    Class-wise (``mode="classwise"``): one pattern per class; each noise step
    takes a fresh batch of the optimisation set and moves every class's pattern
    by the sign of its gradient summed over that class's images in the batch.
    The optimisation uses ``opt_samples`` images (a stratified subset; all if
    fewer) and the resulting patterns are added to ``rate`` of every class's
    images (all by default) -- the patterns do not depend on the rest.
    Sample-wise (``mode="samplewise"``): one perturbation per poisoned image;
    each round runs ``noise_steps`` PGD steps on every poisoned image, batch by
    batch, as in the paper (much more expensive: ``noise_steps`` forward-backward
    passes over the poisoned set per round).

    Paper defaults vs ours: the paper uses a ResNet-18 surrogate, SGD lr 0.1,
    M=10 model steps per round, 20 PGD steps of 0.8/255 within 8/255, and stops
    when the training accuracy on perturbed data exceeds 99%, optimising on the
    whole training set. We keep epsilon 8/255, M=10, lr 0.1, step epsilon/10 and
    the 99% stop, but default to a narrow fastnet (widths 32-64-128), 10 noise
    steps per round, batches of 128, at most 30 rounds and 5,000 optimisation
    images so that CIFAR-10 finishes within 10 minutes on a 2-core CPU (see
    docs/attacks_optimisation.md).

    Args:
        epsilon: L-inf budget in pixel units, [0, 1] (default 8/255).
        mode: ``classwise`` or ``samplewise``.
        rate: fraction of each (chosen) class's images perturbed, (0, 1].
        classes: classes to perturb (default: every class).
        step_size: PGD step in pixel units (default epsilon / 10).
        train_steps: surrogate SGD steps per round (paper: 10).
        noise_steps: noise steps per round (paper: 20).
        max_rounds: upper bound on rounds.
        stop_accuracy: stop once the surrogate's accuracy on perturbed data reaches it (paper: 0.99).
        batch_size: batch size of both steps.
        lr: surrogate SGD learning rate (momentum 0.9, weight decay 5e-4).
        opt_samples: class-wise only: images used to optimise the patterns.
        model: surrogate architecture (model registry name).
        model_params: extra arguments of the surrogate (default fastnet widths 32-64-128).

    ``extra`` records the rounds run, the surrogate's final accuracy on perturbed
    data and whether the stop criterion was met.
    """

    def __init__(self, epsilon: float = 8 / 255, mode: str = "classwise", rate: float = 1.0,
                 classes: list[int] | None = None, step_size: float | None = None, train_steps: int = 10,
                 noise_steps: int = 10, max_rounds: int = 30, stop_accuracy: float = 0.99, batch_size: int = 128,
                 lr: float = 0.1, opt_samples: int = 5000, model: str = "fastnet",
                 model_params: dict[str, Any] | None = None):
        self.epsilon = float(check_range(epsilon, "epsilon", 0, 1, lo_open=True))
        self.mode = check_choice(mode, "mode", ("classwise", "samplewise"))
        self.rate = check_rate(rate)
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and not self.classes:
            raise ParameterError("classes must name at least one class (or be left out for all)")
        self.step_size = float(check_range(self.epsilon / 10 if step_size is None else step_size,
                                           "step_size", 0, 1, lo_open=True))
        self.train_steps = int(check_range(train_steps, "train_steps", 0, 100_000))
        self.noise_steps = int(check_range(noise_steps, "noise_steps", 1, 100_000))
        self.max_rounds = int(check_range(max_rounds, "max_rounds", 1, 100_000))
        self.stop_accuracy = float(check_range(stop_accuracy, "stop_accuracy", 0, 1))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.lr = float(check_range(lr, "lr", 0, 100, lo_open=True))
        self.opt_samples = int(check_range(opt_samples, "opt_samples", 1, 10**9))
        self.model = model
        if model_params is None and model == "fastnet":
            model_params = {"widths": [32, 64, 128]}
        self.model_params = dict(model_params or {})

    def check(self, train: ImageSet) -> None:
        from poisonlab.models import MODELS

        self._check_classes(train)
        if self.model not in MODELS:
            raise ParameterError(f"{self.registry_name}: model={self.model!r} is not a registered model "
                                 f"({', '.join(MODELS.names())})")
        super().check(train)

    def _surrogate(self, train: ImageSet, device: str):
        from poisonlab.models import build_model_for

        return build_model_for(self.model, train, **self.model_params).to(device)

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        idx = _choose_per_class(train.labels, _class_pool(train, self.classes), self.rate, rng)
        if self.mode == "classwise":
            opt_idx = idx if len(idx) <= self.opt_samples else np.sort(rng.choice(idx, self.opt_samples, replace=False))
        else:
            opt_idx = idx
        torch_seed = int(rng.integers(2**31))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            delta, info = self._optimise(train, opt_idx, context.device, torch_seed)
        if self.mode == "classwise":
            d = delta[torch.from_numpy(train.labels[idx])]
        else:
            d = delta
        images = train.images.copy()
        images[idx] = apply_delta(train.images[idx], d, self.epsilon)
        idx = idx[changed(images[idx], train.images[idx])]
        return train.with_data(images=images), self._record(idx, train.labels[idx], extra=info)

    def _optimise(self, train: ImageSet, opt_idx: np.ndarray, device: str, seed: int) -> tuple[torch.Tensor, dict]:
        """Min-min optimisation; returns the noise (K or len(opt_idx), C, H, W) on the CPU and a summary.

        Each round trains the surrogate ``train_steps`` steps on perturbed images, then lowers its loss
        further by moving the noise ``noise_steps`` signed-gradient steps (within ``epsilon``), until the
        surrogate's accuracy on perturbed images reaches ``stop_accuracy`` or ``max_rounds`` pass.
        """
        gen = torch.Generator().manual_seed(seed)
        x0 = to_nchw_float(train.images[opt_idx], device)
        y = torch.from_numpy(train.labels[opt_idx]).to(device)
        n = len(opt_idx)
        classwise = self.mode == "classwise"
        delta = torch.zeros((train.num_classes if classwise else n, *x0.shape[1:]), device=device)
        model = self._surrogate(train, device)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        batches = _Batches(n, min(self.batch_size, n), gen, device)
        noise_of = (lambda b: y[b]) if classwise else (lambda b: b)  # whose noise an image gets
        eval_idx = torch.randperm(n, generator=gen)[:min(n, 2048)].to(device)
        acc, rounds, history = 0.0, 0, []
        for rounds in range(1, self.max_rounds + 1):
            model.train()
            for _ in range(self.train_steps):
                b = batches.next()
                loss = F.cross_entropy(model((x0[b] + delta[noise_of(b)]).clamp(0, 1)), y[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            if classwise:
                delta = self._classwise_noise_steps(model, x0, y, delta, batches)
            else:
                self._samplewise_noise_steps(model, x0, y, delta, batches.bs)
            acc = _perturbed_accuracy(model, x0, y, delta, noise_of, eval_idx)
            history.append(round(acc, 4))
            if acc >= self.stop_accuracy:
                break
        info = {"rounds": rounds, "surrogate_acc_on_perturbed": acc, "stopped": acc >= self.stop_accuracy,
                "acc_per_round": history, "opt_samples": n}
        return delta.detach().cpu(), info

    def _classwise_noise_steps(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                               batches: "_Batches") -> torch.Tensor:
        """``noise_steps`` signed-gradient steps on the per-class noise, one mini-batch each."""
        for _ in range(self.noise_steps):
            b = batches.next()
            d = delta.clone().requires_grad_(True)
            loss = F.cross_entropy(model((x0[b] + d[y[b]]).clamp(0, 1)), y[b])
            (g,) = torch.autograd.grad(loss, d)
            delta = (delta - self.step_size * g.sign()).clamp(-self.epsilon, self.epsilon)
        return delta

    def _samplewise_noise_steps(self, model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                                bs: int) -> None:
        """``noise_steps`` signed-gradient steps on every image's own noise, batch by batch, in place."""
        n = len(x0)
        for i in range(0, n, bs):
            b = torch.arange(i, min(i + bs, n), device=x0.device)
            d = delta[b]
            for _ in range(self.noise_steps):
                d = d.detach().requires_grad_(True)
                loss = F.cross_entropy(model((x0[b] + d).clamp(0, 1)), y[b])
                (g,) = torch.autograd.grad(loss, d)
                d = (d - self.step_size * g.sign()).clamp(-self.epsilon, self.epsilon)
            delta[b] = d.detach()


class _Batches:
    """Endless shuffled mini-batches of ``range(n)``: a new permutation when the next batch would run past the end."""

    def __init__(self, n: int, bs: int, gen: torch.Generator, device: str | torch.device):
        self.n, self.bs, self.gen, self.device = n, bs, gen, device
        self.order, self.pos = torch.randperm(n, generator=gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.bs > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        b = self.order[self.pos:self.pos + self.bs].to(self.device)
        self.pos += self.bs
        return b


@torch.no_grad()
def _perturbed_accuracy(model: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                        noise_of: Any, eval_idx: torch.Tensor) -> float:
    """The surrogate's accuracy on the perturbed images ``eval_idx`` (in chunks of 512)."""
    correct = 0
    for i in range(0, len(eval_idx), 512):
        b = eval_idx[i:i + 512]
        correct += int((model((x0[b] + delta[noise_of(b)]).clamp(0, 1)).argmax(1) == y[b]).sum())
    return correct / len(eval_idx)
