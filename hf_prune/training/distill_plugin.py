"""Logit distillation as a `TrainingPlugin`: what `PruningTrainer` runs with a teacher and `pruning_config=None`."""

from __future__ import annotations

from typing import Any

import torch

from .distill_config import DistillationConfig
from .distill_losses import hidden_state_loss, token_prediction_loss
from .plugin import TrainingPlugin, merged_if_peft


def output_vocab_size(model) -> int | None:
    """Rows of the model's output (LM head) layer, else `config.vocab_size`: the size of its next-token logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def check_vocab(student_vocab, teacher_vocab) -> None:
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"the teacher's vocabulary has {teacher_vocab} entries but the student's {student_vocab}: logit distillation "
            "compares the two next-token distributions entry by entry, so teacher and student must share the tokenizer "
            "and vocabulary (prune the student from the teacher, or resize the embeddings to the same tokenizer)"
        )


def check_teacher(model, teacher_model) -> None:
    """Refuses a teacher that is the student, or shares parameters with it (it would be trained along), before any
    work; the vocabulary check is [`check_vocab`]'s."""
    if teacher_model is model:
        raise ValueError("teacher_model is the student model itself; distil from a separate, frozen model (e.g. keep "
                         "the dense model and prune or build the student from a copy.deepcopy of it)")
    student_params = {p.data_ptr() for p in model.parameters() if p.device.type != "meta"}
    shared = [n for n, p in teacher_model.named_parameters() if p.device.type != "meta" and p.data_ptr() in student_params]
    if shared:
        raise ValueError(f"teacher_model shares {len(shared)} parameter tensor(s) with the student (e.g. {shared[0]}); "
                         "the teacher must be a separate copy, or training the student would change it too")


class DistillationPlugin(TrainingPlugin):
    """Adds `KL(teacher || student)` on the next-token logits (and optionally a hidden-state MSE) to the loss; see
    [`DistillationConfig`]. Stateless: a checkpoint needs nothing beyond the `Trainer`'s own (the teacher is fixed).

    Args:
        config ([`DistillationConfig`]), model: the student (a causal LM); teacher_model: the dense teacher.
    """

    supports_teacher = True

    def __init__(self, config: DistillationConfig, model, teacher_model=None, **kwargs: Any):
        super().__init__(config, model)
        if teacher_model is None:
            raise ValueError("distillation needs a teacher_model")
        check_teacher(model, teacher_model)
        check_vocab(output_vocab_size(model), output_vocab_size(teacher_model))
        if config.hidden_state_weight > 0:
            s_hidden = getattr(model.config, "hidden_size", None)
            t_hidden = getattr(teacher_model.config, "hidden_size", None)
            if s_hidden != t_hidden:
                raise ValueError(
                    f"DistillationConfig.hidden_state_weight={config.hidden_state_weight} compares hidden states, but "
                    f"the student's hidden_size is {s_hidden} and the teacher's {t_hidden}; use logit distillation "
                    "alone (hidden_state_weight=0) for a student with pruned hidden channels"
                )

    def forward_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True} if self.config.hidden_state_weight > 0 else {}

    def teacher_forward_kwargs(self) -> dict[str, Any]:
        return {**self.forward_kwargs(), "use_cache": False}

    def compute_loss(self, model, inputs, outputs, loss, teacher_outputs=None, term_scale: float = 1.0, **kwargs):
        cfg: DistillationConfig = self.config
        mask = inputs.get("attention_mask")
        kd = token_prediction_loss(outputs.logits, teacher_outputs.logits, cfg.temperature, mask)
        logs = {"kd_loss": float(kd.detach())}
        # `kd` (a per-micro-batch mean) is scaled by `term_scale`; `loss` is already normalised by the Trainer's rule
        total = term_scale * cfg.alpha * kd
        if loss is not None:
            logs["lm_loss"] = float(loss.detach()) / term_scale  # per-token mean, whatever the accumulation
        if cfg.alpha < 1:
            if loss is None:
                raise ValueError(f"DistillationConfig.alpha={cfg.alpha} mixes in the student's LM loss, but the batch "
                                 "has no `labels`; add labels (e.g. labels = input_ids) or use alpha=1")
            total = total + (1 - cfg.alpha) * loss
        if cfg.hidden_state_weight > 0:
            hs = hidden_state_loss(outputs.hidden_states, teacher_outputs.hidden_states, mask)
            logs["hidden_state_loss"] = float(hs.detach())
            total = total + term_scale * cfg.hidden_state_weight * hs
        return total, logs

    def export(self, model):
        return merged_if_peft(model)
