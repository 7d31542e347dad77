"""CoFi's distillation losses: prediction KL and layer-wise MSE with a dynamic, order-constrained layer matching."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def default_teacher_layers(num_layers: int) -> list[int]:
    """Every ceil(L/4)-th teacher layer, ending at the top (1-based): 12 layers -> [3, 6, 9, 12], 6 -> [2, 4, 6]."""
    step = max(1, math.ceil(num_layers / 4))
    return list(range(num_layers, 0, -step))[::-1]


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`KL(p_teacher || p_student)` on temperature-softened distributions, times T^2."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    p_t = F.softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * t * t


def token_prediction_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal LMs: `KL(p_teacher || p_student)` of the next-token distributions, averaged over the (non-padding)
    positions, times T^2. `batchmean` over a `(batch, seq, vocab)` tensor would sum over the positions instead."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if attention_mask is None:
        return per_token.mean() * t * t
    w = attention_mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1) * t * t


def layer_costs(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    transform: nn.Module | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`cost[i, j] = MSE(W h_student[j], h_teacher[i])` over non-padding tokens, shape (teachers, students)."""
    weight = None
    if attention_mask is not None:
        weight = attention_mask.to(student_hidden[0].dtype).unsqueeze(-1)
    rows = []
    for th in teacher_hidden:
        row = []
        for sh in student_hidden:
            diff = (transform(sh) if transform is not None else sh) - th
            sq = diff.float().pow(2)
            if weight is None:
                row.append(sq.mean())
            else:
                row.append((sq * weight).sum() / (weight.sum() * sq.shape[-1]).clamp_min(1))
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
