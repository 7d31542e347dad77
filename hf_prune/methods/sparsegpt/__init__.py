"""SparseGPT (Frantar & Alistarh, 2023)."""

from .config import SparseGPTConfig
from .solver import SparseGPTSolver

__all__ = ["SparseGPTConfig", "SparseGPTSolver"]
