"""ADMM one-shot pruning with gradual mask selection (Boža, 2024)."""

from .config import ADMMConfig
from .solver import ADMMSolver

__all__ = ["ADMMConfig", "ADMMSolver"]
