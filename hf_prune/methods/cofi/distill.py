"""CoFi's distillation losses: prediction KL and layer-wise MSE with a dynamic, order-constrained layer matching."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...training.distill_losses import hidden_mse, prediction_loss, token_prediction_loss  # noqa: F401  (re-exported)


def default_teacher_layers(num_layers: int) -> list[int]:
    """Every ceil(L/4)-th teacher layer, ending at the top (1-based): 12 layers -> [3, 6, 9, 12], 6 -> [2, 4, 6]."""
    step = max(1, math.ceil(num_layers / 4))
    return list(range(num_layers, 0, -step))[::-1]


def layer_costs(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    transform: nn.Module | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cost[i, j] = MSE(W h_student[j], h_teacher[i])` over non-padding tokens, shape (teachers, students)."""
    rows = []
    for th in teacher_hidden:
        row = [hidden_mse(transform(sh) if transform is not None else sh, th, attention_mask) for sh in student_hidden]
        rows.append(torch.stack(row))
    return torch.stack(rows)


def match_layers(costs: torch.Tensor, available: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """Order-constrained matching, from the top teacher layer down.

    Each teacher layer i (last first) is matched to the available student layer with the lowest cost among those
    strictly below the student layer matched to the teacher layer above it; teacher layers with no candidate left
    are not matched. Returns (teacher_index, student_index) pairs, top first.
    """
    costs = costs.detach()
    n_t, n_s = costs.shape
    avail = torch.ones(n_s, dtype=torch.bool) if available is None else available.detach().bool().cpu()
    upper = n_s
    pairs = []
    for i in range(n_t - 1, -1, -1):
        candidates = [j for j in range(upper) if avail[j]]
        if not candidates:
            break
        j = min(candidates, key=lambda c: float(costs[i, c]))
        pairs.append((i, j))
        upper = j
    return pairs


def layer_loss(costs: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    if not pairs:
        return costs.sum() * 0.0
    return torch.stack([costs[i, j] for i, j in pairs]).sum()
