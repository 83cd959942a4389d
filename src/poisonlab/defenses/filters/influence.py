"""Influence-based pruning (the ResNet-18 poisoning study's last defence, after
Koh and Liang, "Understanding Black-box Predictions via Influence Functions", 2017).

A targeted attack wants one test image (the target) classified as an
adversarial class. One gradient step on training sample i changes the
target's adversarial loss by about ``-lr * g_i . g_t``, with ``g_i`` the
gradient of sample i's loss and ``g_t`` the gradient of the target's loss under
the adversarial label. Samples with the largest dot product push the target
hardest towards the adversarial class; the top ``k`` are dropped. As in the
study (and unlike Koh and Liang) the inverse Hessian is left out, and the
gradients are those of the last layer, which is where a feature-space attack
acts and what makes it cheap: for a linear head the per-sample gradient is an
outer product and the dot product has a closed form.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.defenses.base import DEFENSES, DefenseContext, Filter, FilterOutput
from poisonlab.defenses.filters._common import top_k_mask
from poisonlab.errors import ParameterError
from poisonlab.validate import check_int


def _split_head(head: nn.Module) -> tuple[nn.Linear, nn.Module] | None:
    """``(linear, rest)`` when the head is a Linear followed only by parameter-free row-wise modules."""
    if isinstance(head, nn.Linear):
        return head, nn.Identity()
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[0], nn.Linear):
        rest = nn.Sequential(*list(head)[1:])
        if not any(True for _ in rest.parameters()):
            return head[0], rest
    return None


@torch.no_grad()
def _grad_logits(rest: nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loss = F.cross_entropy(rest(z), y, reduction="sum")  # rows are independent: per-row gradients
        (g,) = torch.autograd.grad(loss, z)
    return g


def influence_scores(head: nn.Module, features: np.ndarray, labels: np.ndarray, target_features: np.ndarray,
                     adversarial_class: int, batch_size: int = 4096) -> np.ndarray:
    """Dot product of each sample's last-layer loss gradient with the target's adversarial-loss gradient.

    Args:
        head: the model's head (penultimate features -> logits).
        features: ``(N, D)`` penultimate features of the training samples.
        labels: ``(N,)`` their given labels.
        target_features: ``(D,)`` penultimate features of the target image.
        adversarial_class: the label the attacker wants for the target.
        batch_size: samples per batch (bounds memory of the generic per-sample-gradient path).

    Returns:
        ``(N,)`` scores; higher = helps the attack more (more suspicious).
    """
    head = head.eval()
    dev = next(head.parameters()).device
    phi = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(dev)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(dev)
    phi_t = torch.from_numpy(np.asarray(target_features, dtype=np.float32).reshape(1, -1)).to(dev)
    y_t = torch.tensor([int(adversarial_class)], device=dev)
    split = _split_head(head)
    out = torch.empty(len(phi), dtype=torch.float64)
    if split is not None:
        lin, rest = split
        with torch.no_grad():
            g_t = _grad_logits(rest, lin(phi_t), y_t)[0]
            for i in range(0, len(phi), batch_size):
                p, yy = phi[i:i + batch_size], y[i:i + batch_size]
                g = _grad_logits(rest, lin(p), yy)
                # grad wrt W is g phi^T, wrt b is g: <g_i phi_i^T, g_t phi_t^T> = (g_i.g_t)(phi_i.phi_t)
                feat_dot = p @ phi_t[0] + (1.0 if lin.bias is not None else 0.0)
                out[i:i + len(p)] = ((g @ g_t) * feat_dot).double().cpu()
        return out.numpy()
    # any other head: per-sample gradients of all its parameters with torch.func, batch by batch
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss_fn(prm, x, t):
        return F.cross_entropy(functional_call(head, prm, (x[None],)), t[None])

    g_t = grad(loss_fn)(params, phi_t[0], y_t[0])
    per_sample = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    for i in range(0, len(phi), batch_size):
        gs = per_sample(params, phi[i:i + batch_size], y[i:i + batch_size])
        out[i:i + batch_size] = sum((gs[k].flatten(1) @ g_t[k].flatten()) for k in params).double().cpu()
    return out.numpy()


@DEFENSES.register("influence")
class Influence(Filter):
    """Influence-based pruning: drop the ``k`` samples whose loss gradient best aligns with the target's.

    The target comes from the attack's public test-time information: pass ``target_index``
    (an index into the test set) and ``adversarial_class``. If they are not given, they are read
    from the attack's record (``ctx.poisoning.target_indices[0]`` and ``adversarial_labels[0]``):
    that models a defender who knows which test image is attacked and towards which class —
    an assumption of the study this reproduces, not something a defender usually knows.

    Args:
        k: samples dropped, [1, 10**7] (capped at N - 1); 250 matches nn_flip's default size.
        target_index: index of the target image in the test set, or None.
        adversarial_class: the class the attacker wants for it, or None.
    """

    def __init__(self, k: int = 250, target_index: int | None = None, adversarial_class: int | None = None):
        self.k = check_int(k, "k", 1, 10**7)
        self.target_index = None if target_index is None else check_int(target_index, "target_index", 0, 10**9)
        self.adversarial_class = (None if adversarial_class is None
                                  else check_int(adversarial_class, "adversarial_class", 0, 10**6))

    def _target(self, ctx: DefenseContext) -> tuple[int, int]:
        t, a = self.target_index, self.adversarial_class
        rec = ctx.poisoning
        if t is None and rec is not None and rec.target_indices is not None and len(rec.target_indices):
            t = int(np.asarray(rec.target_indices)[0])  # defender assumed to know the attacked test image
        if a is None and rec is not None and rec.adversarial_labels is not None and len(rec.adversarial_labels):
            a = int(np.asarray(rec.adversarial_labels)[0])
        if t is None or a is None:
            raise ParameterError("influence needs target_index and adversarial_class (or a targeted attack's "
                                 "record giving them)")
        if not 0 <= t < len(ctx.test):
            raise ParameterError(f"influence: target_index={t} is not an index of the test set (0..{len(ctx.test) - 1})")
        if not 0 <= a < ctx.train.num_classes:
            raise ParameterError(f"influence: adversarial_class={a} is not a class (0..{ctx.train.num_classes - 1})")
        return t, a

    def score(self, ctx: DefenseContext) -> FilterOutput:
        from poisonlab.training.loop import extract_features

        t, a = self._target(ctx)
        phi_t = extract_features(ctx.model, ctx.test.images[t:t + 1])[0]
        s = influence_scores(ctx.model.head, ctx.features(), ctx.train.labels, phi_t, a)
        k = min(self.k, len(s) - 1)
        return FilterOutput(s, top_k_mask(s, k), {"target_index": t, "adversarial_class": a})
