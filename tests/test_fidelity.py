"""Issue 17: attacks and defences faithful to their papers (fine-pruning after the residual add,
activation clustering's exclusionary reclassification, Koh & Liang influence, the attacks' settings)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from poisonlab.defenses.fine_pruning import ChannelMask, layer_outputs, prune_point
from poisonlab.models import MODELS, Classifier, build_model


# ------------------------------------------------------------------ fine-pruning
def _masked(model: nn.Module, module: nn.Module, channels: torch.Tensor, x: torch.Tensor, read: nn.Module):
    """Output of ``read`` (its last call) with ``channels`` of ``module``'s output masked."""
    mask = ChannelMask(channels.numel())
    mask.mask.copy_(channels)
    h = module.register_forward_hook(mask)
    seen = []
    h2 = read.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()
            model(x)
    finally:
        h.remove()
        h2.remove()
    return seen[-1]


def _warm_batch_norm(model: nn.Module, x: torch.Tensor) -> None:
    """Give the batch norms non-trivial running statistics (a trained model's BN has them)."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def test_fine_pruning_zeroes_resnet18_channels_after_the_residual_add():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10, 16)
    x = torch.rand(6, 3, 16, 16)
    _warm_batch_norm(model, x)
    last_block = model.body[-3]
    assert type(last_block).__name__ == "_BasicBlock"
    point = prune_point(model, x)
    assert point.layer_output is last_block and point.channels == 512
    keep = torch.ones(512)
    keep[torch.randperm(512)[:200]] = 0
    after_add = _masked(model, point.mask_module, keep, x, last_block)
    assert (after_add[:, keep == 0] == 0).all()  # exactly zero after the identity shortcut is added back
    assert (after_add[:, keep == 1] != 0).any()
    # the old mask point, the last conv's own batch norm, leaves the shortcut's signal in the pruned channels
    leak = _masked(model, last_block.bn2, keep, x, last_block)
    assert (leak[:, keep == 0] != 0).any()


class _PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): BN-ReLU-conv twice, then add the shortcut, no ReLU after."""

    def __init__(self, c: int):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(torch.relu(self.bn1(x)))
        return self.conv2(torch.relu(self.bn2(out))) + x


class _PreActNet(Classifier):
    """A pre-activation ResNet's tail: the last block's sum goes through a final BN + ReLU before pooling."""

    def __init__(self):
        super().__init__(3)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), _PreActBlock(16), _PreActBlock(16),
                                  nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, 10)


def _probe(name: str) -> tuple[Classifier, torch.Tensor]:
    torch.manual_seed(0)
    if name == "preact_toy":
        model, x = _PreActNet(), torch.rand(6, 3, 16, 16)
    elif name == "mnist_cnn":
        model, x = build_model(name, 1, 10, 28), torch.rand(6, 1, 28, 28)
    else:
        model, x = build_model(name, 3, 10, 32), torch.rand(6, 3, 32, 32)
    if getattr(model, "needs_data_init", False):
        model.data_init(x)
    _warm_batch_norm(model, x)
    return model, x


@pytest.mark.parametrize("name", sorted(MODELS.names()) + ["preact_toy"])
def test_fine_pruning_mask_is_exact_at_the_layer_output_for_every_model(name):
    model, x = _probe(name)
    point = prune_point(model, x)
    keep = (torch.arange(point.channels) % 3 != 0).float()
    mask = ChannelMask(point.channels)
    mask.mask.copy_(keep)
    h = point.mask_module.register_forward_hook(mask)
    try:
        out = layer_outputs(model, point, x)
        feats = model.features(x)
    finally:
        h.remove()
    assert out.shape[1] == point.channels
    assert (out[:, keep == 0] == 0).all() and (out[:, keep == 1] != 0).any()
    if name == "preact_toy":  # the final BN + ReLU after the last block is part of the layer
        assert point.layer_output is model.body[4]
        assert (feats[:, keep == 0] == 0).all()
    unmasked = layer_outputs(model, point, x)
    assert (unmasked[:, keep == 0] != 0).any()  # the hook is gone: the channels carry signal again


def test_fine_pruning_defence_on_resnet18_keeps_pruned_channels_silent(digits):
    from poisonlab.defenses import DefenseContext, get_defense

    tr, te = digits
    torch.manual_seed(0)
    model = build_model("resnet18", 1, 10, 8)
    clean = tr.stratified_subset(200, seed=0)

    def no_training(*a, **k):
        raise AssertionError("fine-pruning does not retrain from scratch")

    ctx = DefenseContext(train=tr, model=model, test=te, train_model=no_training, clean_set=clean, seed=0)
    res = get_defense("fine_pruning", margin=0.5, max_fraction=0.5, epochs=1, batch_size=64).run(ctx)
    m = res.metrics
    assert m["layer_output"] == "body.10" and m["channels"] == 512
    assert m["pruned_channels"] > 0 and m["pruned_output_max_abs"] == 0.0


# ------------------------------------------------------------------ activation clustering
def test_exclusionary_reclassification_rule_on_a_synthetic_case():
    from poisonlab.defenses.filters.activation_clustering import exclusionary_reclassification

    # a poison cluster labelled 3: the model trained without it sends most members to their source class 5
    poison = exclusionary_reclassification(np.array([5] * 30 + [3] * 8 + [1] * 2), label=3)
    assert (poison.l, poison.p, poison.source_class, poison.n) == (8, 30, 5, 40)
    assert poison.poisoned and poison.ratio == pytest.approx(8 / 30, abs=1e-4)
    # a natural sub-mode of class 3: most members come back as 3
    legit = exclusionary_reclassification(np.array([3] * 30 + [5] * 6 + [8] * 4), label=3)
    assert not legit.poisoned and legit.ratio == pytest.approx(5.0) and legit.source_class == 5
    # nothing points away from the label: legitimate, no ratio
    all_back = exclusionary_reclassification(np.array([3] * 12), label=3)
    assert not all_back.poisoned and all_back.ratio is None and all_back.source_class is None
    # the threshold T decides the borderline: l / p = 1
    tie = np.array([3] * 10 + [5] * 10)
    assert not exclusionary_reclassification(tie, 3, threshold=1.0).poisoned
    assert exclusionary_reclassification(tie, 3, threshold=1.5).poisoned


def test_size_silhouette_verdict_names_the_deciding_rule():
    from poisonlab.defenses.filters.activation_clustering import ClassSplit, size_silhouette_verdict

    def split(share, sil):
        return ClassSplit(0, np.arange(4), np.array([True, False, False, False]), share, sil)

    assert size_silhouette_verdict(split(0.5, 0.9), 0.1, 10, 0.35, 0.25, True) == (False, "size")
    assert size_silhouette_verdict(split(0.2, 0.1), 0.05, 10, 0.35, 0.25, True) == (False, "silhouette")
    assert size_silhouette_verdict(split(0.2, 0.3), 0.4, 10, 0.35, 0.25, True) == (False, "relative_silhouette")
    assert size_silhouette_verdict(split(0.2, 0.5), 0.3, 10, 0.35, 0.25, True) == (
        True, "size+silhouette+relative_silhouette")
    assert size_silhouette_verdict(split(0.2, 0.3), 0.4, 10, 0.35, 0.25, False) == (True, "size+silhouette")
