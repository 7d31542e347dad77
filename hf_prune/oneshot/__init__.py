"""One-shot pruning: calibration handling and the block-sequential runner shared by all one-shot methods."""

from .config import OneShotConfig
from .runner import oneshot
from .solver import LayerSolver, LayerStats, LayerTask, register_solver

__all__ = ["OneShotConfig", "oneshot", "LayerSolver", "LayerStats", "LayerTask", "register_solver"]
