"""The two passes of a block over the calibration batches: collecting layer statistics, and advancing to outputs."""

from __future__ import annotations

from torch import nn

from .blocks import BlockInputs, in_features, linear_weight_view, run_block
from .plan import LayerPlan
from .solver import LayerStats


def collect_stats(block: nn.Module, entries: list[LayerPlan], inputs: BlockInputs, full_gram: bool):
    """Runs the block on every calibration batch, accumulating each target layer's input statistics."""
    stats = {e.name: LayerStats(in_features(e.module), linear_weight_view(e.module).device, full_gram) for e in entries}
    hooks = [
        e.module.register_forward_hook(lambda mod, args, out, s=stats[e.name]: s.add(args[0])) for e in entries
    ]
    try:
        for hidden, extra, kwargs in zip(inputs.hidden, inputs.extra_args, inputs.kwargs):
            run_block(block, hidden, extra, kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    for name, s in stats.items():
        s.check_finite(name)
    return stats


def advance(block: nn.Module, inputs: BlockInputs) -> None:
    """Replaces the stored hidden states by this block's outputs: the next block's inputs."""
    for i, (hidden, extra, kwargs) in enumerate(zip(inputs.hidden, inputs.extra_args, inputs.kwargs)):
        inputs.hidden[i] = run_block(block, hidden, extra, kwargs)
