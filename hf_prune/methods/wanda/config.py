"""Configuration of Wanda: prune by |weight| × input-activation norm (Sun et al., 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, register_pruning_method
from ...oneshot.config import OneShotConfig


@register_pruning_method("wanda")
@dataclass(kw_only=True)
class WandaConfig(OneShotConfig):
    """Wanda: score |W_ij|·||X_j||₂, no weight update.

    Args:
        mask_group (`str`, defaults to `"row"`): compare scores within each output row (the paper's choice for LLMs)
            or over the whole layer.
    """

    mask_group: str = "row"

    def validate(self) -> None:
        super().validate()
        check_choice(type(self).__name__, "mask_group", self.mask_group, ("layer", "row"))
