"""Per-layer shapes (`StructuredConfig(uniform=False)`): how many KV groups / FFN neurons each layer keeps.

The budget is the uniform target's total (`layers x kv_heads` groups, `layers x intermediate_size` neurons), so the
parameter count is exactly the uniform shape's; only its split over the layers changes. Units are ranked across
layers by their activation norm on the dense model (the Minitron scores of `importance`) divided by the mean score
of their layer's units. Why normalise: the residual stream's norm grows with depth, so raw norms would cut the early
layers first whatever they contribute; relative to its layer's mean, a unit's score says how much of its layer it
carries, and a layer whose activation is spread over many units keeps more of them than one where a few carry it.
Every layer keeps at least one of each (its highest-scoring unit), so no sublayer disappears.
"""

from __future__ import annotations

import torch


def allocate(scores: torch.Tensor, total: int) -> list[int]:
    """Units kept per layer (row of `scores`, `(layers, units)`): the `total` highest layer-mean-normalised scores,
    one per layer reserved. Sums to `total` exactly; `layers <= total <= scores.numel()`."""
    layers, units = scores.shape
    if not layers <= total <= layers * units:
        raise ValueError(f"cannot keep {total} units over {layers} layers of {units}")
    s = scores.float()
    s = s / s.mean(dim=1, keepdim=True).clamp_min(1e-30)
    reserved = torch.zeros_like(s, dtype=torch.bool)
    reserved[torch.arange(layers), s.argmax(dim=1)] = True
    rest = s.masked_fill(reserved, float("-inf")).flatten()
    chosen = torch.topk(rest, total - layers).indices if total > layers else rest.new_zeros(0, dtype=torch.long)
    counts = reserved.sum(dim=1)
    counts += torch.bincount(chosen // units, minlength=layers)
    return [int(c) for c in counts]
