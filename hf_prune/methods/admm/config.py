"""Configuration of ADMM pruning with gradual mask selection (Boža, 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import check_choice, check_positive_int, check_positive_number, register_pruning_method
from ...oneshot.config import OneShotConfig


@register_pruning_method("admm")
@dataclass(kw_only=True)
class ADMMConfig(OneShotConfig):
    """ADMM layer-wise weight update with gradual mask selection.

    Each layer's weight is updated to reconstruct its dense outputs on the calibration inputs under the sparsity
    constraint, by ADMM; during the first `mask_iterations` iterations the mask is re-chosen from the current
    iterate at a sparsity that ramps up to the target.

    Args:
        iterations (`int`, defaults to 20): ADMM iterations T.
        mask_iterations (`int`, defaults to 15): iterations K during which the mask is re-selected (K <= T).
        mask_schedule (`str`, defaults to `"cubic"`): sparsity ramp while selecting, s_t = s·(1-(1-(t+1)/K)^3)
            (`"cubic"`), s·(t+1)/K (`"linear"`) or s throughout (`"constant"`).
        rho (`float`, defaults to 1.0): ADMM penalty ρ.
        damping (`float`, defaults to 0.1): ridge damping δ, relative to the mean of the normalised Gram diagonal.
        mask_group (`str`, defaults to `"layer"`): rank weights over the whole layer or within each output row.
        mask_mode (`str`, defaults to `"gradual"`): `"gradual"` selects the mask; `"fixed"` only updates the
            dense weights for the masks given as `oneshot(..., masks={name: keep_mask})`, e.g. masks from another
            method, keeping their support exactly.
        matmul_precision (`str`, defaults to `"float32"`): `"bfloat16"` runs the matrix product of the
            mask-selection iterations in bfloat16 (several times faster on CPUs with AMX or AVX-512 BF16, and on
            GPUs); the iterations after the mask is fixed stay float32, so the result is the float32 iterate for its
            mask. Perplexity matches float32 within noise (see the README benchmark); results are not bit-equal.
            On a CPU without native bf16 (emulated there, ~10x slower) it runs in float32, with a warning.
    """

    iterations: int = 20
    mask_iterations: int = 15
    mask_schedule: str = "cubic"
    rho: float = 1.0
    damping: float = 0.1
    mask_group: str = "layer"
    mask_mode: str = "gradual"
    matmul_precision: str = "float32"

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_positive_int(owner, "iterations", self.iterations)
        check_positive_int(owner, "mask_iterations", self.mask_iterations, allow_zero=True)
        if self.mask_iterations > self.iterations:
            raise ValueError(
                f"{owner}.mask_iterations ({self.mask_iterations}) must be <= iterations ({self.iterations})"
            )
        check_choice(owner, "mask_schedule", self.mask_schedule, ("cubic", "linear", "constant"))
        check_positive_number(owner, "rho", self.rho)
        check_positive_number(owner, "damping", self.damping)
        check_choice(owner, "mask_group", self.mask_group, ("layer", "row"))
        check_choice(owner, "mask_mode", self.mask_mode, ("gradual", "fixed"))
        check_choice(owner, "matmul_precision", self.matmul_precision, ("float32", "bfloat16"))

    def sparsity_at(self, step: int, target: float) -> float:
        """Sparsity of the mask chosen at ADMM iteration `step` (< mask_iterations)."""
        k = self.mask_iterations
        if self.mask_schedule == "constant":
            return target
        progress = (step + 1) / k
        if self.mask_schedule == "linear":
            return target * progress
        return target * (1.0 - (1.0 - progress) ** 3)
