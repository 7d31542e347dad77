"""Final masks and physical removal: from the masked model to a smaller dense model with the same outputs."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .arch import get_adapter
from .model import ATTR, CoFiGates
from .prune_common import kept_units, load_pruned_weights
from .structure import apply_structure, structure_record


def final_masks(gates: CoFiGates) -> dict[str, torch.Tensor]:
    """Deterministic masks for every gate type (all-ones for the types that are not pruned)."""
    d = gates.dims
    m = {n: t.detach().float().cpu() for n, t in gates.deterministic_masks().items()}
    defaults = {
        "head": torch.ones(d.num_layers, d.head_units),
        "mha": torch.ones(d.num_layers),
        "neuron": torch.ones(d.num_layers, d.intermediate_size),
        "ffn": torch.ones(d.num_layers),
        "hidden": torch.ones(d.hidden_size),
        "layer": torch.ones(d.num_layers),
    }
    return {n: m.get(n, defaults[n]) for n in defaults}


@torch.no_grad()
def pruned_state_dict(
    model: nn.Module, masks: dict[str, torch.Tensor], multiple_of: int = 1
) -> tuple[dict[str, torch.Tensor], dict]:
    """Folds the gate values into the weights and slices out the removed units.

    A removed attention or FFN sublayer (no head / neuron left, or its layer gate 0) loses all its weights, its
    LayerNorm included: the masked model computes it as the identity. A kept FFN is padded with zero neurons (zero
    up-projection row and bias, zero down-projection column) to a multiple of `multiple_of` (at most the original
    width); they add exactly 0 to the output. Returns the new state dict (keys of the dense model without the
    removed modules' entries) and the structure (its `intermediate_size` includes the padding).
    """
    ad = get_adapter(model)
    dh = ad.dims.head_dim
    kept = kept_units(masks)
    names = {id(p): n for n, p in model.named_parameters()}
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(ATTR + ".")}
    hid = torch.tensor(kept["hidden"], dtype=torch.long)
    zh = masks["hidden"][hid]

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        sd[names[id(param)]] = value.to(dtype=param.dtype).contiguous()

    def dev(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(device=like.device, dtype=torch.float32)

    for table in ad.embedding_tables().values():
        put(table.weight, table.weight.index_select(1, dev(hid, table.weight).long()))

    def fold_ln(ln: nn.LayerNorm) -> None:
        i = dev(hid, ln.weight).long()
        put(ln.weight, ln.weight.float().index_select(0, i) * dev(zh, ln.weight))
        if ln.bias is not None:
            put(ln.bias, ln.bias.float().index_select(0, i) * dev(zh, ln.bias))

    fold_ln(ad.embedding_layernorm())
    module_names = {id(m): n for n, m in model.named_modules()}

    def drop(module: nn.Module) -> None:  # a removed sublayer: all its weights go (it becomes the identity)
        prefix = module_names[id(module)] + "."
        for k in [k for k in sd if k.startswith(prefix)]:
            del sd[k]

    layers = []
    for layer in range(ad.dims.num_layers):
        # attention: Q/K/V keep the rows of surviving heads and the columns of surviving hidden dims
        h_idx = kept["heads"][layer]
        if h_idx:
            rows = torch.tensor([h * dh + j for h in h_idx for j in range(dh)], dtype=torch.long)
            for lin in ad.qkv(layer):
                r, c = dev(rows, lin.weight).long(), dev(hid, lin.weight).long()
                put(lin.weight, lin.weight.index_select(0, r).index_select(1, c))
                if lin.bias is not None:
                    put(lin.bias, lin.bias.index_select(0, r))
            # masked model: (W (ctx * z_head) + b) * z_mha * z_hidden, so rows scale by z_mha z_hidden, columns by z_head
            z_mha = float(masks["mha"][layer])
            col_scale = masks["head"][layer][h_idx].repeat_interleave(dh)
            _fold_out(put, dev, ad.attn_out(layer), hid, rows, zh * z_mha, col_scale)
            fold_ln(ad.attn_layernorm(layer))
        else:
            drop(ad.attention(layer))
        # FFN: up keeps rows of surviving neurons; down keeps their columns, scaled by the neuron and FFN gates
        n_idx = torch.tensor(kept["neurons"][layer], dtype=torch.long)
        if n_idx.numel():
            up = ad.ffn_up(layer)
            i_up, c_up = dev(n_idx, up.weight).long(), dev(hid, up.weight).long()
            put(up.weight, up.weight.index_select(0, i_up).index_select(1, c_up))
            if up.bias is not None:
                put(up.bias, up.bias.index_select(0, dev(n_idx, up.bias).long()))
            z_ffn = float(masks["ffn"][layer])
            _fold_out(put, dev, ad.ffn_down(layer), hid, n_idx, zh * z_ffn, masks["neuron"][layer][n_idx])
            fold_ln(ad.ffn_layernorm(layer))
            width = _pad_ffn(sd, names, up, ad.ffn_down(layer), multiple_of, ad.dims.intermediate_size)
        else:
            drop(ad.ffn_act_module(layer))
            drop(ad.ffn_block(layer))
            width = 0
        layers.append(
            {
                "heads": len(h_idx),
                "intermediate_size": width,
                "attention_removed": not h_idx,
                "ffn_removed": n_idx.numel() == 0,
            }
        )
    for parent, attr in ad.head_inputs():
        lin = getattr(parent, attr)
        put(lin.weight, lin.weight.index_select(1, dev(hid, lin.weight).long()))
    structure = structure_record(model, ad, int(hid.numel()), layers)
    return sd, structure


def _pad_ffn(sd: dict, names: dict, up: nn.Linear, down: nn.Linear, multiple_of: int, original: int) -> int:
    """Appends zero neurons to a kept FFN in `sd` up to a multiple of `multiple_of`; returns the new width."""
    w_up, w_down = sd[names[id(up.weight)]], sd[names[id(down.weight)]]
    n = w_up.shape[0]
    width = min(-(-n // multiple_of) * multiple_of, max(original, n))
    if width > n:
        sd[names[id(up.weight)]] = torch.cat([w_up, w_up.new_zeros(width - n, w_up.shape[1])])
        sd[names[id(down.weight)]] = torch.cat([w_down, w_down.new_zeros(w_down.shape[0], width - n)], dim=1)
        if up.bias is not None:
            b = sd[names[id(up.bias)]]
            sd[names[id(up.bias)]] = torch.cat([b, b.new_zeros(width - n)])
    return width


def _fold_out(put, dev, lin: nn.Linear, hid, cols, row_scale, col_scale) -> None:
    """Output projection: keep rows `hid` scaled by `row_scale` and columns `cols` scaled by `col_scale`."""
    w = lin.weight.float().index_select(0, dev(hid, lin.weight).long()).index_select(1, dev(cols, lin.weight).long())
    w = w * dev(row_scale, lin.weight).unsqueeze(1) * dev(col_scale, lin.weight).unsqueeze(0)
    put(lin.weight, w)
    if lin.bias is not None:
        put(lin.bias, lin.bias.float().index_select(0, dev(hid, lin.bias).long()) * dev(row_scale, lin.bias))


@torch.no_grad()
def build_pruned_model(model: nn.Module, masks: dict[str, torch.Tensor], multiple_of: int = 1) -> nn.Module:
    """A new, physically smaller model of the same class whose outputs equal the masked model's.

    `multiple_of`: kept FFN widths are padded with zero neurons to a multiple of it (see [`pruned_state_dict`]).
    """
    ad = get_adapter(model)
    if ad.kind == "decoder":
        from .prune_decoder import build_pruned_decoder

        return build_pruned_decoder(model, ad, masks, multiple_of)
    sd, structure = pruned_state_dict(model, masks, multiple_of)
    config = copy.deepcopy(model.config)
    ref = next(p for n, p in model.named_parameters() if not n.startswith(ATTR + "."))
    small = type(model)(config).to(device=ref.device, dtype=ref.dtype)
    apply_structure(small, structure)
    load_pruned_weights(small, sd)
    return small, structure
