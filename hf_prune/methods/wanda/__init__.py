"""Wanda: pruning by weights and activations (Sun et al., 2023)."""

from .config import WandaConfig
from .solver import WandaSolver

__all__ = ["WandaConfig", "WandaSolver"]
