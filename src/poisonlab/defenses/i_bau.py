"""I-BAU: Zeng, Chen, Park, Mao, Jin and Jia, "Adversarial Unlearning of Backdoors via Implicit
Hypergradient" (ICLR 2022)."""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from poisonlab.defenses._bb_common import device_of
from poisonlab.defenses._repair import MIN_CLEAN_PER_CLASS, require_clean_set
from poisonlab.defenses.base import DEFENSES, Defense, DefenseContext, DefenseResult
from poisonlab.errors import ParameterError
from poisonlab.training.progress import progress_counter
from poisonlab.validate import check_range


def logits_normalised(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for inputs already normalised (``model.normalize(x)``), so that a perturbation
    can live in the normalised space the paper's code works in."""
    return model.head(model.body(z))


def implicit_hypergradient(delta: torch.Tensor, params: list[torch.Tensor],
                           inner_map: Callable[[torch.Tensor], torch.Tensor],
                           outer_loss: Callable[[torch.Tensor], torch.Tensor], k: int,
                           tol: float = 1e-10) -> list[torch.Tensor]:
    """Hypergradient of ``outer_loss(delta*(theta))`` w.r.t. ``params`` (theta) by the fixed-point method.

    ``delta*`` is the fixed point of ``inner_map`` (one gradient step of the inner problem). With
    ``v_0 = 0`` and ``v_{j+1} = J^T v_j + dL/d delta`` (``J = d inner_map / d delta``) for ``k`` steps
    (Grazzi et al. 2020, as in the I-BAU code), the hypergradient is
    ``dL/d theta + (d inner_map / d theta)^T v_k``.
    """
    d = delta.detach().requires_grad_(True)
    o = outer_loss(d)
    g_d = torch.autograd.grad(o, d, retain_graph=True, allow_unused=True)[0]
    g_d = torch.zeros_like(d) if g_d is None else g_d
    g_theta = torch.autograd.grad(o, params, allow_unused=True)
    mapped = inner_map(d)
    v = torch.zeros_like(d)
    for _ in range(k):
        prev = v
        v = torch.autograd.grad(mapped, d, grad_outputs=v, retain_graph=True)[0] + g_d
        if float((v - prev).norm()) < tol:
            break
    g_map = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [(a if a is not None else torch.zeros_like(p)) + (b if b is not None else torch.zeros_like(p))
            for a, b, p in zip(g_theta, g_map, params)]


@DEFENSES.register("i_bau")
class IBAU(Defense):
    """Implicit backdoor adversarial unlearning, I-BAU (Zeng et al., ICLR 2022).

    Input: ``ctx.model`` and the trusted ``ctx.clean_set`` (``clean_fraction``, BackdoorBench 5%).
    A min-max problem on a copy of the model (eval mode): the inner maximisation finds one universal
    perturbation ``delta`` (in the model's normalised input space, as in the paper's code) that makes
    the model misclassify clean images, the outer minimisation updates the weights so that clean
    images with ``delta`` are classified correctly; the outer gradient accounts for how ``delta``
    depends on the weights through the implicit hypergradient (:func:`implicit_hypergradient`,
    ``k`` fixed-point steps). Each of ``rounds`` rounds: ``delta`` from zero by one pass of SGD (lr 10)
    on ``-CE(x + delta, model's own label) + 0.001 |delta|^2``, then one Adam step of the weights per
    clean batch, whose outer loss stamps ``delta`` on ``portion`` of the batch (at least one image) and
    whose inner problem is the regularised loss on the first batch. Output: the unlearnt copy.

    Defaults are BackdoorBench's: 5 rounds, k = 5, Adam lr 1e-4, batch 256; with the authors' code
    they share portion 0.01 (2 images of 256; the authors' batch of 100 stamps one), inner step 0.1,
    delta lr 10 and penalty 0.001. The authors' own defaults are 3 rounds, Adam lr 1e-3, batch 100.
    It runs in float32 where the other defences' own loops take bfloat16 (:func:`~poisonlab.defenses._repair.
    loop_bf16`): the fixed-point hypergradient differentiates through gradients, where bf16's 8-bit
    mantissa would be amplified ``k`` times.

    Args:
        rounds: unlearning rounds, [1, 1000]; k: fixed-point steps, [1, 1000].
        lr: Adam learning rate of the weights, (0, 1].
        batch_size: clean images per batch; portion: share of a batch the outer loss stamps, (0, 1].
        inner_lr: step of the inner gradient map, (0, 100]; delta_lr: SGD step of the universal
            perturbation, (0, 1000]; reg: its L2 penalty, [0, 100].
    """

    kind = "repair"
    min_clean_per_class = MIN_CLEAN_PER_CLASS
    retrains = False

    def __init__(self, rounds: int = 5, k: int = 5, lr: float = 1e-4, batch_size: int = 256, portion: float = 0.01,
                 inner_lr: float = 0.1, delta_lr: float = 10.0, reg: float = 0.001):
        self.rounds = int(check_range(rounds, "rounds", 1, 1000))
        self.k = int(check_range(k, "k", 1, 1000))
        self.lr = float(check_range(lr, "lr", 0, 1, lo_open=True))
        self.batch_size = int(check_range(batch_size, "batch_size", 1, 65_536))
        self.portion = float(check_range(portion, "portion", 0, 1, lo_open=True))
        self.inner_lr = float(check_range(inner_lr, "inner_lr", 0, 100, lo_open=True))
        self.delta_lr = float(check_range(delta_lr, "delta_lr", 0, 1000, lo_open=True))
        self.reg = float(check_range(reg, "reg", 0, 100))

    def run(self, ctx: DefenseContext) -> DefenseResult:
        who = self.registry_name or "i_bau"
        clean = require_clean_set(ctx, who)
        model = copy.deepcopy(ctx.model).eval()
        if not all(hasattr(model, a) for a in ("normalize", "body", "head")):
            raise ParameterError(f"{who} needs a registry classifier (normalize, body, head); got "
                                 f"{type(model).__name__}")
        device = device_of(model)
        gen = torch.Generator().manual_seed(ctx.seed)
        x_all, y_all = clean.tensors(device)
        order = torch.randperm(len(clean), generator=gen).to(device)  # the batches, drawn once as in the code
        bs = max(1, min(self.batch_size, len(clean)))
        batches = [(model.normalize(x_all[i].float().div(255)).detach(), y_all[i]) for i in order.split(bs)]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr)
        z0, y0 = batches[0]

        def inner_loss(d: torch.Tensor) -> torch.Tensor:
            ce = F.cross_entropy(logits_normalised(model, z0 + d).float(), y0, reduction="none")
            return (-ce).mean() + self.reg * d.pow(2).sum()

        def inner_map(d: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(inner_loss(d), d, create_graph=True)
            return d - self.inner_lr * g

        deltas = []
        bar = progress_counter(ctx.progress, "i-bau", self.rounds, unit="round")
        for _ in range(self.rounds):
            delta = torch.zeros_like(z0[:1], requires_grad=True)
            d_opt = torch.optim.SGD([delta], lr=self.delta_lr)
            for z, _ in batches:
                with torch.no_grad():
                    own = logits_normalised(model, z).argmax(1)
                loss = -F.cross_entropy(logits_normalised(model, z + delta).float(), own) + self.reg * delta.pow(2).sum()
                (delta.grad,) = torch.autograd.grad(loss, delta)  # the weights take no gradient here
                d_opt.step()
            deltas.append(float(delta.detach().norm()))
            for z, y in batches:
                n_stamp = max(1, int(len(y) * self.portion))
                pick = torch.randperm(len(y), generator=gen)[:n_stamp].to(device)
                stamp = torch.zeros(len(y), 1, 1, 1, device=device)
                stamp[pick] = 1.0

                def outer_loss(d: torch.Tensor, z=z, y=y, stamp=stamp) -> torch.Tensor:
                    return F.cross_entropy(logits_normalised(model, z + stamp * d).float(), y)

                grads = implicit_hypergradient(delta.detach(), params, inner_map, outer_loss, self.k)
                opt.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = g.detach()
                opt.step()
            bar.advance()
        bar.stop()
        model.eval()
        return DefenseResult(model=model, metrics={"n_finetune": len(clean), "rounds": self.rounds,
                                                   "outer_steps": self.rounds * len(batches),
                                                   "delta_norm": deltas})
