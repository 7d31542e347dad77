"""Activation-based importance of decoder units on calibration data (Minitron; ShortGPT for whole layers).

Layers and hidden channels are ranked once, on the dense model, block by block with the one-shot runner's
capture / run helpers: a layer by its block influence `1 - cos(input, output)` averaged over tokens; a hidden channel
by `sum over norms of ||norm output[:, j]||` (every RMSNorm that feeds a layer's attention or FFN, and the final
norm). KV groups and FFN neurons are ranked per block from the Gram diagonals the runner collects on the pruned
prefix's outputs ([`group_scores`], [`neuron_scores`]).
"""

from __future__ import annotations

import torch
from torch import nn

from ...oneshot.blocks import Blocks, capture_block_inputs, run_block


@torch.no_grad()
def dense_scores(model: nn.Module, ad, batches: list[torch.Tensor], units: bool = False) -> dict[str, torch.Tensor]:
    """`{"layers": (L,), "hidden": (H,)}` of the dense `model` on the calibration `batches`; with `units`, also
    `"groups": (L, kv)` and `"neurons": (L, I)`, the [`group_scores`] / [`neuron_scores`] of every layer."""
    blocks = Blocks("model.layers", ad.layers)
    inputs = capture_block_inputs(model, blocks, batches)
    sq = torch.zeros(ad.dims.hidden_size, dtype=torch.float32)
    influence = torch.zeros(ad.dims.num_layers)
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    d = ad.dims
    col_sq = {"groups": torch.zeros(d.num_layers, d.num_heads * d.head_dim),
              "neurons": torch.zeros(d.num_layers, d.intermediate_size)}
    for i, layer in enumerate(ad.layers):
        per_norm = {id(n): torch.zeros(ad.dims.hidden_size) for n in ad.layer_norms(i)}

        def record(module, args, out, per_norm=per_norm):
            per_norm[id(module)] += out.detach().float().reshape(-1, out.shape[-1]).square().sum(0).cpu()

        def record_input(key, i=i):
            def hook(module, args):
                x = args[0].detach().float()
                col_sq[key][i] += x.reshape(-1, x.shape[-1]).square().sum(0).cpu()
            return hook

        handles = [n.register_forward_hook(record) for n in ad.layer_norms(i)]
        if units:
            handles += [ad.attn_out(i).register_forward_pre_hook(record_input("groups")),
                        ad.ffn_down(i).register_forward_pre_hook(record_input("neurons"))]
        try:
            for b, (hidden, extra, kwargs) in enumerate(zip(inputs.hidden, inputs.extra_args, inputs.kwargs)):
                out = run_block(layer, hidden, extra, kwargs)
                influence[i] += (1 - nn.functional.cosine_similarity(hidden.float(), out.float(), dim=-1)).sum().cpu()
                inputs.hidden[b] = out
        finally:
            for h in handles:
                h.remove()
        sq += sum(v.sqrt() for v in per_norm.values())
    final = ad.final_norm()
    sq += sum(final(h).float().reshape(-1, h.shape[-1]).square().sum(0).cpu() for h in inputs.hidden).sqrt()
    out = {"layers": influence / tokens, "hidden": sq}
    if units:
        out["groups"] = torch.stack([group_scores(row, d.head_units) for row in col_sq["groups"]])
        out["neurons"] = neuron_scores(col_sq["neurons"])
    return out


def group_scores(o_proj_gram_diag: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Per KV group: the norm of its attention output over the calibration tokens (its `o_proj` input columns)."""
    return o_proj_gram_diag.view(kv_heads, -1).sum(-1).sqrt()


def neuron_scores(down_proj_gram_diag: torch.Tensor) -> torch.Tensor:
    """Per FFN neuron: the norm of its activation (its `down_proj` input column) over the calibration tokens."""
    return down_proj_gram_diag.sqrt()


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` highest scores, in increasing index order."""
    return torch.topk(scores.float(), k).indices.sort().values
