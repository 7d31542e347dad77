"""Distillation losses shared by every method that distils (CoFi, plain logit distillation of a smaller student)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`KL(p_teacher || p_student)` on temperature-softened distributions, times T^2 (classifiers: one per row)."""
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
    positions, times T^2 (so that the gradient's size does not shrink with T, Hinton et al. 2015). `batchmean` over a
    `(batch, seq, vocab)` tensor would sum over the positions instead."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return masked_mean(per_token, attention_mask) * t * t


def masked_mean(values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of `values` (batch, seq, ...) over the positions where `attention_mask` is 1 (all without a mask)."""
    if attention_mask is None:
        return values.mean()
    w = attention_mask.to(values.dtype).reshape(*attention_mask.shape, *([1] * (values.dim() - attention_mask.dim())))
    per_position = values[0, 0].numel() if values.dim() > 2 else 1
    return (values * w).sum() / (w.sum() * per_position).clamp_min(1)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of two hidden-state tensors (batch, seq, hidden) over the non-padding positions."""
    return masked_mean((student.float() - teacher.float()).pow(2), attention_mask)


def proportional_layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into `hidden_states` (0 = embeddings): student layer k (1-based) is matched with
    teacher layer round(k * L_t / L_s), so the last layers meet and the others are spread evenly (the uniform
    mapping of DistilBERT / TinyBERT)."""
    return [(k, max(1, round(k * teacher_layers / student_layers))) for k in range(1, student_layers + 1)]


def hidden_state_loss(student_hidden, teacher_hidden, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the [`proportional_layer_pairs`] of the hidden-state MSE (both `hidden_states` tuples include the
    embeddings at index 0, as transformers returns them)."""
    pairs = proportional_layer_pairs(len(student_hidden) - 1, len(teacher_hidden) - 1)
    return torch.stack([hidden_mse(student_hidden[s], teacher_hidden[t], attention_mask) for s, t in pairs]).mean()
