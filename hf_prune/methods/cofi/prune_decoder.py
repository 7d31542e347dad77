"""Physical removal for LLaMA-family decoders: the masked decoder becomes a smaller one with the same outputs.

Folding (see `model.py` for the masked model): each norm keeps the kept hidden dimensions of its weight times
`z_hidden`; Q / K / V keep the rows of the kept KV groups' heads and the kept hidden columns; O keeps the kept hidden
rows and the kept heads' columns, scaled by the head gates, the whole by `z_mha z_layer` (bias too); gate / up keep
the kept neurons' rows, down their columns scaled by `z_neuron z_ffn z_layer`; the embedding (and an untied LM head)
keep the kept hidden columns, unscaled, so a tied LM head stays tied. Kept FFNs are padded with zero neurons to a
multiple of `multiple_of` (`act(0) * 0 = 0`: exact). A layer with nothing left is deleted when the result is
uniform (a plain config), else kept as a layer that skips its removed sublayers.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from .model import ATTR
from .prune_common import kept_units, load_pruned_weights
from .structure_decoder import apply_decoder_structure, decoder_record, is_uniform, layer_record, pruned_config


@torch.no_grad()
def decoder_pruned_state_dict(
    model: nn.Module, ad, masks: dict[str, torch.Tensor], multiple_of: int = 1
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], int]:
    """The folded, sliced state dict (keys of the dense model, removed sublayers' entries dropped), the per-layer
    records (their `intermediate_size` includes the zero padding) and the kept hidden size."""
    d = ad.dims
    dh, g = d.head_dim, d.group_size
    kept = kept_units(masks)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(ATTR + ".")}
    module_names = {id(m): n for n, m in model.named_modules()}

    def idx(values, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.long, device=like.device)

    def scale(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(device=like.device, dtype=torch.float32)

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        value = value.to(dtype=param.dtype).contiguous()
        for n, p in model.named_parameters(remove_duplicate=False):  # every name of a tied parameter
            if p is param:
                sd[n] = value

    def drop(*modules: nn.Module) -> None:
        for module in modules:
            prefix = module_names[id(module)] + "."
            for k in [k for k in sd if k.startswith(prefix)]:
                del sd[k]

    hid = kept["hidden"]
    zh = masks["hidden"][hid]

    def fold_norm(norm: nn.Module) -> None:
        w = norm.weight
        put(w, w.float().index_select(0, idx(hid, w)) * scale(zh, w))

    emb = ad.embedding().weight
    put(emb, emb.index_select(1, idx(hid, emb)))
    if not ad.tied():
        head = ad.lm_head().weight
        put(head, head.index_select(1, idx(hid, head)))  # a bias over the vocabulary stays as it is
    fold_norm(ad.final_norm())

    layers = []
    for layer in range(d.num_layers):
        groups = kept["heads"][layer]
        q_heads = [h * g + j for h in groups for j in range(g)]
        attn_norm, ffn_norm = ad.layer_norms(layer)
        if groups:
            q_rows = [h * dh + t for h in q_heads for t in range(dh)]
            kv_rows = [h * dh + t for h in groups for t in range(dh)]
            for lin, rows in zip(ad.qkv(layer), (q_rows, kv_rows, kv_rows)):
                put(lin.weight, lin.weight.index_select(0, idx(rows, lin.weight)).index_select(1, idx(hid, lin.weight)))
                if lin.bias is not None:
                    put(lin.bias, lin.bias.index_select(0, idx(rows, lin.bias)))
            sub = float(masks["mha"][layer] * masks["layer"][layer])
            cols = masks["head"][layer][groups].repeat_interleave(g * dh)
            _fold_out(put, ad.attn_out(layer), idx, hid, q_rows, sub, scale(cols, ad.attn_out(layer).weight))
            fold_norm(attn_norm)
        else:
            drop(ad.attention(layer), attn_norm)
        neurons = kept["neurons"][layer]
        if neurons:
            for lin in ad.ffn_in(layer):
                put(lin.weight, lin.weight.index_select(0, idx(neurons, lin.weight)).index_select(1, idx(hid, lin.weight)))
                if lin.bias is not None:
                    put(lin.bias, lin.bias.index_select(0, idx(neurons, lin.bias)))
            sub = float(masks["ffn"][layer] * masks["layer"][layer])
            down = ad.ffn_down(layer)
            _fold_out(put, down, idx, hid, neurons, sub, scale(masks["neuron"][layer][neurons], down.weight))
            fold_norm(ffn_norm)
            width = _pad(sd, names, ad, layer, multiple_of)
        else:
            drop(ad.mlp(layer), ffn_norm)
            width = 0
        layers.append(layer_record(len(q_heads), len(groups), width))
    return sd, layers, len(hid)


def _fold_out(put, lin: nn.Linear, idx, hid, cols, sub: float, col_scale: torch.Tensor) -> None:
    """Output projection: kept hidden rows, kept input columns scaled by `col_scale`, all scaled by `sub`."""
    w = lin.weight.float().index_select(0, idx(hid, lin.weight)).index_select(1, idx(cols, lin.weight))
    put(lin.weight, w * col_scale.unsqueeze(0) * sub)
    if lin.bias is not None:
        put(lin.bias, lin.bias.float().index_select(0, idx(hid, lin.bias)) * sub)


def _pad(sd: dict, names: dict, ad, layer: int, multiple_of: int) -> int:
    """Appends zero neurons to a kept FFN in `sd` up to a multiple of `multiple_of` (at most the original width)."""
    (gate, up), down = ad.ffn_in(layer), ad.ffn_down(layer)
    n = sd[names[id(up.weight)]].shape[0]
    width = min(-(-n // multiple_of) * multiple_of, max(ad.dims.intermediate_size, n))
    if width > n:
        for lin in (gate, up):
            w = sd[names[id(lin.weight)]]
            sd[names[id(lin.weight)]] = torch.cat([w, w.new_zeros(width - n, w.shape[1])])
            if lin.bias is not None:
                b = sd[names[id(lin.bias)]]
                sd[names[id(lin.bias)]] = torch.cat([b, b.new_zeros(width - n)])
        w = sd[names[id(down.weight)]]
        sd[names[id(down.weight)]] = torch.cat([w, w.new_zeros(w.shape[0], width - n)], dim=1)
    return width


logger = logging.getLogger(__name__)

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


@torch.no_grad()
def build_pruned_decoder(model: nn.Module, ad, masks: dict[str, torch.Tensor], multiple_of: int = 1):
    """A new, physically smaller decoder of the same class whose outputs equal the masked model's, and its structure
    record. Uniform results get a plain config (layers with nothing left deleted, the rest renumbered)."""
    sd, layers, hidden = decoder_pruned_state_dict(model, ad, masks, multiple_of)
    ref = next(p for n, p in model.named_parameters() if not n.startswith(ATTR + "."))
    config = None
    if is_uniform(layers):
        kept = [i for i, spec in enumerate(layers) if not spec["attention_removed"]]
        structure = decoder_record(model, ad, hidden, layers, plain=True)
        config = _valid_or_none(pruned_config(model.config, structure, kept))
    if config is not None:
        renumber = {old: new for new, old in enumerate(kept)}
        out = {}
        for k, v in sd.items():
            m = _LAYER_KEY.match(k)
            if m is None:
                out[k] = v
            elif int(m.group(1)) in renumber:
                out[f"model.layers.{renumber[int(m.group(1))]}." + k[m.end():]] = v
        sd = out
        small = type(model)(config).to(device=ref.device, dtype=ref.dtype)
    else:
        config = copy.deepcopy(model.config)
        small = type(model)(config).to(device=ref.device, dtype=ref.dtype)
        apply_decoder_structure(small, decoder_record(model, ad, hidden, layers, plain=False), type(ad)(small))
    load_pruned_weights(small, sd)
    if getattr(model, "generation_config", None) is not None:
        # the new model derived its generation config from `config`, whose `use_cache` Trainer sets to its
        # `args.use_cache` (False): without the source's own, the export would generate without the KV cache
        small.generation_config = copy.deepcopy(model.generation_config)
    from .structure import describe_structure

    return small, describe_structure(small)


def _valid_or_none(config):
    """`config` if its class accepts it as a checkpoint config, else None (with a warning): the export then keeps
    the original config and the structure record. Why: `LlamaConfig` refuses a `hidden_size` that is not a
    multiple of `num_attention_heads` even with an explicit `head_dim`, which `LlamaAttention` would run."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return config
    try:
        validate()
    except (StrictDataclassError, ValueError) as err:  # transformers' configs are huggingface_hub strict dataclasses
        cause = getattr(err, "__cause__", None) or err
        logger.warning(
            "CoFi export: the pruned shape is uniform, but %s refuses it as a plain config (%s); the checkpoint keeps "
            "the original config with the per-layer structure record instead and loads with `import hf_prune`",
            type(config).__name__, cause)
        return None
    return config
