"""The structure of a CoFi-pruned LLaMA-family decoder: what the export writes and what loading rebuilds.

Two cases, both in the `"structured"` format's record (`FORMAT`):

- **uniform** (`"plain": true`): every kept layer has the same query / KV heads and FFN width and no removed sublayer
  (a target architecture always gives this). The layers with nothing left are deleted and the config itself says the
  smaller shape (`num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `intermediate_size`,
  `hidden_size`, `head_dim`), so the checkpoint is a plain checkpoint of the stock class: it loads without hf_prune.
  Unless the config class refuses that shape (`LlamaConfig` wants `hidden_size` divisible by `num_attention_heads`):
  then it is saved as heterogeneous, below.
- **heterogeneous**: the config keeps the original shape, the record lists every layer's `heads`, `kv_heads`,
  `intermediate_size` and removed sublayers, and [`apply_decoder_structure`] reshapes the freshly built model inside
  `from_pretrained`. A removed attention / FFN sublayer becomes a parameter-free stand-in and its norm an identity;
  the layer, of a subclass of the stock class ([`skipping_decoder_layer_class`]), does not call them.

`head_dim` never changes (only whole heads go), so the rotary embedding stays the one of the original config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FORMAT = "hf_prune.cofi.structure/2"


class RemovedDecoderAttention(nn.Module):
    """A decoder attention sublayer with every head removed: adds nothing to the residual, has no parameters.

    It still advances the KV cache by the step's length with a one-element placeholder per token, because
    transformers reads the cached sequence length (positions, masks) from the cache's first layer, which may be this
    one. A placeholder of shape `(batch, 1, tokens, 1)` costs 4 bytes per token.
    """

    removed = True

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def advance_cache(self, hidden_states: torch.Tensor, cache, kwargs: dict) -> None:
        if cache is not None:
            b, t = hidden_states.shape[:2]
            z = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(z, z, self.layer_idx, kwargs=kwargs)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        self.advance_cache(hidden_states, cache, kwargs)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """A decoder FFN with every neuron removed: adds nothing to the residual, has no parameters."""

    removed = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class _SkipRemovedDecoderSublayers:
    """Decoder-layer forward that runs only the kept sublayers (with their norms): the stock pre-norm layer with
    each sublayer skipped when it is removed. Same result as the stock forward with the stand-ins, without their cost."""

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                position_embeddings=None, **kwargs):
        if getattr(self.self_attn, "removed", False):
            self.self_attn.advance_cache(hidden_states, cache, kwargs)
        else:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(
                hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
            )
            hidden_states = residual + hidden_states
        if not getattr(self.mlp, "removed", False):
            residual = hidden_states
            hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
            hidden_states = residual + hidden_states
        return hidden_states


_SKIPPING_CLASSES: dict[type, type] = {}


def skipping_decoder_layer_class(layer_cls: type) -> type:
    """`layer_cls` with the forward of [`_SkipRemovedDecoderSublayers`] (a subclass: same state dict, `isinstance`
    holds); registered in this module under its name so that it pickles by reference."""
    if layer_cls not in _SKIPPING_CLASSES:
        name = f"CoFiPruned{layer_cls.__name__}"
        cls = type(name, (_SkipRemovedDecoderSublayers, layer_cls), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _SKIPPING_CLASSES[layer_cls] = cls
    return _SKIPPING_CLASSES[layer_cls]


def layer_record(heads: int, kv_heads: int, ffn: int) -> dict[str, Any]:
    return {"heads": heads, "kv_heads": kv_heads, "intermediate_size": ffn, "attention_removed": heads == 0,
            "ffn_removed": ffn == 0}


def is_uniform(layers: list[dict[str, Any]]) -> bool:
    """Whether the kept layers (those with anything left) all have one shape with both sublayers."""
    kept = [s for s in layers if not (s["attention_removed"] and s["ffn_removed"])]
    shapes = {(s["heads"], s["kv_heads"], s["intermediate_size"]) for s in kept}
    return bool(kept) and len(shapes) == 1 and not any(s["attention_removed"] or s["ffn_removed"] for s in kept)


def decoder_record(model: nn.Module, ad, hidden_size: int, layers: list[dict[str, Any]], plain: bool) -> dict:
    c = model.config
    return {
        "format": FORMAT,
        "model_type": ad.model_type,
        "architecture": type(model).__name__,
        "plain": plain,
        "original": {  # of the config the checkpoint is built from (for a plain one: the pruned shape itself)
            "hidden_size": int(c.hidden_size), "num_attention_heads": int(c.num_attention_heads),
            "num_key_value_heads": int(c.num_key_value_heads or c.num_attention_heads),
            "intermediate_size": int(c.intermediate_size), "num_hidden_layers": int(c.num_hidden_layers),
            "head_dim": ad.dims.head_dim,
        },
        "hidden_size": hidden_size,
        "layers": layers,
    }


def describe_decoder_structure(model: nn.Module, ad) -> dict[str, Any]:
    layers = [layer_record(ad.kept_heads(i), ad.kept_kv_heads(i), ad.kept_neurons(i)) for i in range(ad.dims.num_layers)]
    hidden = int(ad.embedding().embedding_dim)
    d = ad.dims
    plain = hidden == d.hidden_size and all(
        (s["heads"], s["kv_heads"], s["intermediate_size"]) == (d.num_heads, d.head_units, d.intermediate_size)
        for s in layers
    )
    return decoder_record(model, ad, hidden, layers, plain)


def pruned_config(config, structure: dict[str, Any], kept_layers: list[int]):
    """The plain config of a uniform structure: the smaller shape, `head_dim` explicit (it no longer equals
    `hidden_size / num_attention_heads`), per-layer lists (`layer_types`) cut to the kept layers."""
    import copy

    new = copy.deepcopy(config)
    first = structure["layers"][kept_layers[0]]
    new.num_hidden_layers = len(kept_layers)
    new.num_attention_heads = first["heads"]
    new.num_key_value_heads = first["kv_heads"]
    new.intermediate_size = first["intermediate_size"]
    new.hidden_size = structure["hidden_size"]
    new.head_dim = structure["original"]["head_dim"]
    if isinstance(getattr(new, "layer_types", None), list):
        new.layer_types = [new.layer_types[i] for i in kept_layers]
    if getattr(new, "max_window_layers", None) is not None:  # Qwen2: sliding window from this layer on
        new.max_window_layers = sum(1 for i in kept_layers if i < config.max_window_layers)
    return new


def _check(structure: dict[str, Any], ad) -> None:
    if not isinstance(structure, dict) or structure.get("format") != FORMAT:
        raise ValueError(f"Not a CoFi structure description (expected format {FORMAT!r}): {structure!r:.200}")
    if structure.get("model_type") != ad.model_type:
        raise ValueError(f"Structure is for model_type {structure.get('model_type')!r}, model is {ad.model_type!r}")
    d = ad.dims
    layers = structure.get("layers", [])
    if len(layers) != d.num_layers:
        raise ValueError(f"Structure has {len(layers)} layers, the model {d.num_layers}")
    for i, spec in enumerate(layers):
        heads, kv, ffn = int(spec["heads"]), int(spec["kv_heads"]), int(spec["intermediate_size"])
        if not (0 <= kv <= d.head_units and heads == kv * d.group_size and 0 <= ffn <= d.intermediate_size):
            raise ValueError(f"Structure layer {i} does not fit the model ({d.num_heads} heads in {d.head_units} "
                             f"KV groups, FFN {d.intermediate_size}): {spec}")
    if not 0 < int(structure["hidden_size"]) <= d.hidden_size:
        raise ValueError(f"Structure hidden_size {structure['hidden_size']} exceeds {d.hidden_size}")


def _param(shape, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=like.device, dtype=like.dtype), requires_grad=like.requires_grad)


def _linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    new = nn.Linear(in_features, out_features, bias=old.bias is not None, device="meta")
    new.weight = _param((out_features, in_features), old.weight)
    if old.bias is not None:
        new.bias = _param((out_features,), old.bias)
    return new


def _rms_norm(old: nn.Module, size: int) -> nn.Module:
    with torch.device("meta"):
        new = type(old)(size, eps=old.variance_epsilon)
    new.weight = _param((size,), old.weight)
    return new


@torch.no_grad()
def apply_decoder_structure(model: nn.Module, structure: dict[str, Any], ad) -> nn.Module:
    """Reshapes `model` (a decoder of the checkpoint's config, any device including `meta`) in place to `structure`;
    weights are left empty. A plain structure needs nothing: the config already has its shape."""
    _check(structure, ad)
    if structure.get("plain"):
        return model
    d, dh = int(structure["hidden_size"]), ad.dims.head_dim
    emb = ad.embedding()
    new_emb = nn.Embedding(emb.num_embeddings, d, padding_idx=emb.padding_idx, device="meta")
    new_emb.weight = _param((emb.num_embeddings, d), emb.weight)
    tied = ad.tied()
    ad.base.embed_tokens = new_emb
    head = ad.lm_head()
    model.lm_head = _linear(head, d, head.out_features)
    if tied:
        model.lm_head.weight = new_emb.weight
    ad.base.norm = _rms_norm(ad.final_norm(), d)
    for i, spec in enumerate(structure["layers"]):
        layer = ad.layers[i]
        heads, kv, ffn = int(spec["heads"]), int(spec["kv_heads"]), int(spec["intermediate_size"])
        if heads == 0:
            layer.self_attn = RemovedDecoderAttention(layer.self_attn.layer_idx)
            layer.input_layernorm = nn.Identity()
        else:
            a = layer.self_attn
            a.q_proj = _linear(a.q_proj, d, heads * dh)
            a.k_proj = _linear(a.k_proj, d, kv * dh)
            a.v_proj = _linear(a.v_proj, d, kv * dh)
            a.o_proj = _linear(a.o_proj, heads * dh, d)
            layer.input_layernorm = _rms_norm(layer.input_layernorm, d)
        if ffn == 0:
            layer.mlp = RemovedMLP()
            layer.post_attention_layernorm = nn.Identity()
        else:
            m = layer.mlp
            m.gate_proj, m.up_proj = _linear(m.gate_proj, d, ffn), _linear(m.up_proj, d, ffn)
            m.down_proj = _linear(m.down_proj, ffn, d)
            layer.post_attention_layernorm = _rms_norm(layer.post_attention_layernorm, d)
        if heads == 0 or ffn == 0:
            layer.__class__ = skipping_decoder_layer_class(type(layer))  # adds no state: only the forward differs
    return model
