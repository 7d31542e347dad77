"""When the pattern moves, and by how much: update steps and the pruning-ratio decay."""

from __future__ import annotations

import logging
import math

from .config import DynSparseConfig

logger = logging.getLogger(__name__)


class UpdateSchedule:
    """Pattern-update steps and pruning ratios for a run of `total_steps` optimizer steps.

    Steps count optimizer steps that actually happened, from 1. With `num_updates = n` the n updates sit evenly
    inside the stretch `[update_start·T, update_end·T]` (at start + k·span/(n+1), k = 1..n, so that neither end of
    training is an update); with `update_interval = k` they happen every k steps inside the stretch.

    Args:
        config ([`DynSparseConfig`]): the method config.
        total_steps (`int`): total optimizer steps T of the run.
    """

    def __init__(self, config: DynSparseConfig, total_steps: int):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"DynSparse needs the total number of optimizer steps (>= 1), got {total_steps!r}")
        self.config = config
        self.total_steps = total_steps
        start = round(config.update_start * total_steps)
        end = round(config.update_end * total_steps)
        n = config.resolved_num_updates
        if n is not None:
            steps = sorted({start + (k * (end - start)) // (n + 1) for k in range(1, n + 1)})
            steps = [s for s in steps if start < s < max(end, start + 1) and s >= 1]
            if len(steps) < n:
                logger.warning(
                    "DynSparse: %d pattern updates requested but the update stretch has only %d steps; "
                    "doing %d updates",
                    n, end - start, len(steps),
                )
        else:
            steps = list(range(start + config.update_interval, end, config.update_interval))
        self.update_steps: list[int] = steps
        self._update_set = set(steps)

    def is_update_step(self, step: int) -> bool:
        """Whether the pattern is updated right after optimizer step `step` (1-based)."""
        return step in self._update_set

    def pruning_ratio(self, step: int) -> float:
        """pr(t): the fraction of active blocks replaced by an update at step t."""
        pr = float(self.config.pruning_ratio)
        if self.config.pruning_ratio_decay == "constant":
            return pr
        return pr * 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))
