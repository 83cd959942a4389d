"""Helpers shared by the BackdoorBench defences (``abl``, ``anp``, ``nad``, ``i_bau``, ``clp``, ``ft_sam``):
mini-batches for their own optimisation loops, and finding batch-norm layers, conv + batch-norm pairs and
stage outputs generically (module types and hooks, never layer names).

Private module (leading underscore): the defence auto-import skips it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from poisonlab.data.imageset import ImageSet
from poisonlab.defenses._repair import finetune_augment
from poisonlab.errors import ParameterError
from poisonlab.training.augment import augment_batch

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.ELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.PReLU)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(data: ImageSet, batch_size: int, epochs: int, gen: torch.Generator,
            device: torch.device | str = "cpu", augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``epochs`` shuffled passes over ``data`` in batches: float NCHW in [0, 1] and int64 labels on ``device``.

    The defences' own loops (gradient ascent, distillation, SAM, mask and hypergradient steps) draw
    their batches here; plain fine-tuning goes through :func:`poisonlab.training.fit`. ``augment``
    applies :func:`poisonlab.defenses._repair.finetune_augment` (BackdoorBench's training transform).
    """
    x_all, y_all = data.tensors(device)
    bs = max(1, min(batch_size, len(data)))
    aug = finetune_augment(data) if augment else {}
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(bs):
            idx = idx.to(device)
            x = x_all[idx].float().div_(255)
            yield (augment_batch(x, gen=gen, **aug) if aug else x), y_all[idx]


def batch_norms(model: nn.Module, who: str) -> list[nn.Module]:
    """Every affine batch-norm layer of ``model``; a :class:`ParameterError` naming ``who`` if there is none."""
    layers = [m for m in model.modules() if isinstance(m, BATCH_NORMS) and m.affine]
    if not layers:
        raise ParameterError(f"{who} acts on batch-norm neurons, but model {type(model).__name__} has no "
                             f"batch-norm layer (use fastnet, resnet18, vgg_like or cnn3)")
    return layers


@contextmanager
def recording(modules: list[nn.Module]) -> Iterator[list[tuple[nn.Module, torch.Tensor]]]:
    """Within the block, every call of one of ``modules`` appends ``(module, output)`` to the yielded list."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: calls.append((mod, out))) for m in modules]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, shape: tuple[int, int, int]) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """``(conv, bn)`` pairs in execution order: each BatchNorm2d with the last Conv2d run before it, when
    their channel counts match (pooling in between is allowed: it keeps channels apart).

    Found from one forward pass of a zero image of ``shape`` (H, W, C): no data is needed.
    """
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    was_training = model.training
    model.eval()
    h, w, c = shape
    with recording(mods) as calls:
        model(torch.zeros(1, c, h, w, device=device_of(model)))
    model.train(was_training)
    pairs, last_conv = [], None
    for m, _ in calls:
        if isinstance(m, nn.Conv2d):
            last_conv = m
        elif last_conv is not None and last_conv.out_channels == m.num_features and m.affine:
            pairs.append((last_conv, m))
            last_conv = None
    return pairs


def stage_candidates(model: nn.Module) -> list[nn.Module]:
    """Modules whose output may end a stage: activations, and blocks (modules with children that are not
    plain containers), inside ``model.body`` when the model has one."""
    root = getattr(model, "body", model)
    return [m for m in root.modules() if m is not root and (
        isinstance(m, ACTIVATIONS) or (len(list(m.children())) > 0 and not isinstance(m, CONTAINERS)))]


class StageTap:
    """The outputs of a network's last ``n`` stages, read with forward hooks (for attention distillation).

    A stage output is the last feature map (4-D output of an activation module or of a block, see
    :func:`stage_candidates`) at each spatial resolution, in execution order: ``n = 3`` on a
    ResNet-18 gives the outputs of its last three residual stages, on fastnet the last activation
    of each conv group. Found once from a probe batch; positions are call indices, so a module used
    several times (a shared ReLU) is handled, and any copy of the same architecture can be tapped.
    """

    def __init__(self, model: nn.Module, probe: torch.Tensor, n: int, who: str = "nad"):
        was_training = model.training
        model.eval()
        with torch.no_grad(), recording(stage_candidates(model)) as calls:
            model(probe)
        model.train(was_training)
        last_at: dict[tuple[int, ...], int] = {}
        for i, (_, out) in enumerate(calls):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                last_at[tuple(out.shape[2:])] = i
        picks = sorted(last_at.values())
        if not picks:
            raise ParameterError(f"{who} needs convolutional feature maps; model {type(model).__name__} has none")
        self.positions = picks[-n:]
        self.shapes = [tuple(calls[i][1].shape[1:]) for i in self.positions]

    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``model(x)`` and the stage outputs of that pass (``model``: the probed one or a copy of it)."""
        with recording(stage_candidates(model)) as calls:
            logits = model(x)
        return logits, [calls[i][1] for i in self.positions]
