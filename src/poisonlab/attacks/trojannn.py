"""TrojanNN: Liu, Ma, Aafer, Lee, Zhai, Wang and Zhang, "Trojaning Attack on Neural Networks" (NDSS 2018)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from poisonlab.attacks._bb_common import AdditivePatternTrigger, check_target, pick_backdoor, stamp
from poisonlab.attacks.badnets import CORNERS
from poisonlab.attacks.base import ATTACKS, Attack, AttackContext, Poisoning
from poisonlab.validate import check_choice, check_range, check_rate
from poisonlab.data.imageset import ImageSet
from poisonlab.errors import ParameterError


def head_linear(model: nn.Module, who: str = "trojannn") -> nn.Linear:
    """The first linear layer of ``model.head``: its inputs are the penultimate neurons (``model.features``)."""
    head = getattr(model, "head", None)
    layers = [m for m in head.modules() if isinstance(m, nn.Linear)] if isinstance(head, nn.Module) else []
    if not layers or not hasattr(model, "features"):
        raise ParameterError(f"{who} needs a classifier with features() and a linear head (every registry model "
                             f"has them); got {type(model).__name__}")
    return layers[0]


def most_connected_neurons(layer: nn.Linear, k: int) -> np.ndarray:
    """Indices of the ``k`` inputs of ``layer`` with the largest summed absolute outgoing weight (TrojanNN)."""
    strength = layer.weight.detach().abs().sum(0)
    return torch.argsort(strength, descending=True)[:k].cpu().numpy()


def excite_neurons(model: nn.Module, mask: torch.Tensor, init: torch.Tensor, neurons: np.ndarray, value: float,
                   steps: int = 1000, step_size: float = 0.1, eps: float = 0.3, tolerance: float = 1e-3
                   ) -> torch.Tensor:
    """Optimise the trigger pixels so that ``neurons`` of the penultimate layer reach ``value`` (TrojanNN).

    The input is the trigger alone, ``mask * t`` on a black image (float ``(1, C, H, W)``), as in
    BackdoorBench's port. Signed-gradient steps of ``step_size`` on ``sum_i (a_i - value)^2``,
    ``t`` kept in [0, 1] and within ``eps`` of ``init``; stops when the cost drops below ``tolerance``.

    Returns:
        ``mask * t``, float ``(1, C, H, W)``.
    """
    model.eval()
    idx = torch.as_tensor(neurons, device=init.device)
    t = init.clone()
    for _ in range(steps):
        t.requires_grad_(True)
        acts = model.features(t * mask)
        cost = ((acts[:, idx] - value) ** 2).sum()
        (g,) = torch.autograd.grad(cost, t)
        with torch.no_grad():
            t = (init + (t - g.sign() * step_size - init).clamp(-eps, eps)).clamp(0, 1)
        if float(cost.detach()) < tolerance:
            break
    return (t * mask).detach()


def corner_mask(shape: tuple[int, int, int], size: int, corner: str) -> torch.Tensor:
    """``(1, C, H, W)`` 0/1 mask of a ``size`` x ``size`` square in ``corner``."""
    h, w, c = shape
    m = torch.zeros(1, c, h, w)
    rows = slice(h - size, h) if corner.startswith("bottom") else slice(0, size)
    cols = slice(w - size, w) if corner.endswith("right") else slice(0, size)
    m[:, :, rows, cols] = 1.0
    return m


@ATTACKS.register("trojannn")
class TrojanNN(Attack):
    """TrojanNN trigger (dirty label, all-to-one), Liu et al. (NDSS 2018), as BackdoorBench runs it.

    Model: ``context.clean_model``, the run's model trained on the clean training set (BackdoorBench
    also starts from a clean pre-trained model). The ``num_neurons`` penultimate neurons (inputs of the
    linear head) with the largest summed absolute outgoing weight are chosen, and the pixels of a
    ``size`` x ``size`` square trigger in ``corner`` are optimised so that, on a black image, those
    neurons reach ``neuron_value`` (:func:`excite_neurons`: up to ``steps`` signed-gradient steps).
    The trigger is then ADDED to ``rate`` of the training set (non-target classes), which are
    relabelled ``target``; the same addition is the test-time trigger.

    As in BackdoorBench, the victim is trained on this poisoned data; the paper instead retrains the
    trojaned model's later layers on reverse-engineered images, which needs no training data. The
    paper's masks are a square, a logo or a watermark; BackdoorBench uses an apple logo image, we use
    a square so that no image is shipped. Defaults follow BackdoorBench's PreAct-ResNet18 config:
    2 neurons, target value 100, 1000 steps of 0.1 within 0.3 of the start, 10%.

    Args:
        rate: share of the WHOLE training set poisoned, (0, 1].
        target: class the trigger maps to.
        size: side of the square trigger in pixels (must fit in the image).
        corner: one of bottom-right, bottom-left, top-right, top-left.
        num_neurons: neurons to excite, [1, 4096].
        neuron_value: activation they are pushed to.
        steps: optimisation steps, [1, 100000]; step_size, eps: signed step and box radius, (0, 1].
        init: starting value of the trigger pixels, [0, 1].
    """

    family = "backdoor"
    needs_clean_model = True

    def __init__(self, rate: float = 0.1, target: int = 0, size: int = 5, corner: str = "bottom-right",
                 num_neurons: int = 2, neuron_value: float = 100.0, steps: int = 1000, step_size: float = 0.1,
                 eps: float = 0.3, init: float = 0.5):
        self.rate = check_rate(rate)
        self.target = check_target(target)
        self.size = int(check_range(size, "size", 1, 4096))
        self.corner = check_choice(corner, "corner", CORNERS)
        self.num_neurons = int(check_range(num_neurons, "num_neurons", 1, 4096))
        self.neuron_value = float(check_range(neuron_value, "neuron_value", -1e6, 1e6))
        self.steps = int(check_range(steps, "steps", 1, 100_000))
        self.step_size = float(check_range(step_size, "step_size", 0, 1, lo_open=True))
        self.eps = float(check_range(eps, "eps", 0, 1, lo_open=True))
        self.init = float(check_range(init, "init", 0, 1))

    def check(self, train: ImageSet) -> None:
        super().check(train)
        h, w, _ = train.shape
        if self.size > min(h, w):
            raise ParameterError(f"trojannn: trigger size={self.size} does not fit in {h}x{w} images")

    def _poison(self, train: ImageSet, rng: np.random.Generator, context: AttackContext) -> tuple[ImageSet, Poisoning]:
        who = self.registry_name or "trojannn"
        model = context.clean_model
        layer = head_linear(model, who)
        if self.num_neurons > layer.in_features:
            raise ParameterError(f"{who}: num_neurons={self.num_neurons} but the model has only "
                                 f"{layer.in_features} penultimate neurons")
        device = next(model.parameters()).device
        neurons = most_connected_neurons(layer, self.num_neurons)
        mask = corner_mask(train.shape, self.size, self.corner).to(device)
        init = torch.full_like(mask, self.init)
        pattern = excite_neurons(model, mask, init, neurons, self.neuron_value, self.steps, self.step_size,
                                 self.eps)
        with torch.no_grad():
            reached = model.features(pattern)[0, torch.as_tensor(neurons, device=device)].cpu().tolist()
        trigger = AdditivePatternTrigger(pattern[0].permute(1, 2, 0).cpu().numpy().astype(np.float32))
        idx = pick_backdoor(train, self.rate, self.target, rng, who)
        images, labels = stamp(train, idx, trigger, self.target)
        extra = {"neurons": neurons.tolist(), "neuron_activation": reached}
        return (train.with_data(images=images, labels=labels),
                self._record(idx, train.labels[idx], target_class=self.target, trigger=trigger, extra=extra))
