"""Wanda layer solver: mask from |W|·||x||, weights otherwise unchanged."""

from __future__ import annotations

import torch

from ...oneshot.masks import select_mask
from ...oneshot.solver import LayerSolver, LayerTask, register_solver
from .config import WandaConfig


@register_solver(WandaConfig)
class WandaSolver(LayerSolver):
    full_gram = False

    def solve(self, task: LayerTask) -> torch.Tensor:
        scores = task.weight.abs() * task.stats.column_sq_norms.sqrt()[None, :]
        return task.weight * select_mask(scores, task.sparsity, task.n_m, self.config.mask_group)
