"""What both physical-removal paths use (`prune.py` for encoders, `prune_decoder.py` for decoders): the surviving
units of the final masks, and loading the pruned weights into the smaller model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def kept_units(masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Indices of surviving head units (heads; KV groups for decoders) / neurons per layer and of surviving hidden
    dims (non-zero effective gates, the decoder layer gate included)."""
    whole = masks.get("layer", torch.ones_like(masks["mha"]))
    heads = masks["head"] * (masks["mha"] * whole).unsqueeze(-1)
    neurons = masks["neuron"] * (masks["ffn"] * whole).unsqueeze(-1)
    return {
        "heads": [torch.nonzero(h, as_tuple=True)[0].tolist() for h in heads],
        "neurons": [torch.nonzero(n, as_tuple=True)[0].tolist() for n in neurons],
        "hidden": torch.nonzero(masks["hidden"], as_tuple=True)[0].tolist(),
    }


def load_pruned_weights(small: nn.Module, sd: dict) -> None:
    """Loads the pruned weights `sd` into the freshly built small model, refusing any key or shape mismatch."""
    small_sd = small.state_dict()
    missing = sorted(set(small_sd) - set(sd))
    extra = sorted(set(sd) - set(small_sd))
    if missing or extra:
        raise RuntimeError(f"CoFi export: state dict mismatch (missing {missing[:5]}, unexpected {extra[:5]})")
    for k, v in sd.items():
        if small_sd[k].shape != v.shape:
            raise RuntimeError(f"CoFi export: {k} has shape {tuple(v.shape)}, structure expects {tuple(small_sd[k].shape)}")
    small.load_state_dict(sd, strict=True)
    small.eval()
