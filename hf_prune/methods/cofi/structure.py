"""The shape of a CoFi-pruned model, as data: what the export writes and what loading rebuilds.

`describe_structure(model)` reads a (pruned) model's per-layer kept heads, FFN width, removed sublayers and hidden
size from its modules into a JSON-able dict. `apply_structure(model, structure)` reshapes a freshly built dense model
of the original config (on any device, including `meta`) so that the pruned weights load into it. Both go through
the architecture adapter, so they are the only place that knows how a pruned BERT-family model is laid out. A
removed attention or FFN sublayer becomes a small stand-in module ([`RemovedAttention`], [`RemovedFFNOutput`]) with
the same parameter names, so the model stays of its stock class and its state dict keeps the stock keys.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .arch import get_adapter

FORMAT = "hf_prune.cofi.structure/1"


class EmptySelfAttention(nn.Module):
    """Stand-in for a self-attention module with every head removed: returns a 0-wide context.

    The output projection is then a `Linear(0, hidden)`, whose output is its bias (the folded, possibly zero, bias of
    the masked model), and the sublayer's LayerNorm still runs, exactly as in the masked model.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states[..., :0], None


class RemovedAttention(nn.Module):
    """An attention sublayer with every head removed: `LayerNorm(x + b)`, `b` the output projection's folded bias.

    Replaces the stock attention module (same `self` / `output` children, so the same state-dict keys) so that a
    removed sublayer costs one add and one LayerNorm at inference instead of the full module chain, which dominates
    batch-1 latency of a small pruned model. In training mode it runs the stock `output` module (dropout included).
    """

    def __init__(self, attention: nn.Module, head_dim: int):
        super().__init__()
        self.self = EmptySelfAttention(head_dim)
        self.output = attention.output

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.output
        if self.training:
            return out(hidden_states[..., :0], hidden_states), None
        bias = out.dense.bias
        return out.LayerNorm(hidden_states if bias is None else hidden_states + bias), None


class RemovedIntermediate(nn.Module):
    """FFN up projection with every neuron removed: a 0-wide activation (keeps the 0-row `dense` for its keys)."""

    def __init__(self, intermediate: nn.Module):
        super().__init__()
        self.dense = intermediate.dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


class RemovedFFNOutput(nn.Module):
    """FFN down projection + LayerNorm with every neuron removed: `LayerNorm(x + b)` (see [`RemovedAttention`])."""

    def __init__(self, output: nn.Module):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = output.dense, output.LayerNorm, output.dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.training:  # the stock computation on the 0-wide activation (dropout included)
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        bias = self.dense.bias
        return self.LayerNorm(input_tensor if bias is None else input_tensor + bias)


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """Per-layer kept heads / FFN width / removed sublayers and the hidden size, read from the model's modules."""
    ad = get_adapter(model)
    hidden = ad.embedding_layernorm().normalized_shape[0]
    layers = []
    for i in range(ad.dims.num_layers):
        heads = ad.attn_out(i).in_features // ad.dims.head_dim
        ffn = ad.ffn_up(i).out_features
        layers.append(
            {"heads": heads, "intermediate_size": ffn, "attention_removed": heads == 0, "ffn_removed": ffn == 0}
        )
    return structure_record(model, ad, int(hidden), layers)


def structure_record(model: nn.Module, ad, hidden_size: int, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """The structure dict stored in the checkpoint: the original dimensions plus what each layer keeps."""
    return {
        "format": FORMAT,
        "model_type": ad.model_type,
        "architecture": type(model).__name__,
        "original": {
            "hidden_size": ad.dims.hidden_size,
            "num_attention_heads": ad.dims.num_heads,
            "intermediate_size": ad.dims.intermediate_size,
            "num_hidden_layers": ad.dims.num_layers,
        },
        "hidden_size": hidden_size,
        "layers": layers,
    }


def _check(structure: dict[str, Any], ad) -> None:
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(f"Not a CoFi structure description (expected format {FORMAT!r}): {structure!r:.200}")
    if structure.get("model_type") != ad.model_type:
        raise ValueError(f"Structure is for model_type {structure.get('model_type')!r}, model is {ad.model_type!r}")
    layers = structure.get("layers", [])
    if len(layers) != ad.dims.num_layers:
        raise ValueError(f"Structure has {len(layers)} layers, the model {ad.dims.num_layers}")
    for i, spec in enumerate(layers):
        if not 0 <= spec["heads"] <= ad.dims.num_heads or not 0 <= spec["intermediate_size"] <= ad.dims.intermediate_size:
            raise ValueError(f"Structure layer {i} is larger than the original model: {spec}")
    if not 0 <= structure["hidden_size"] <= ad.dims.hidden_size:
        raise ValueError(f"Structure hidden_size {structure['hidden_size']} exceeds {ad.dims.hidden_size}")


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    with warnings.catch_warnings():  # a removed sublayer is a 0-wide Linear; its (no-op) init warns
        warnings.simplefilter("ignore")
        new = nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta")
    w = torch.empty(out_features, in_features, device=old.weight.device, dtype=old.weight.dtype)
    new.weight = nn.Parameter(w, requires_grad=old.weight.requires_grad)
    if old.bias is not None:
        new.bias = nn.Parameter(torch.empty(out_features, device=old.bias.device, dtype=old.bias.dtype))
    return new


def _layernorm(old: nn.LayerNorm, size: int) -> nn.LayerNorm:
    new = nn.LayerNorm(size, eps=old.eps, elementwise_affine=old.weight is not None, device="meta")
    if old.weight is not None:
        new.weight = nn.Parameter(torch.empty(size, device=old.weight.device, dtype=old.weight.dtype))
    if getattr(old, "bias", None) is not None:
        new.bias = nn.Parameter(torch.empty(size, device=old.bias.device, dtype=old.bias.dtype))
    return new


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Reshapes `model` (a dense model of the original config) in place to `structure`; weights are left empty.

    Works on the `meta` device (as inside `from_pretrained`); load the pruned state dict afterwards.
    """
    ad = get_adapter(model)
    _check(structure, ad)
    d = int(structure["hidden_size"])
    dh = ad.dims.head_dim
    emb = ad.base.embeddings
    for name, table in ad.embedding_tables().items():
        new = nn.Embedding(table.num_embeddings, d, padding_idx=table.padding_idx, device="meta")
        new.weight = nn.Parameter(torch.empty(table.num_embeddings, d, device=table.weight.device, dtype=table.weight.dtype))
        setattr(emb, name, new)
    emb.LayerNorm = _layernorm(emb.LayerNorm, d)
    for i, spec in enumerate(structure["layers"]):
        layer = ad.layers[i]
        heads, ffn = int(spec["heads"]), int(spec["intermediate_size"])
        att = layer.attention
        if heads > 0:
            s = att.self
            for proj in ("query", "key", "value"):
                setattr(s, proj, _linear(getattr(s, proj), d, heads * dh))
            s.num_attention_heads = heads
            s.all_head_size = heads * dh
        att.output.dense = _linear(att.output.dense, heads * dh, d)
        att.output.LayerNorm = _layernorm(att.output.LayerNorm, d)
        if heads == 0:
            layer.attention = RemovedAttention(att, dh)
        layer.intermediate.dense = _linear(layer.intermediate.dense, d, ffn)
        layer.output.dense = _linear(layer.output.dense, ffn, d)
        layer.output.LayerNorm = _layernorm(layer.output.LayerNorm, d)
        if ffn == 0:
            layer.intermediate = RemovedIntermediate(layer.intermediate)
            layer.output = RemovedFFNOutput(layer.output)
    for parent, attr in ad.head_inputs():
        old = getattr(parent, attr)
        setattr(parent, attr, _linear(old, d, old.out_features))
    return model
