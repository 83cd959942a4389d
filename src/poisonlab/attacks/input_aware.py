"""Input-aware dynamic backdoor: Nguyen and Tran, "Input-Aware Dynamic Backdoor Attack" (NeurIPS 2020)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.attacks._bb_common import (changed_rows, check_target, map_uint8, pick_backdoor, pick_extra, stamp,
                                          torch_generator)
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning, Trigger
from poisonlab.validate import check_range, check_rate
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError

EPS = 1e-7


def _block(cin: int, cout: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class _ToUnit(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) / (2 + EPS) + 0.5


def trigger_generator(in_channels: int, out_channels: int, base: int, depth: int) -> nn.Sequential:
    """The paper's encoder-decoder generator: ``depth`` times (two conv-BN-ReLU, max-pool) with widths
    ``base * 2**d``, a middle block, ``depth`` times (upsample, two conv blocks), output in (0, 1).

    The paper (and BackdoorBench) use base 16 / depth 2 on MNIST and base 32 / depth 3 otherwise.
    """
    widths = [base * 2 ** d for d in range(depth)]
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [_block(c, w), _block(w, w), nn.MaxPool2d(2)]
        c = w
    layers.append(_block(c, c))
    for d in reversed(range(depth)):
        nxt = widths[d - 1] if d > 0 else out_channels
        layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False), _block(c, c),
                   _block(c, nxt, relu=d > 0)]
        c = nxt
    layers.append(_ToUnit())
    return nn.Sequential(*layers)


def sharpen(m: torch.Tensor) -> torch.Tensor:
    """The paper's soft threshold of the mask generator's output: ``tanh(20 m - 10) / 2 + 1/2``."""
    return torch.tanh(m * 20 - 10) / (2 + EPS) + 0.5


def flat_state(net: nn.Module) -> np.ndarray:
    """Every entry of ``net.state_dict()`` (weights and batch-norm statistics) as one float32 vector."""
    return torch.cat([v.detach().float().reshape(-1).cpu() for v in net.state_dict().values()]).numpy()


def load_flat_state(net: nn.Module, flat: np.ndarray) -> nn.Module:
    """Inverse of :func:`flat_state` for a network of the same architecture."""
    state, i = {}, 0
    for k, v in net.state_dict().items():
        n = v.numel()
        state[k] = torch.from_numpy(np.asarray(flat[i:i + n])).reshape(v.shape).to(v.dtype)
        i += n
    if i != len(flat):
        raise ParameterError(f"stored generator has {len(flat)} values, the architecture needs {i}")
    net.load_state_dict(state)
    return net


@dataclass(eq=False)
class InputAwareTrigger(Trigger):
    """The input-aware trigger: ``x + (G(x) - x) * M(x)``, a pattern and a mask made for each image.

    ``pattern_net`` and ``mask_net`` hold the trained generators' weights (see :func:`flat_state`),
    so the trigger is plain arrays in the cache; ``mean`` / ``std`` normalise the generators' input.
    """

    pattern_net: np.ndarray
    mask_net: np.ndarray
    channels: int = 3
    base: int = 32
    depth: int = 3
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)

    def nets(self) -> tuple[nn.Module, nn.Module]:
        """The two generators (built once, eval mode, CPU)."""
        if "_nets" not in self.__dict__:
            g = load_flat_state(trigger_generator(self.channels, self.channels, self.base, self.depth),
                                self.pattern_net)
            m = load_flat_state(trigger_generator(self.channels, 1, self.base, self.depth), self.mask_net)
            self.__dict__["_nets"] = (g.eval(), m.eval())
        return self.__dict__["_nets"]

    def check_fits(self, shape: tuple[int, int, int]) -> None:
        check_generator_shape(shape, self.depth, self.channels)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def apply(self, images: np.ndarray, donors: np.ndarray | None = None) -> np.ndarray:
        """Stamp uint8 NHWC ``images``; with ``donors`` (same shape) the pattern and mask of each donor
        image are used instead of the image's own (the paper's cross-trigger samples)."""
        self.check_fits(images.shape[1:])
        g, m = self.nets()
        if donors is None:
            return map_uint8(images, lambda x: blend(x, g, m, self.normalise(x)))
        both = np.concatenate([images, donors], axis=3)  # one pass over pairs
        c = images.shape[3]
        return map_uint8(both, lambda xd: blend(xd[:, :c], g, m, self.normalise(xd[:, c:])))


def blend(x: torch.Tensor, g: nn.Module, m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``x + (G(z) - x) * sharpen(M(z))``: ``x`` float NCHW in [0, 1], ``z`` the normalised source image."""
    return x + (g(z) - x) * sharpen(m(z))


def check_generator_shape(shape: tuple[int, int, int], depth: int, channels: int | None = None) -> None:
    h, w, c = shape
    if h % 2 ** depth or w % 2 ** depth:
        raise ParameterError(f"input_aware: the generator halves the image {depth} times, so {h}x{w} images do "
                             f"not fit (sides must be multiples of {2 ** depth})")
    if channels is not None and c != channels:
        raise ParameterError(f"input_aware: this trigger was made for {channels}-channel images, got {c}")


def train_generators(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, target: int, *,
                     base: int, depth: int, mean: list, std: list, rate: float, mask_steps: int, steps: int,
                     batch_size: int, lr_generator: float, lr_classifier: float, lambda_div: float,
                     lambda_norm: float, mask_density: float, gen: torch.Generator
                     ) -> tuple[nn.Module, nn.Module, dict[str, float]]:
    """The paper's two-stage training of the pattern generator G and the mask generator M.

    1. ``mask_steps`` Adam steps on M alone: ``lambda_norm * mean(relu(M(x) - mask_density))`` keeps
       masks small, the diversity loss ``|x1 - x2| / |M(x1) - M(x2)|`` keeps them input-specific.
    2. ``steps`` steps on G and the ``classifier`` together (M frozen): in each batch ``rate`` of the
       images carry their own trigger and the target label, as many carry the trigger of another image
       and keep their label (cross-trigger), the rest stay clean; loss = cross-entropy + ``lambda_div``
       x the diversity loss of the patterns. G: Adam, classifier: SGD (momentum 0.9, weight decay 5e-4).

    ``images`` uint8 NCHW, ``labels`` int64, both on the classifier's device. Returns G, M (eval mode)
    and the last losses.
    """
    device = images.device
    c = images.shape[1]
    g = trigger_generator(c, c, base, depth).to(device)
    m = trigger_generator(c, 1, base, depth).to(device)
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    n = len(images)
    bs = min(batch_size, n)

    def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        i = torch.randint(0, n, (bs,), generator=gen).to(device)
        x = images[i].float().div(255)
        return x, (x - mean_t) / std_t, labels[i]

    def diversity(z1: torch.Tensor, z2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
        d_img = (z1 - z2).pow(2).mean((1, 2, 3)).sqrt()
        d_pat = (p1 - p2).pow(2).mean((1, 2, 3)).sqrt()
        return (d_img / (d_pat + EPS)).mean()

    opt_m = torch.optim.Adam(m.parameters(), lr_generator, betas=(0.5, 0.9))
    m.train()
    info: dict[str, float] = {}
    for _ in range(mask_steps):
        _, z1, _ = batch()
        _, z2, _ = batch()
        m1, m2 = sharpen(m(z1)), sharpen(m(z2))
        norm = F.relu(m1 - mask_density).mean()
        loss = lambda_norm * norm + lambda_div * diversity(z1, z2, m1, m2)
        opt_m.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()
        info.update(mask_loss=float(loss.detach()), mask_norm=float(norm.detach()))
    m.eval().requires_grad_(False)

    opt_g = torch.optim.Adam(g.parameters(), lr_generator, betas=(0.5, 0.9))
    opt_c = torch.optim.SGD(classifier.parameters(), lr_classifier, momentum=0.9, weight_decay=5e-4)
    nb = max(1, int(round(rate * bs)))
    nb = min(nb, bs // 2)
    for _ in range(steps):
        g.train()
        classifier.train()
        x1, z1, y1 = batch()
        x2, z2, _ = batch()
        p1 = g(z1[:nb])
        x_bd = x1[:nb] + (p1 - x1[:nb]) * sharpen(m(z1[:nb]))
        p2 = g(z2[nb:2 * nb])
        x_cross = x1[nb:2 * nb] + (p2 - x1[nb:2 * nb]) * sharpen(m(z2[nb:2 * nb]))
        x = torch.cat([x_bd, x_cross, x1[2 * nb:]])
        y = torch.cat([torch.full((nb,), target, device=device, dtype=y1.dtype), y1[nb:]])
        ce = F.cross_entropy(classifier(x), y)
        div = diversity(z1[:nb], z2[nb:2 * nb], p1, p2)
        loss = ce + lambda_div * div
        opt_g.zero_grad(set_to_none=True)
        opt_c.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        opt_c.step()
        info.update(ce=float(ce.detach()), diversity=float(div.detach()))
    return g.eval(), m, info


@ATTACKS.register("input_aware")
class InputAware(Attack):
    """Input-aware dynamic backdoor (dirty label, all-to-one), Nguyen and Tran (NeurIPS 2020).

    Every image gets its own trigger ``x + (G(x) - x) * M(x)`` from two trained generators: M draws a
    small mask, G a pattern (:func:`trigger_generator`, :func:`train_generators`). The generators are
    trained with a surrogate classifier: a copy of ``context.clean_model`` (the run's model trained on
    the clean training set), fine-tuned jointly with G on batches mixing triggered (target label),
    cross-triggered (another image's trigger, true label) and clean images. Then ``rate`` of the
    training set (non-target classes) gets its own trigger and the target label, and ``cross_ratio``
    x ``rate`` more (any class) gets a random other image's trigger and keeps its label. The trigger
    (:class:`InputAwareTrigger`) holds both generators, so it stamps any test image; it is plain
    arrays, so the poisoned set is cached like any other. ``extra["generator_seconds"]`` is the
    training time.

    Budget: ``mask_steps`` and ``steps`` optimiser steps of ``batch_size`` images. The paper and
    BackdoorBench train M for 25 epochs and then G with the VICTIM itself for the whole training
    run (100 epochs in BackdoorBench, whose batches are re-triggered every step); on a CPU the
    defaults (200 + 300 steps of 128) take minutes. Other settings are the paper's / BackdoorBench's:
    lr 0.01 (Adam betas 0.5/0.9 for G and M, SGD for the classifier), lambda_div 1, lambda_norm 100,
    mask density 0.032, 10%, cross ratio 1.

    Args:
        rate: share of the WHOLE training set poisoned, (0, 1].
        target: class the trigger maps to.
        cross_ratio: cross-trigger samples per poisoned sample in the poisoned set, [0, 10].
        mask_steps: mask-generator steps, [0, 1000000]; steps: joint steps, [1, 1000000].
        batch_size: images per step.
        lr_generator, lr_classifier: learning rates, (0, 10].
        lambda_div, lambda_norm: weights of the diversity and mask-size losses, [0, 1e4].
        mask_density: mask share left free of the size penalty, (0, 1].
        base, depth: generator widths (``base * 2**d``) and down-sampling steps; None picks the paper's
            (16 and 2 below 32 pixels, 32 and 3 from 32 up).
    """

    family = "backdoor"
    needs_clean_model = True

    def __init__(self, rate: float = 0.1, target: int = 0, cross_ratio: float = 1.0, mask_steps: int = 200,
                 steps: int = 300, batch_size: int = 128, lr_generator: float = 0.01, lr_classifier: float = 0.01,
                 lambda_div: float = 1.0, lambda_norm: float = 100.0, mask_density: float = 0.032,
                 base: int | None = None, depth: int | None = None):
        self.rate = check_rate(rate)
        self.target = check_target(target)
        self.cross_ratio = float(check_range(cross_ratio, "cross_ratio", 0, 10))
        self.mask_steps = int(check_range(mask_steps, "mask_steps", 0, 1_000_000))
        self.steps = int(check_range(steps, "steps", 1, 1_000_000))
        self.batch_size = int(check_range(batch_size, "batch_size", 2, 65_536))
        self.lr_generator = float(check_range(lr_generator, "lr_generator", 0, 10, lo_open=True))
        self.lr_classifier = float(check_range(lr_classifier, "lr_classifier", 0, 10, lo_open=True))
        self.lambda_div = float(check_range(lambda_div, "lambda_div", 0, 1e4))
        self.lambda_norm = float(check_range(lambda_norm, "lambda_norm", 0, 1e4))
        self.mask_density = float(check_range(mask_density, "mask_density", 0, 1, lo_open=True))
        self.base = None if base is None else int(check_range(base, "base", 1, 1024))
        self.depth = None if depth is None else int(check_range(depth, "depth", 1, 6))

    def architecture(self, shape: tuple[int, int, int]) -> tuple[int, int]:
        """``(base, depth)`` of the generators for images of ``shape``."""
        small = min(shape[:2]) < 32
        return (self.base or (16 if small else 32)), (self.depth or (2 if small else 3))

    def check(self, train: ImageSet) -> None:
        super().check(train)
        check_generator_shape(train.shape, self.architecture(train.shape)[1])
        n = len(train)
        need = int(round(self.rate * n)) + int(round(self.cross_ratio * self.rate * n))
        if need > n:
            raise ParameterError(f"input_aware: rate={self.rate} with cross_ratio={self.cross_ratio} needs {need} "
                                 f"samples, more than the {n} in the set")

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name or "input_aware"
        device = next(context.clean_model.parameters()).device
        base, depth = self.architecture(train.shape)
        mean, std = train.channel_stats()
        gen = torch_generator(rng)
        x, y = train.tensors(device)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 62)))  # the generators' initial weights
            classifier = copy.deepcopy(context.clean_model)
            g, m, losses = train_generators(
                classifier, x, y, self.target, base=base, depth=depth, mean=mean, std=std, rate=self.rate,
                mask_steps=self.mask_steps, steps=self.steps, batch_size=self.batch_size,
                lr_generator=self.lr_generator, lr_classifier=self.lr_classifier, lambda_div=self.lambda_div,
                lambda_norm=self.lambda_norm, mask_density=self.mask_density, gen=gen)
        seconds = time.perf_counter() - t0
        trigger = InputAwareTrigger(flat_state(g), flat_state(m), train.shape[2], base, depth, mean, std)
        bd = pick_backdoor(train, self.rate, self.target, rng, who)
        cross = pick_extra(len(train), bd, self.cross_ratio, self.rate, rng, who, "cross_ratio")
        images, labels = stamp(train, bd, trigger, self.target)
        if len(cross):
            donors = rng.integers(0, len(train), size=len(cross))
            images[cross] = trigger.apply(train.images[cross], donors=train.images[donors])
            cross = cross[changed_rows(images[cross], train.images[cross])]
        idx = np.union1d(bd, cross)
        extra: dict[str, Any] = {"n_backdoor": int(len(bd)), "n_cross": int(len(cross)),
                                 "generator_seconds": seconds, "base": base, "depth": depth, **losses}
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=trigger, extra=extra))
