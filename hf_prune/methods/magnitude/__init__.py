"""Magnitude pruning baseline."""

from .config import MagnitudeConfig
from .solver import MagnitudeSolver

__all__ = ["MagnitudeConfig", "MagnitudeSolver"]
