"""Influence of training samples on test points: Koh and Liang, "Understanding Black-box
Predictions via Influence Functions" (ICML 2017), and the gradient-similarity score of the
ResNet-18 poisoning study.

``influence`` (Koh & Liang): the influence of upweighting training sample z on the loss of a test
point z_test is ``I_up,loss(z, z_test) = -grad L(z_test)^T H^-1 grad L(z)`` with H the Hessian of the
empirical risk at the trained parameters. Here the parameters are those of the classifier's last
layer (the rest of the network is held fixed, as in Koh & Liang's own experiments with a frozen
Inception feature extractor): for a linear head on fixed features the cross-entropy is convex, the
Hessian is computed exactly (no LiSSA or conjugate-gradient approximation) and inverted by a
Cholesky solve. Removing z changes the test loss by about ``-I_up,loss / n``: a sample with a large
positive influence is one whose removal lowers the protected test points' loss, i.e. one that
pushes them towards a wrong class. The defender names the test points to protect; nothing about the
attack is needed.

``gradient_similarity`` (the study's score): the dot product of each sample's last-layer loss
gradient with the gradient of the target's loss under the adversarial label, no inverse Hessian.
It needs the attacked image and the adversarial class.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.validate import check_range
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


# ------------------------------------------------------------------------ Koh & Liang
def _loss_derivatives(rest: nn.Module, u: torch.Tensor, y: torch.Tensor, hessian: bool,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row gradient ``(N, K)`` and Hessian ``(N, K, K)`` of ``CE(rest(u), y)`` w.r.t. the logits ``u``.

    ``rest`` acts row by row, so the gradient of the summed loss holds every row's own gradient,
    and K more backward passes (one per logit) give every row's Hessian.
    """
    gs, hs = [], []
    for i in range(0, len(u), batch_size):
        ub = u[i:i + batch_size].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(rest(ub), y[i:i + batch_size], reduction="sum")
            (g,) = torch.autograd.grad(loss, ub, create_graph=hessian)
            if hessian:
                hs.append(torch.stack([torch.autograd.grad(g[:, k].sum(), ub, retain_graph=True)[0]
                                       for k in range(u.shape[1])], 1))
        gs.append(g.detach())
    k = u.shape[1]
    g = torch.cat(gs) if gs else u.new_zeros((0, k))
    return g, (torch.cat(hs) if hs else u.new_zeros((0, k, k))) if hessian else None


def _design(lin: nn.Linear, features: np.ndarray) -> torch.Tensor:
    """Features as float64 ``(N, D~)`` rows, with a constant 1 appended when the layer has a bias."""
    phi = torch.from_numpy(np.asarray(features, dtype=np.float64))
    if phi.ndim == 1:
        phi = phi[None]
    if lin.bias is not None:
        phi = torch.cat([phi, torch.ones(len(phi), 1, dtype=torch.float64)], 1)
    return phi


def _weights(lin: nn.Linear) -> torch.Tensor:
    """``(K, D~)`` float64: the weight matrix, with the bias as its last column when there is one."""
    w = lin.weight.detach().cpu().double()
    if lin.bias is not None:
        w = torch.cat([w, lin.bias.detach().cpu().double()[:, None]], 1)
    return w


def last_layer_hessian(head: nn.Module, features: np.ndarray, labels: np.ndarray,
                       batch_size: int = 4096) -> torch.Tensor:
    """Exact Hessian of the mean cross-entropy over ``features`` w.r.t. the head's last-layer parameters.

    The head is a Linear layer (optionally followed by parameter-free modules such as a fixed
    scale). With ``u = W phi`` (``phi`` with a 1 appended for the bias) and ``B_i`` the Hessian of
    sample i's loss w.r.t. ``u``, the Hessian w.r.t. ``vec(W)`` (row-major, ``K * D~`` entries) is
    ``(1/N) sum_i B_i (x) phi_i phi_i^T``, built block by block in float64.

    Returns:
        ``(K * D~, K * D~)`` float64 tensor.
    """
    lin, rest = _require_linear(head)
    w = _weights(lin)
    phi = _design(lin, features)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    _, b = _loss_derivatives(rest, phi @ w.T, y, True, batch_size)
    k, d = w.shape
    h = torch.zeros(k, d, k, d, dtype=torch.float64)
    for a in range(k):
        for c in range(a, k):
            block = phi.T @ (b[:, a, c, None] * phi)
            h[a, :, c, :] = block
            if c != a:
                h[c, :, a, :] = block.T
    return h.reshape(k * d, k * d) / max(len(phi), 1)


def _require_linear(head: nn.Module) -> tuple[nn.Linear, nn.Module]:
    split = _split_head(head)
    if split is None:
        raise ParameterError("influence needs a model whose head is a Linear layer, optionally followed by "
                             f"parameter-free layers (got {type(head).__name__}); every zoo model has one")
    return split


def influence_scores(head: nn.Module, features: np.ndarray, labels: np.ndarray, test_features: np.ndarray,
                     test_labels: np.ndarray, damping: float = 0.01, batch_size: int = 4096) -> np.ndarray:
    """Koh & Liang's ``I_up,loss`` of every training sample on the summed loss of the test points.

    Args:
        head: the model's head (penultimate features -> logits): a Linear layer, optionally followed
            by parameter-free modules.
        features: ``(N, D)`` penultimate features of the training samples.
        labels: ``(N,)`` their given labels.
        test_features: ``(T, D)`` (or ``(D,)``) features of the test points to protect.
        test_labels: ``(T,)`` their correct labels.
        damping: ``lambda`` added to the Hessian's diagonal: the L2 term of the objective and the ridge
            that makes the softmax's flat directions (adding one vector to every class's weights)
            invertible, > 0.
        batch_size: rows per batch of the per-sample derivatives.

    Returns:
        ``(N,)`` float64 ``-sum_t grad L(z_t)^T (H + damping I)^-1 grad L(z_i)``: positive for samples
        whose removal would lower the test points' loss (harmful), negative for helpful ones.
        Removing sample i changes the summed test loss by about ``-score_i / N``.
    """
    lin, rest = _require_linear(head)
    w = _weights(lin)
    phi = _design(lin, features)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    phi_t = _design(lin, test_features)
    y_t = torch.from_numpy(np.atleast_1d(np.asarray(test_labels, dtype=np.int64)))
    if len(phi_t) != len(y_t):
        raise ParameterError(f"test_features has {len(phi_t)} rows but test_labels has {len(y_t)} entries")
    h = last_layer_hessian(head, features, labels, batch_size)
    h.diagonal().add_(float(damping))
    g_t, _ = _loss_derivatives(rest, phi_t @ w.T, y_t, False, batch_size)
    grad_test = (g_t[:, :, None] * phi_t[:, None, :]).sum(0).reshape(-1)  # gradient of the summed test loss
    chol = torch.linalg.cholesky(h)
    s_test = torch.cholesky_solve(grad_test[:, None], chol)[:, 0].reshape(w.shape)
    out = torch.empty(len(phi), dtype=torch.float64)
    for i in range(0, len(phi), batch_size):
        p, yy = phi[i:i + batch_size], y[i:i + batch_size]
        g, _ = _loss_derivatives(rest, p @ w.T, yy, False, batch_size)
        # grad of sample i w.r.t. W is g_i phi_i^T, so its dot product with S is g_i^T S phi_i
        out[i:i + len(p)] = -((g @ s_test) * p).sum(1)
    return out.numpy()


def parse_indices(value: Any, name: str) -> tuple[int, ...] | None:
    """One index, a list of indices, or ``"7,12,30"`` (a config's list is a grid axis) -> a tuple of ints."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ParameterError(f"{name} must be test-set indices: an int, a list, or '7,12,30', "
                                 f"got {value!r}") from None
    items = value if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not len(items):
        raise ParameterError(f"{name} must name at least one test image, got {value!r}")
    return tuple(check_int(v, name, 0, 10**9) for v in items)


@DEFENSES.register("influence")
class Influence(Filter):
    """Influence-function filter (Koh & Liang 2017): drop the ``k`` training samples with the largest
    influence on the loss of the test images the defender protects.

    Input: ``ctx.model`` (its head must be a Linear layer, optionally followed by parameter-free
    modules: every zoo model), ``ctx.features()``, the training labels, and the protected test
    images ``test_indices`` (indices into the test set, with the test set's labels as their correct
    labels). Output: scores = :func:`influence_scores` summed over the protected images; the top
    ``k`` are dropped and the model retrained. Nothing about the attack is read: the defender says
    which predictions matter to them (in a config: ``test_indices = "7"`` or ``"7,12,30"``, a string
    because a TOML list is a grid axis -- ``test_indices = [7, 12]`` means two runs).

    Fidelity: exact Hessian of the last layer (the network below is held fixed), plain
    cross-entropy without the recipe's label smoothing, ``damping`` on the diagonal (Koh & Liang
    add a damping term for the same reason: a singular or non-convex Hessian). The study this
    project replicates used a gradient dot product instead, available as ``gradient_similarity``.

    Args:
        k: samples dropped, [1, 10**7] (capped at N - 1); 250 matches nn_flip's default size.
        test_indices: the protected test images (required before scoring).
        damping: added to the Hessian's diagonal, (0, 1e4].

    ``info``: the protected indices and labels, ``predicted_loss_drop`` (the first-order drop of their
    summed loss when the flagged samples are removed, ``sum(scores[flagged]) / N``) and the Hessian's size.
    """

    def __init__(self, k: int = 250, test_indices: int | Sequence[int] | str | None = None, damping: float = 0.01):
        self.k = check_int(k, "k", 1, 10**7)
        self.test_indices = parse_indices(test_indices, "test_indices")
        self.damping = float(check_range(damping, "damping", 0, 1e4, lo_open=True))

    def score(self, ctx: DefenseContext) -> FilterOutput:
        from poisonlab.training.loop import extract_features

        if self.test_indices is None:
            raise ParameterError("influence needs test_indices: the test images whose predictions the defender "
                                 "protects (e.g. test_indices = \"7\" in a config)")
        t = np.asarray(self.test_indices, dtype=np.int64)
        if t.max() >= len(ctx.test):
            raise ParameterError(f"influence: test_indices {t.tolist()} outside the test set "
                                 f"(allowed 0..{len(ctx.test) - 1})")
        phi_t = extract_features(ctx.model, ctx.test.images[t])
        s = influence_scores(ctx.model.head, ctx.features(), ctx.train.labels, phi_t, ctx.test.labels[t],
                             self.damping)
        kk = min(self.k, len(s) - 1)
        flagged = top_k_mask(s, kk)
        d = ctx.features().shape[1] + (1 if _require_linear(ctx.model.head)[0].bias is not None else 0)
        return FilterOutput(s, flagged, {"test_indices": t.tolist(), "test_labels": ctx.test.labels[t].tolist(),
                                         "predicted_loss_drop": float(s[flagged].sum() / len(s)),
                                         "hessian_size": ctx.train.num_classes * d, "solver": "exact"})


# ------------------------------------------------------------------ gradient similarity
@torch.no_grad()
def _grad_logits(rest: nn.Module, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loss = F.cross_entropy(rest(z), y, reduction="sum")  # rows are independent: per-row gradients
        (g,) = torch.autograd.grad(loss, z)
    return g


def gradient_similarity_scores(head: nn.Module, features: np.ndarray, labels: np.ndarray,
                               target_features: np.ndarray, adversarial_class: int,
                               batch_size: int = 4096) -> np.ndarray:
    """Dot product of each sample's last-layer loss gradient with the target's adversarial-loss gradient.

    One gradient step on training sample i changes the target's adversarial loss by about
    ``-lr * g_i . g_t``; the samples with the largest dot product push the target hardest towards
    the adversarial class. No inverse Hessian (this is not Koh & Liang's influence).

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


@DEFENSES.register("gradient_similarity")
class GradientSimilarity(Filter):
    """The ResNet-18 poisoning study's "influence" pruning: drop the ``k`` samples whose last-layer loss
    gradient best aligns with the gradient of the target's loss under the adversarial label
    (:func:`gradient_similarity_scores`). A first-order score without the inverse Hessian; for Koh &
    Liang's influence use ``influence``.

    It needs the attacked test image and the class it is pushed to: ``target_index`` and
    ``adversarial_class``. With ``oracle_target=True`` they are read from the attack's record instead
    -- the study's assumption of a defender who knows the attack, an upper bound for evaluation, not
    something a defender can run.

    Args:
        k: samples dropped, [1, 10**7] (capped at N - 1).
        target_index: index of the target image in the test set.
        adversarial_class: the class the attacker wants for it.
        oracle_target: read both from ``ctx.poisoning`` (evaluation only).
    """

    def __init__(self, k: int = 250, target_index: int | None = None, adversarial_class: int | None = None,
                 oracle_target: bool = False):
        self.k = check_int(k, "k", 1, 10**7)
        self.target_index = None if target_index is None else check_int(target_index, "target_index", 0, 10**9)
        self.adversarial_class = (None if adversarial_class is None
                                  else check_int(adversarial_class, "adversarial_class", 0, 10**6))
        self.oracle_target = bool(oracle_target)

    def _target(self, ctx: DefenseContext) -> tuple[int, int]:
        t, a = self.target_index, self.adversarial_class
        rec = ctx.poisoning
        if self.oracle_target and rec is not None:
            if t is None and rec.target_indices is not None and len(rec.target_indices):
                t = int(np.asarray(rec.target_indices)[0])
            if a is None and rec.adversarial_labels is not None and len(rec.adversarial_labels):
                a = int(np.asarray(rec.adversarial_labels)[0])
        if t is None or a is None:
            raise ParameterError("gradient_similarity needs target_index and adversarial_class (or "
                                 "oracle_target = true with a targeted attack's record)")
        if not 0 <= t < len(ctx.test):
            raise ParameterError(f"gradient_similarity: target_index={t} is not an index of the test set "
                                 f"(0..{len(ctx.test) - 1})")
        if not 0 <= a < ctx.train.num_classes:
            raise ParameterError(f"gradient_similarity: adversarial_class={a} is not a class "
                                 f"(0..{ctx.train.num_classes - 1})")
        return t, a

    def score(self, ctx: DefenseContext) -> FilterOutput:
        from poisonlab.training.loop import extract_features

        t, a = self._target(ctx)
        phi_t = extract_features(ctx.model, ctx.test.images[t:t + 1])[0]
        s = gradient_similarity_scores(ctx.model.head, ctx.features(), ctx.train.labels, phi_t, a)
        k = min(self.k, len(s) - 1)
        return FilterOutput(s, top_k_mask(s, k), {"target_index": t, "adversarial_class": a,
                                                  "oracle_target": self.oracle_target})
