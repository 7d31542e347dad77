"""The two passes of a block over the calibration batches: collecting layer statistics, and advancing to outputs."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import BlockInputs, in_features, linear_weight_view, run_block
from .plan import LayerPlan
from .solver import LayerStats


def collect_stats(
    block: nn.Module, entries: list[LayerPlan], inputs: BlockInputs, full_gram: bool, *, share_inputs: bool = True
) -> dict[str, LayerStats]:
    """Runs the block on every calibration batch, accumulating each target layer's input statistics.

    With `share_inputs`, layers that read the very same input tensor (q/k/v after the attention norm; gate/up after
    the MLP norm) share one `LayerStats` object: one Gram accumulation instead of three (or two), and solvers can
    reuse one factorisation for the group (they see the same object in `LayerTask.stats`). The grouping is found
    on the first batch (by tensor identity) and checked on every later one.
    """
    stats: dict[str, LayerStats] = {}
    shared_with: dict[str, str] = {}  # member -> the layer whose input (and statistics) it shares
    current: dict[str, torch.Tensor] = {}  # layer -> its input in the batch being run (owners of statistics only)
    first_batch = True

    def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
        if first_batch:
            owner = next((n for n, t in current.items() if t is x), None) if share_inputs else None
            if owner is not None:
                shared_with[name] = owner
                stats[name] = stats[owner]
                return
            stats[name] = LayerStats(in_features(module), linear_weight_view(module).device, full_gram)
        elif name in shared_with:
            if current.get(shared_with[name]) is not x:
                raise RuntimeError(
                    f"hf_prune one-shot: {name} read the same input as {shared_with[name]} on the first calibration "
                    "batch but not on a later one; the block's forward must not depend on the batch"
                )
            return
        stats[name].add(x)
        current[name] = x

    hooks = [
        e.module.register_forward_hook(lambda mod, args, out, name=e.name: record(name, mod, args[0])) for e in entries
    ]
    try:
        for hidden, extra, kwargs in zip(inputs.hidden, inputs.extra_args, inputs.kwargs):
            run_block(block, hidden, extra, kwargs)
            first_batch = False
            current.clear()
    finally:
        for handle in hooks:
            handle.remove()
    for name, s in stats.items():
        if name not in shared_with:
            s.check_finite(name)
    return stats


def advance(block: nn.Module, inputs: BlockInputs) -> None:
    """Replaces the stored hidden states by this block's outputs: the next block's inputs."""
    for i, (hidden, extra, kwargs) in enumerate(zip(inputs.hidden, inputs.extra_args, inputs.kwargs)):
        inputs.hidden[i] = run_block(block, hidden, extra, kwargs)
