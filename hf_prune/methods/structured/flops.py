"""Size and cost of a (possibly pruned) LLaMA-family decoder: weight counts and FLOPs per generated token."""

from __future__ import annotations

from torch import nn

from ..cofi.arch import get_adapter


def linear_weights(model: nn.Module) -> tuple[int, int]:
    """(weights of the decoder layers' linears, of the LM head)."""
    ad = get_adapter(model)
    layers = sum(lin.weight.numel() for i in range(ad.dims.num_layers) if ad.kept_heads(i)
                 for lin in (*ad.qkv(i), ad.attn_out(i)))
    layers += sum(lin.weight.numel() for i in range(ad.dims.num_layers) if ad.kept_neurons(i)
                  for lin in (*ad.ffn_in(i), ad.ffn_down(i)))
    return layers, ad.lm_head().weight.numel()


def flops_per_token(model: nn.Module, context: int) -> int:
    """Dense FLOPs of one generated token at `context` cached positions: 2 per linear weight (LM head included) and
    the attention's 2 * 2 * heads * head_dim * context (scores and weighted sum) per kept attention sublayer. Zero
    weights count: dense kernels compute them."""
    ad = get_adapter(model)
    layers, head = linear_weights(model)
    attn = sum(4 * ad.kept_heads(i) * ad.dims.head_dim * context for i in range(ad.dims.num_layers))
    return 2 * (layers + head) + attn
