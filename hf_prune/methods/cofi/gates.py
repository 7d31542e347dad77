"""Hard-concrete gates (Louizos et al., 2018), as used by CoFi.

A gate with logit `log_alpha` samples
`z = min(1, max(0, sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l))`, `u ~ U(0, 1)`,
so `z` lies in [0, 1] with point masses at exactly 0 and exactly 1. Its keep probability is
`P(z > 0) = 1 - Q(0)`, `Q(0) = sigmoid(beta * log(-l / r) - log_alpha)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA = 2.0 / 3.0
LIMIT_L = -0.1
LIMIT_R = 1.1
_EPS = 1e-6


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """`P(z > 0)` for each gate: `1 - sigmoid(beta * log(-l / r) - log_alpha)` (differentiable in `log_alpha`)."""
    return 1.0 - torch.sigmoid(BETA * math.log(-LIMIT_L / LIMIT_R) - log_alpha)


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One reparameterised hard-concrete sample per gate (gradients flow to `log_alpha` where 0 < z < 1)."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u.clamp(_EPS, 1.0 - _EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def deterministic_gates(log_alpha: torch.Tensor, multiple_of: int = 1) -> torch.Tensor:
    """Deterministic mask over the last dimension of `log_alpha`.

    In each row, the `round(sum(keep_probability))` gates with the highest logits are kept, with the test-time value
    `min(1, max(0, sigmoid(log_alpha) * (r - l) + l))`; all others are exactly 0. A kept gate whose test-time value
    is 0 is removed as well (it contributes nothing), so "kept" always means "non-zero".

    With `multiple_of` > 1 the number kept per row is rounded to the nearest multiple of it (down when there are not
    enough gates with a non-zero test-time value to round up; unchanged when below one multiple), capped at the row
    length: aligned widths run faster in matrix kernels.
    """
    with torch.no_grad():
        flat = log_alpha.detach().reshape(-1, log_alpha.shape[-1]) if log_alpha.dim() else log_alpha.view(1, 1)
        soft = (torch.sigmoid(flat) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)
        keep = torch.round(keep_probability(flat).sum(-1)).long()
        if multiple_of > 1:
            keep = _align(keep, (soft > 0).sum(-1), multiple_of, flat.shape[-1])
        order = torch.argsort(flat, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device).expand_as(order))
        mask = torch.where(ranks < keep.unsqueeze(-1), soft, torch.zeros_like(soft))
        return mask.reshape(log_alpha.shape)


def _align(keep: torch.Tensor, available: torch.Tensor, multiple: int, size: int) -> torch.Tensor:
    """`keep` rounded to the nearest multiple of `multiple` that `available` non-zero gates can fill.

    A row kept whole, or keeping less than one multiple, stays as it is.
    """
    up = torch.div(keep + multiple // 2, multiple, rounding_mode="floor") * multiple
    down = torch.div(available, multiple, rounding_mode="floor") * multiple
    aligned = torch.where(up <= available, up, down)
    aligned = torch.where(available >= size, torch.clamp(up, max=size), aligned)  # every gate open: may keep all
    return torch.where((keep < multiple) | (keep >= size) | (aligned == 0), keep, aligned)


def init_log_alpha(size: tuple[int, ...], droprate: float) -> torch.Tensor:
    """CoFi's initialisation: `log((1 - p) / p)` plus N(0, 0.01) noise."""
    mean = math.log(1.0 - droprate) - math.log(droprate)
    return torch.randn(size) * 1e-2 + mean


class HardConcreteGate(nn.Module):
    """A tensor of independent hard-concrete gates with learnable logits.

    Args:
        shape (`tuple[int, ...]`): gate tensor shape, e.g. `(num_layers, num_heads)`; the deterministic mask keeps the
            expected number per row (last dimension).
        droprate (`float`): initial drop rate.
    """

    def __init__(self, shape: tuple[int, ...], droprate: float = 0.5):
        super().__init__()
        self.log_alpha = nn.Parameter(init_log_alpha(tuple(shape), droprate))

    def forward(self, deterministic: bool = False) -> torch.Tensor:
        return deterministic_gates(self.log_alpha) if deterministic else sample_gates(self.log_alpha)

    def keep_probability(self) -> torch.Tensor:
        return keep_probability(self.log_alpha)
