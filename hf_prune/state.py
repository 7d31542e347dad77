"""What a pruned model carries about its pruning: the contract between the methods and the export path.

Every method, once it has pruned a model, records a `PruningState` on it with [`set_pruning_state`]. The export code
(compressed save, model card, push) reads it back with [`get_pruning_state`]; it never needs to know the algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
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
        history: the earlier pruning runs of a model pruned more than once (`oneshot(..., allow_repruning=True)`),
            oldest first, each `{"config", "layout", "sparsity", "metrics", "command"}` as it was recorded after
            that run (`sparsity`: the overall sparsity of its pruned modules then). `config`, `layout` and
            `metrics` above are the last run's; `module_sparsity` is measured on the final weights, every run's
            modules included. Empty for a model pruned once.
    """

    config: PruningConfig
    layout: str
    module_sparsity: dict[str, float] = field(default_factory=dict)
    module_numel: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    command: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def run_record(self) -> dict[str, Any]:
        """This run as an entry of a later run's `history`."""
        return {
            "config": self.config.to_dict(),
            "layout": self.layout,
            "sparsity": round(self.overall_sparsity, 6),
            "metrics": dict(self.metrics),
            "command": self.command,
        }

    @property
    def overall_sparsity(self) -> float:
        """Zero fraction over all pruned modules, weighted by module size when `module_numel` is known."""
        if not self.module_sparsity:
            return 0.0
        if set(self.module_numel) >= set(self.module_sparsity):
            total = sum(self.module_numel[n] for n in self.module_sparsity)
            return sum(s * self.module_numel[n] for n, s in self.module_sparsity.items()) / total
        return sum(self.module_sparsity.values()) / len(self.module_sparsity)


# Export hook: what makes a pruned model save (and push) in the compressed format with its model card. The export
# (`hf_prune.export.save`, imported with `hf_prune`) registers it; this module, below the export, does not import it.
_export_hooks: list[Callable[[torch.nn.Module, PruningState], None]] = []


def register_export_hook(hook: Callable[[torch.nn.Module, PruningState], None]) -> None:
    """Sets the function [`set_pruning_state`] calls with `(model, state)` once the state is recorded."""
    _export_hooks[:] = [hook]


def set_pruning_state(model: torch.nn.Module, state: PruningState) -> None:
    # A plain attribute: nn.Module stores non-tensor attributes in __dict__, so it does not enter the state dict.
    setattr(model, _ATTR, state)
    for hook in _export_hooks:
        hook(model, state)


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


# A model in the middle of training-time pruning (CoFi gates attached, DynSparse masks bound) carries the method's
# name here, so that nothing else prunes or re-masks it meanwhile.
_TRAINING_METHOD_ATTR = "hf_prune_training_method"


def mark_training(model: torch.nn.Module, method: str | None) -> None:
    """Records that `method` is pruning `model` during training now (None: no longer)."""
    model = getattr(model, "module", model)  # DDP
    if method is None:
        model.__dict__.pop(_TRAINING_METHOD_ATTR, None)
    else:
        setattr(model, _TRAINING_METHOD_ATTR, method)


def training_method(model: torch.nn.Module) -> str | None:
    """The training-time method pruning `model` now, if any."""
    return getattr(getattr(model, "module", model), _TRAINING_METHOD_ATTR, None)


def refuse_mid_training(model: torch.nn.Module, what: str, advice: str, allow: tuple[str, ...] = ()) -> None:
    """Raises when a training-time method (other than those in `allow`) is pruning `model` now."""
    method = training_method(model)
    if method is not None and method not in allow:
        raise ValueError(
            f"{what} got a model in the middle of {method} training-time pruning (its gates or masks are attached "
            f"and would undo or fight it). {advice}"
        )


def adapter_layer_names(model: torch.nn.Module) -> list[str]:
    """Names of the peft adapter layers (LoRA and the other tuners) inside `model`; empty without peft imported."""
    import sys

    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def refuse_adapter_model(model: torch.nn.Module, what: str) -> None:
    """Raises when `model` is a peft model or holds adapter layers: `what` would prune the adapters' own matrices
    (lora_A / lora_B) along with the base weights, and a later merge would fill the pruned entries."""
    import sys

    is_peft = "peft" in sys.modules and isinstance(model, sys.modules["peft"].PeftModel)
    layers = [] if is_peft else adapter_layer_names(model)
    if not is_peft and not layers:
        return
    found = f"a peft {type(model).__name__}" if is_peft else f"a model with peft adapter layers ({layers[0]}, ...)"
    raise ValueError(
        f"{what} got {found}: it would prune the adapters' own matrices (lora_A, lora_B) and record a sparsity that "
        "merging the adapters undoes. Prune the base model before wrapping it (then hf_prune.get_sparse_peft_model "
        "keeps its mask while the adapters train), or merge the adapters first (model = peft_model.merge_and_unload())"
    )
