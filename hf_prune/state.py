"""What a pruned model carries about its pruning: the contract between the methods and the export path.

Every method, once it has pruned a model, records a `PruningState` on it with [`set_pruning_state`]. The export code
(compressed save, model card, push) reads it back with [`get_pruning_state`]; it never needs to know the algorithm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import PruningConfig

_ATTR = "hf_prune_state"
_TRAINING_ATTR = "hf_prune_training_record"


@dataclass
class PruningState:
    """Pruning record attached to a model.

    Args:
        config: the method's config, as run.
        layout: how the pruned weights are structured: `"unstructured"`, `"N:M"` (e.g. `"2:4"`), `"block:RxC"`
            (e.g. `"block:16x16"`) or `"structured"` (units physically removed).
        module_sparsity: fraction of zero weights per pruned module, by qualified module name.
        module_numel: number of weights per pruned module (same keys), so overall sparsity can be size-weighted.
        metrics: measured facts about the run (wall time, perplexity before/after, ...), for the model card.
        base_model: name or path of the model before pruning, when known.
        command: code or shell command that reproduces the run, when known.
    """

    config: PruningConfig
    layout: str
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_numel: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    command: str | None = None

    @property
    def overall_sparsity(self) -> float:
        """Zero fraction over all pruned modules, weighted by module size when `module_numel` is known."""
        if not self.module_sparsity:
            return 0.0
        if set(self.module_numel) >= set(self.module_sparsity):
            total = sum(self.module_numel[n] for n in self.module_sparsity)
            return sum(s * self.module_numel[n] for n, s in self.module_sparsity.items()) / total
        return sum(self.module_sparsity.values()) / len(self.module_sparsity)


def set_pruning_state(model: torch.nn.Module, state: PruningState) -> None:
    # A plain attribute: nn.Module stores non-tensor attributes in __dict__, so it does not enter the state dict.
    setattr(model, _ATTR, state)
    # Export hook: a pruned transformers model saves (and pushes) in the compressed format with its model card.
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        from .export.save import enable_compressed_save

        enable_compressed_save(model, state)


def get_pruning_state(model: torch.nn.Module) -> PruningState | None:
    return getattr(model, _ATTR, None)


def record_training(model: torch.nn.Module, metrics: dict[str, Any]) -> None:
    """Adds a training run's facts (e.g. distillation) to the model's record: its `PruningState.metrics` when it has
    one (the pruned model card lists them), else a plain record that `save_pruned` writes into the card of a plain,
    unpruned model (saved dense, with its own config)."""
    state = get_pruning_state(model)
    if state is not None:
        state.metrics.update(metrics)
    else:
        model.__dict__.setdefault(_TRAINING_ATTR, {}).update(metrics)


def get_training_record(model: torch.nn.Module) -> dict[str, Any]:
    """The plain record [`record_training`] keeps on a model without `PruningState` (empty when none)."""
    return dict(model.__dict__.get(_TRAINING_ATTR, {}))
