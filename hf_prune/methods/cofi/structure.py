"""The shape of a CoFi-pruned model, as data: what the export writes and what loading rebuilds.

`describe_structure(model)` reads a (pruned) model's per-layer kept heads, FFN width, removed sublayers and hidden
size from its modules into a JSON-able dict. `apply_structure(model, structure)` reshapes a freshly built dense model
of the original config (on any device, including `meta`) so that the pruned weights load into it. Both go through
the architecture adapter, so they are the only place that knows how a pruned BERT-family model is laid out. A
removed attention or FFN sublayer becomes a parameter-free identity stand-in ([`RemovedAttention`],
[`RemovedIntermediate`] + [`RemovedFFNOutput`]), and its layer skips it outright (see [`skipping_layer_class`]);
the model stays of its stock class and every other weight keeps its stock key. LLaMA-family decoders: see
`structure_decoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transformers.pytorch_utils import apply_chunking_to_forward

from .arch import get_adapter
from .structure_decoder import apply_decoder_structure, describe_decoder_structure

FORMAT = "hf_prune.cofi.structure/2"
# /1 (hf_prune before the reference semantics): a removed sublayer still applied its LayerNorm, so its weights differ
_OLD_FORMATS = {"hf_prune.cofi.structure/1"}


class RemovedAttention(nn.Module):
    """An attention sublayer with every head removed: the identity (the residual passes through, no LayerNorm).

    This is the masked model's value for a removed sublayer (see `hf_prune.methods.cofi.model`) and what the CoFi
    authors' pruned model computes. It replaces the stock attention module and has no parameters: the removed
    sublayer's projections, bias and LayerNorm are gone from the checkpoint.
    """

    removed = True

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return hidden_states, None


class RemovedIntermediate(nn.Module):
    """FFN up projection with every neuron removed: a 0-wide activation, no parameters."""

    removed = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


class RemovedFFNOutput(nn.Module):
    """FFN down projection + LayerNorm with every neuron removed: returns the residual unchanged (see
    [`RemovedAttention`])."""

    removed = True

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return input_tensor


class _SkipRemovedSublayers:
    """Layer forward that runs only the kept sublayers: a removed one is not called at all.

    The stock layer would call the removed sublayer's stand-ins and the FFN chunking helper anyway, ~25 us per layer
    on a CPU, which is a tenth of a millisecond in a 2 ms batch-1 pass of a 90 %-pruned MiniLM. Same result: the
    stand-ins are the identity. Encoder layers only (the adapter refuses decoders and cross-attention).
    """

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                cache=None, **kwargs):
        if not getattr(self.attention, "removed", False):
            hidden_states = self.attention(hidden_states, attention_mask, cache=cache, **kwargs)[0]
        if not getattr(self.intermediate, "removed", False):
            hidden_states = apply_chunking_to_forward(
                self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, hidden_states
            )
        return hidden_states


_SKIPPING_CLASSES: dict[type, type] = {}


def skipping_layer_class(layer_cls: type) -> type:
    """`layer_cls` with the forward of [`_SkipRemovedSublayers`]; a layer with a removed sublayer takes this class.

    A subclass, so `isinstance(layer, BertLayer)` holds (transformers records `output_hidden_states` that way) and
    the state dict is the stock one. Registered in this module under its name, so the class pickles by reference.
    """
    if layer_cls not in _SKIPPING_CLASSES:
        name = f"CoFiPruned{layer_cls.__name__}"
        cls = type(name, (_SkipRemovedSublayers, layer_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _SKIPPING_CLASSES[layer_cls] = cls
    return _SKIPPING_CLASSES[layer_cls]


def describe_structure(model: nn.Module) -> dict[str, Any]:
    """Per-layer kept heads / FFN width / removed sublayers and the hidden size, read from the model's modules."""
    ad = get_adapter(model)
    if ad.kind == "decoder":
        return describe_decoder_structure(model, ad)
    hidden = ad.embedding_layernorm().normalized_shape[0]
    layers = []
    for i in range(ad.dims.num_layers):
        heads, ffn = ad.kept_heads(i), ad.kept_neurons(i)
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
    if isinstance(structure, dict) and structure.get("format") in _OLD_FORMATS:
        raise ValueError(
            f"This CoFi checkpoint uses structure format {structure['format']!r}, written by an earlier hf_prune in "
            f"which a removed sublayer still applied its LayerNorm; this version ({FORMAT!r}) treats a removed sublayer "
            "as the identity, as the CoFi reference code does, so it cannot load it faithfully. Re-run the CoFi export."
        )
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
    if ad.kind == "decoder":
        return apply_decoder_structure(model, structure, ad)
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
        if heads == 0:
            layer.attention = RemovedAttention()
        else:
            s = layer.attention.self
            for proj in ("query", "key", "value"):
                setattr(s, proj, _linear(getattr(s, proj), d, heads * dh))
            s.num_attention_heads = heads
            s.all_head_size = heads * dh
            out = layer.attention.output
            out.dense = _linear(out.dense, heads * dh, d)
            out.LayerNorm = _layernorm(out.LayerNorm, d)
        if ffn == 0:
            layer.intermediate, layer.output = RemovedIntermediate(), RemovedFFNOutput()
        else:
            layer.intermediate.dense = _linear(layer.intermediate.dense, d, ffn)
            layer.output.dense = _linear(layer.output.dense, ffn, d)
            layer.output.LayerNorm = _layernorm(layer.output.LayerNorm, d)
        if heads == 0 or ffn == 0:
            layer.__class__ = skipping_layer_class(type(layer))  # adds no state: only the forward differs
    for parent, attr in ad.head_inputs():
        old = getattr(parent, attr)
        setattr(parent, attr, _linear(old, d, old.out_features))
    return model
