"""`attach`: DynSparse in a plain (accelerate) training loop."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ...config import PruningConfig
from ...state import set_pruning_state
from .config import DynSparseConfig
from .updater import DynSparseUpdater


def _unwrap_model(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return getattr(model, "_orig_mod", model)  # torch.compile


class DynSparseHook:
    """The object returned by [`attach`]. Call `step()` after every `optimizer.step()`.

    It counts only optimizer steps that really happened: with an optimizer bound it watches the optimizer's own step
    hooks, so gradient-accumulation micro-steps (`accelerator.sync_gradients` false: accelerate does not step) and
    steps skipped by fp16 grad scaling do not advance the schedule. It has `state_dict`/`load_state_dict`, so
    `accelerator.register_for_checkpointing(hook)` makes `save_state`/`load_state` resume exactly.
    """

    def __init__(self, updater: DynSparseUpdater, accelerator: Any = None):
        self.updater = updater
        self.accelerator = accelerator

    @property
    def config(self) -> DynSparseConfig:
        return self.updater.config

    def step(self) -> bool:
        """Re-masks the weights after an optimizer step and updates the pattern when due. Returns whether it did."""
        stepped = None
        if self.updater.optimizer is None and self.accelerator is not None:
            stepped = bool(self.accelerator.sync_gradients) and not self.accelerator.optimizer_step_was_skipped
        return self.updater.after_optimizer_step(stepped)

    def metrics(self) -> dict[str, float]:
        return self.updater.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updater.load_state_dict(state)
        self.updater.apply_masks()

    def save(self, directory: str | os.PathLike) -> str:
        return self.updater.save(directory)

    def load(self, directory: str | os.PathLike) -> None:
        self.updater.load(directory)
        self.updater.apply_masks()

    def finalize(self) -> nn.Module:
        """Removes the hooks and attaches the `PruningState` (for the export path). Returns the model."""
        self.updater.unbind()
        set_pruning_state(self.updater.model, self.updater.pruning_state())
        return self.updater.model


def attach(
    model: nn.Module,
    config: PruningConfig,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    total_steps: int,
    accelerator: Any = None,
) -> DynSparseHook:
    """Makes `model` always-sparse for a plain training loop.

    ```python
    pruner = hf_prune.attach(model, DynSparseConfig(sparsity=0.9, block_size=16), optimizer=opt, total_steps=T)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss); opt.step(); pruner.step(); opt.zero_grad()
    model = pruner.finalize()
    ```

    Args:
        model (`nn.Module`): the model (DDP / compiled wrappers are unwrapped). Its selected weights are masked now.
        config ([`DynSparseConfig`]): the method config.
        optimizer (`torch.optim.Optimizer`, *optional*): the optimizer (accelerate's wrapper is fine). Needed to zero
            the optimizer moments of regrown weights, to detect skipped steps, and for gradient regrowth.
        total_steps (`int`): optimizer steps of the whole run (the schedule and the cosine decay span it).
        accelerator (`accelerate.Accelerator`, *optional*): only used without an optimizer, to skip accumulation
            micro-steps and fp16-skipped steps.
    """
    if not isinstance(config, DynSparseConfig):
        raise TypeError(
            f"hf_prune.attach supports DynSparseConfig (training-time sparse methods), got {type(config).__name__}"
        )
    if total_steps is None:
        raise ValueError("attach(..., total_steps=N) is required: the update schedule spans the whole run")
    updater = DynSparseUpdater(_unwrap_model(model), config)
    updater.bind(optimizer, total_steps)
    updater.apply_masks()
    return DynSparseHook(updater, accelerator)
