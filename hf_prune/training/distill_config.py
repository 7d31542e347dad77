"""`DistillationConfig`: the knobs of logit distillation from a dense teacher into a (smaller) student."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class DistillationConfig:
    """How [`PruningTrainer`] distils when it gets a `teacher_model` and no pruning method (`pruning_config=None`).

    The training loss is `alpha * KD + (1 - alpha) * LM + hidden_state_weight * HS`, where `KD` is
    `KL(p_teacher || p_student)` of the next-token distributions at `temperature`, times T^2, averaged over the
    non-padding positions; `LM` the student's own next-token cross-entropy on the batch's `labels`; `HS` the optional
    hidden-state MSE. The defaults are logit distillation alone with the plain forward KL (T = 1, no LM loss), as in
    the Minitron approach (Sreenivas et al., 2024, arXiv:2408.11796).

    A separate dataclass rather than fields of a `TrainingArguments` subclass, so that stock `TrainingArguments` (and
    any script's own subclass) keep working unchanged, and the same object configures `PruningTrainer`,
    `hf_prune.distill` and the `hf-prune distill` command. It is not a `PruningConfig`: distillation removes nothing.

    Args:
        temperature (`float`, defaults to 1.0): softmax temperature of both distributions (> 0); the KL is scaled by
            T^2 so that its gradient keeps its size across temperatures.
        alpha (`float`, defaults to 1.0): weight of the distillation term, in [0, 1]; the student's own LM loss on
            `labels` gets `1 - alpha` (so a batch needs `labels` only when `alpha < 1`).
        hidden_state_weight (`float`, defaults to 0.0): weight of an intermediate-state loss, off by default: the
            MSE between student and teacher hidden states, student layer k matched with teacher layer
            round(k * L_teacher / L_student) (the last layers meet), averaged over the layers and non-padding tokens.
            Needs equal `hidden_size` (depth- or FFN-pruned students); a width-pruned student is refused.
    """

    temperature: float = 1.0
    alpha: float = 1.0
    hidden_state_weight: float = 0.0

    def __post_init__(self):
        for name in ("temperature", "alpha", "hidden_state_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"DistillationConfig.{name} must be a finite number, got {value!r}")
        if self.temperature <= 0:
            raise ValueError(f"DistillationConfig.temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillationConfig.alpha must be in [0, 1] (the weight of the distillation term; the "
                             f"LM loss gets 1 - alpha), got {self.alpha}")
        if self.hidden_state_weight < 0:
            raise ValueError(f"DistillationConfig.hidden_state_weight must be >= 0, got {self.hidden_state_weight}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
