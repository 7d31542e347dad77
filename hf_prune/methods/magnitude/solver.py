"""Magnitude layer solver."""

from __future__ import annotations

import torch

from ...oneshot.masks import select_mask
from ...oneshot.solver import LayerSolver, LayerTask, register_solver
from .config import MagnitudeConfig


@register_solver(MagnitudeConfig)
class MagnitudeSolver(LayerSolver):
    full_gram = False

    def solve(self, task: LayerTask) -> torch.Tensor:
        return task.weight * select_mask(task.weight.abs(), task.sparsity, task.n_m, self.config.mask_group)
