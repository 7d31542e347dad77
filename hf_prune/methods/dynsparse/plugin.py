"""Registers DynSparse with `PruningTrainer` through the `TrainingPlugin` contract."""

from __future__ import annotations

from typing import Any

import torch

from ...state import set_pruning_state
from ...training.plugin import TrainingPlugin, register_training_plugin
from .callback import DynSparseCallback
from .config import DynSparseConfig
from .updater import DynSparseUpdater


@register_training_plugin(DynSparseConfig)
class DynSparsePlugin(TrainingPlugin):
    """DynSparse for `PruningTrainer(..., pruning_config=DynSparseConfig(...))`: one [`DynSparseCallback`] sharing
    this plugin's [`DynSparseUpdater`]; `state_dict` holds masks, RNG state and counters (the trainer checkpoints it,
    so the callback does not write its own copy)."""

    def __init__(self, config: DynSparseConfig, model: torch.nn.Module, **kwargs: Any):
        super().__init__(config, model, **kwargs)
        self.updater = DynSparseUpdater(model, config)
        self._callback = DynSparseCallback(updater=self.updater, save_state=False)

    def callbacks(self) -> list:
        return [self._callback]

    def state_dict(self) -> dict[str, Any]:
        return self.updater.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updater.load_state_dict(state)

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        self.updater.unbind()
        set_pruning_state(model, self.updater.pruning_state())
        return model
