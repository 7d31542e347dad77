"""Configuration of SparseGPT (Frantar & Alistarh, 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_positive_int, check_positive_number, register_pruning_method
from ...oneshot.config import OneShotConfig


@register_pruning_method("sparsegpt")
@dataclass(kw_only=True)
class SparseGPTConfig(OneShotConfig):
    """SparseGPT: column-by-column OBS weight updates with adaptive mask selection per column block.

    Args:
        damping (`float`, defaults to 0.01): dampening added to the Hessian diagonal, relative to its mean.
        block_size (`int`, defaults to 128): columns per lazy-update block (mask selected per block).
    """

    damping: float = 0.01
    block_size: int = 128

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_positive_number(owner, "damping", self.damping)
        check_positive_int(owner, "block_size", self.block_size)
        nm = self.n_m
        if nm is not None and self.block_size % nm[1]:
            raise ValueError(f"{owner}.block_size ({self.block_size}) must be a multiple of M={nm[1]} for N:M")
