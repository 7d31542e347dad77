"""Expected model size under the gates, the sparsity target schedule and the Lagrangian constraint.

Prunable parameters are the encoder's attention (Q, K, V, O) and FFN (up, down) weight matrices. With `d` the
(shared) hidden size, `d_h` the head size, a layer keeps `4 * d_h * heads * d + 2 * neurons * d` of them. Gates are
nested (a head survives only if its attention sublayer does; a neuron only if its FFN does) and independent, so the
expected count is the same expression with each unit count replaced by the sum of products of keep probabilities:
`E[P] = E[d] * sum_l (4 d_h sum_h p_mha(l) p_head(l, h) + 2 sum_i p_ffn(l) p_neuron(l, i))`.
With deterministic 0/1 masks the same formula is an exact parameter count of the physically pruned model.

Decoders (LLaMA family, see `arch.LlamaFamilyAdapter`) differ in three ways, all carried by `EncoderDims`: a head
unit is a KV group (one key / value head and the `group_size` query heads that read it), worth
`d_h (2 group_size + 2) d` weights (Q and O rows / columns of its query heads, K and V rows of its KV head); the FFN is
gated (gate, up, down: `ffn_matrices = 3`); and a per-layer gate `p_layer(l)` multiplies both sublayers of layer `l`
(Sheared-LLaMA's layer mask). The formula becomes
`E[P] = E[d] * sum_l p_layer(l) (d_h (2g + 2) sum_h p_mha(l) p_head(l, h) + 3 sum_i p_ffn(l) p_neuron(l, i))`.

The optional layer-count constraints (`CoFiConfig.target_attention_layers` / `target_ffn_layers`) use the expected
number of kept sublayers: a sublayer survives if its layer gate does and at least one of its heads / neurons does,
`E[A] = sum_l p_mha(l) (1 - prod_h (1 - p_head(l, h)))` (likewise for the FFN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class EncoderDims:
    """Shape of a dense transformer (encoder, or decoder with GQA and a gated FFN), as far as CoFi's size formula
    needs it. `num_kv_heads=None` means multi-head attention (one KV head per query head)."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    num_kv_heads: int | None = None
    ffn_matrices: int = 2

    @property
    def head_units(self) -> int:
        """Number of head gates per layer: KV groups (= heads without GQA)."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per head unit."""
        return self.num_heads // self.head_units

    @property
    def head_unit_params(self) -> int:
        """Prunable weights of one head unit per hidden dimension: Q and O of its query heads, K and V of its KV head."""
        return self.head_dim * (2 * self.group_size + 2)

    @property
    def attention_params(self) -> int:
        """Prunable weights of one dense attention sublayer (Q, K, V, O)."""
        return self.head_unit_params * self.head_units * self.hidden_size

    @property
    def ffn_params(self) -> int:
        """Prunable weights of one dense FFN sublayer (up, down; and gate for a gated FFN)."""
        return self.ffn_matrices * self.intermediate_size * self.hidden_size

    @property
    def full_params(self) -> int:
        return self.num_layers * (self.attention_params + self.ffn_params)


def unit_counts(
    dims: EncoderDims,
    *,
    head: torch.Tensor | None = None,
    mha: torch.Tensor | None = None,
    neuron: torch.Tensor | None = None,
    ffn: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    layer: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Expected (or, for 0/1 inputs, exact) surviving units. `None` means "this gate type is not pruned".

    Args:
        head (`(num_layers, head_units)`), mha (`(num_layers,)`), neuron (`(num_layers, intermediate_size)`),
        ffn (`(num_layers,)`), hidden (`(hidden_size,)`), layer (`(num_layers,)`, decoders): keep probabilities or
        0/1 indicators.
    Returns:
        dict with `heads` (head units per layer), `neurons` (per layer), `hidden`, `mha_layers`, `ffn_layers`,
        `layers` (scalars).
    """
    ref = next((t for t in (head, mha, neuron, ffn, hidden, layer) if t is not None), None)
    kw = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    L = dims.num_layers
    layer_p = layer if layer is not None else torch.ones(L, **kw)
    mha_p = (mha if mha is not None else torch.ones(L, **kw)) * layer_p
    ffn_p = (ffn if ffn is not None else torch.ones(L, **kw)) * layer_p
    heads = (head if head is not None else torch.ones(L, dims.head_units, **kw)) * mha_p.unsqueeze(-1)
    neurons = (neuron if neuron is not None else torch.ones(L, dims.intermediate_size, **kw)) * ffn_p.unsqueeze(-1)
    hid = hidden.sum() if hidden is not None else torch.tensor(float(dims.hidden_size), **kw)
    return {
        "heads": heads.sum(-1),
        "neurons": neurons.sum(-1),
        "hidden": hid,
        "mha_layers": mha_p.sum(),
        "ffn_layers": ffn_p.sum(),
        "layers": layer_p.sum(),
    }


def expected_params(dims: EncoderDims, **gates: torch.Tensor | None) -> torch.Tensor:
    """Expected number of surviving prunable parameters (differentiable in the keep probabilities)."""
    c = unit_counts(dims, **gates)
    return c["hidden"] * (dims.head_unit_params * c["heads"].sum() + dims.ffn_matrices * c["neurons"].sum())


def expected_sparsity(dims: EncoderDims, **gates: torch.Tensor | None) -> torch.Tensor:
    return 1.0 - expected_params(dims, **gates) / dims.full_params


def mask_sparsity(dims: EncoderDims, masks: dict[str, torch.Tensor]) -> float:
    """Exact sparsity of the model these (deterministic or fixed) masks leave: every non-zero gate counts as kept."""
    return float(expected_sparsity(dims, **{k: (v != 0).float() for k, v in masks.items()}))


def expected_sublayers(
    *,
    head: torch.Tensor | None = None,
    mha: torch.Tensor | None = None,
    neuron: torch.Tensor | None = None,
    ffn: torch.Tensor | None = None,
    layer: torch.Tensor | None = None,
    **_: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """Expected number of kept attention (`attention`) and FFN (`ffn`) sublayers; exact for 0/1 inputs."""

    def kept(sub: torch.Tensor | None, units: torch.Tensor | None) -> torch.Tensor | None:
        if sub is None and units is None:
            return None
        p = sub if sub is not None else 1.0
        if layer is not None:
            p = p * layer
        if units is not None:
            p = p * (1.0 - torch.prod(1.0 - units, dim=-1))
        return p.sum()

    return {"attention": kept(mha, head), "ffn": kept(ffn, neuron)}


def target_at(step: int, target: float, warmup_steps: int) -> float:
    """Target sparsity at `step`: linear ramp from 0 to `target` over `warmup_steps`, then constant."""
    if warmup_steps <= 0:
        return float(target)
    return float(target) * min(1.0, max(0, step) / warmup_steps)


def layer_target_at(step: int, num_layers: int, target: int, warmup_steps: int) -> float:
    """Target number of kept sublayers at `step`: linear ramp from `num_layers` down to `target` over the warm-up."""
    return num_layers - target_at(step, num_layers - target, warmup_steps)


def lagrangian_term(
    sparsity: torch.Tensor, target: float, lambda_1: torch.Tensor, lambda_2: torch.Tensor
) -> torch.Tensor:
    """`lambda_1 (s - t) + lambda_2 (s - t)^2`: minimised over the gates, maximised over the lambdas."""
    gap = sparsity - target
    return lambda_1 * gap + lambda_2 * gap * gap
