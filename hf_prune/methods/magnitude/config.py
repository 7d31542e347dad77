"""Configuration of magnitude pruning, the calibration-free baseline."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, register_pruning_method
from ...oneshot.config import OneShotConfig


@register_pruning_method("magnitude")
@dataclass(kw_only=True)
class MagnitudeConfig(OneShotConfig):
    """Magnitude pruning: drop the smallest |W|. Needs no calibration data (unless `owl=True`).

    Args:
        mask_group (`str`, defaults to `"layer"`): rank over the whole layer or within each output row.
    """

    mask_group: str = "layer"
    needs_calibration = False

    def validate(self) -> None:
        super().validate()
        check_choice(type(self).__name__, "mask_group", self.mask_group, ("layer", "row"))
