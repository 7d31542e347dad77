"""The contract between `PruningTrainer` (which knows `Trainer`) and a method (which knows its maths).

A training-time method registers a `TrainingPlugin` subclass for its config class. `PruningTrainer`, the stock-
`Trainer` callback and the `accelerate` hook look the plugin up by config type and call only these methods, so the
Trainer layer never imports a method's internals.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import PruningConfig

_PLUGINS: dict[type[PruningConfig], type["TrainingPlugin"]] = {}


class TrainingPlugin:
    """Method behaviour inside a training loop. Every hook has a do-nothing default.

    `PruningTrainer` builds the plugin with `plugin_cls(config, model, teacher_model=...)` before wrapping the model,
    so a plugin may add modules or hooks to the model in `__init__`.
    """

    #: whether the method distils from a `teacher_model`; `PruningTrainer` refuses a teacher otherwise.
    supports_teacher: bool = False

    def __init__(self, config: PruningConfig, model: torch.nn.Module, **kwargs: Any):
        self.config = config
        self.model = model

    def forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the student's forward in training steps (e.g. `output_hidden_states=True`)."""
        return {}

    def teacher_forward_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the teacher's forward (run without gradients, in eval mode)."""
        return {}

    def callbacks(self) -> list:
        """`transformers.TrainerCallback`s the trainer should add (e.g. periodic mask updates)."""
        return []

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups owned by the method (e.g. gate logits with their own learning rate).

        Their parameters are left out of the trainer's default groups. A group with `"hf_prune_constant_lr": True`
        keeps its learning rate constant instead of following the trainer's scheduler.
        """
        return []

    def unsynced_module_names(self) -> list[str]:
        """Names (in `model.named_modules()`) of submodules the method uses outside the model's forward.

        DDP cannot reduce the gradients of a parameter the loss reads outside `forward` (it marks it ready twice), so
        `PruningTrainer` keeps these submodules' parameters and buffers out of DDP, broadcasts them from rank 0 when
        training starts and averages their gradients across processes itself, before gradient clipping.
        """
        return []

    def compute_loss(self, model, inputs, outputs, loss, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
        """Returns the (possibly augmented) training loss and scalars to log.

        `kwargs` holds `teacher_outputs` when the trainer has a teacher (only for plugins with `supports_teacher`),
        and `term_scale`: the factor to multiply the method's own terms by (not `loss`, the model's), which is
        `1 / gradient_accumulation_steps` when `Trainer` leaves the loss undivided because the model normalised its
        own over the accumulated batch (causal LMs), else 1.
        """
        return loss, {}

    def state_dict(self) -> dict[str, Any]:
        """Method state saved with each checkpoint so that resuming continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """The final model (e.g. physically shrunk), with its `PruningState` attached."""
        return model


def is_peft_model(model) -> bool:
    from transformers.utils import is_peft_available

    if not is_peft_available():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged_if_peft(model):
    """A peft model merged into its base (`merge_and_unload`), any other model as it is: what plugins without their
    own export return (e.g. masked-LoRA recovery keeps its mask through the merge)."""
    return model.merge_and_unload() if is_peft_model(model) else model


def register_training_plugin(config_cls: type[PruningConfig]):
    """Class decorator: `@register_training_plugin(MyConfig)` on a `TrainingPlugin` subclass."""

    def decorator(plugin_cls: type[TrainingPlugin]) -> type[TrainingPlugin]:
        _PLUGINS[config_cls] = plugin_cls
        return plugin_cls

    return decorator


def get_training_plugin_class(config: PruningConfig) -> type[TrainingPlugin]:
    config.validate()  # again: lists may have been changed in place since construction
    for cls in type(config).__mro__:
        if cls in _PLUGINS:
            return _PLUGINS[cls]
    raise ValueError(
        f"{type(config).__name__} (method {config.method!r}) is not a training-time pruning method; "
        f"training methods: {sorted(c.method for c in _PLUGINS)}. One-shot methods run through hf_prune.oneshot()."
    )
