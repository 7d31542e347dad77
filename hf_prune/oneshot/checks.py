"""Checks a model passes before one-shot pruning touches it, used by the runner and by the offloaded checkpoint
(which checks each block as it is loaded)."""

from __future__ import annotations

import torch
from torch import nn


def check_finite_parameters(model: nn.Module, prefix: str = "") -> None:
    """Refuses a model with NaN or inf in any floating-point parameter or buffer, before any layer is touched: the
    methods would otherwise prune around it (magnitude, Wanda) or fail half-way with unrelated advice (ADMM).
    (An offloaded run checks each block as it is loaded; nothing reaches the output directory before the end.)"""
    bad = []
    for name, tensor in [*model.named_parameters(prefix=prefix), *model.named_buffers(prefix=prefix)]:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()})")
    if bad:
        raise ValueError(
            f"the model has non-finite (NaN or inf) values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + ". Nothing was pruned; check how the model was loaded or trained (e.g. fp16 overflow) first."
        )
