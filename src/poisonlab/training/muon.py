"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration.

Keller Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024), as used by
airbench94_muon (94% on CIFAR-10 in 8 epochs). For each weight matrix (a conv filter bank is viewed
as ``out x (in*kh*kw)``) the momentum buffer ``G`` is replaced by the nearest semi-orthogonal matrix,
approximately ``U V^T`` of ``G = U S V^T``, computed by a quintic Newton-Schulz iteration in bfloat16.
As in airbench, each weight is renormalised to norm ``sqrt(out)`` before the step, so weight decay is
not needed for these parameters.
"""

from __future__ import annotations

import torch

# Quintic coefficients chosen (by Jordan) to maximise the slope at zero: a few iterations take every
# singular value into roughly [0.5, 1.5], which trains as well as exact orthogonalisation.
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix ``g`` (returns bfloat16, same shape)."""
    a, b, c = _NS_COEFFS
    x = g.bfloat16()
    x = x / (x.norm() + eps)  # the top singular value is now <= 1
    tall = x.shape[0] > x.shape[1]
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Orthogonalised Nesterov momentum for parameters of two or more dimensions.

    Args:
        params: weights with ``ndim >= 2`` (conv filters, linear weights).
        lr: step size of the orthogonalised update (airbench94: 0.24).
        momentum: momentum of the gradient buffer (airbench94: 0.6).
        nesterov: use the Nesterov look-ahead of the buffer (airbench94: True).
        ns_steps: Newton-Schulz iterations (airbench94: 3).
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 3):
        if lr <= 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon needs lr > 0, momentum in [0, 1) and ns_steps >= 1; got {lr}, {momentum}, "
                             f"{ns_steps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 (torch's signature)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                update = orthogonalize(g.reshape(len(g), -1), group["ns_steps"]).view(g.shape)
                p.add_(update.to(p.dtype), alpha=-group["lr"])
        return None
