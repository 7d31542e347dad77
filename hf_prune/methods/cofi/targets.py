"""Sheared-LLaMA's target architecture: one Lagrangian constraint per dimension, exact counts in the fixed masks.

`CoFiConfig.target_layers / target_heads (or target_kv_heads) / target_intermediate_size / target_hidden_size`
describe the shape the pruned decoder should have (Xia et al., 2023, "Sheared LLaMA"). Each dimension's expected
count under the gates (`E[layers] = sum_l p_layer(l)`, `E[kv heads] = sum_l p_layer p_mha sum_h p_head`,
`E[neurons] = sum_l p_layer p_ffn sum_i p_neuron`, `E[hidden] = sum_j p_hidden(j)`) is driven to its target, which
ramps linearly from the model's count over the warm-up, by its own `lambda_1 gap + lambda_2 gap^2` term (the gap as a
fraction of the model's count). A dimension the config does not name keeps the model's count, so the target is a
whole architecture. When the masks are fixed, every dimension keeps exactly its target (the highest logits, per
layer for heads and neurons), so the export is uniform and loads as a plain config of its class.
"""

from __future__ import annotations

import torch

from .gates import LIMIT_L, LIMIT_R
from .sparsity import EncoderDims, unit_counts

# dimension -> the gate whose units it counts
ARCH_GATES = {"layers": "layer", "kv_heads": "head", "intermediate_size": "neuron", "hidden_size": "hidden"}
# a kept unit whose test-time gate value is 0 would vanish from the shape; the fixed masks keep it at this value
_MIN_KEPT = 1e-2


def resolve_arch_targets(config, adapter) -> dict[str, int]:
    """The target architecture as kept units per dimension (`kv_heads` per kept layer), checked against the model.

    Empty without a target architecture. Raises `ValueError` naming the field for a target the model cannot have.
    """
    arch = config.target_architecture()
    if not arch:
        return {}
    given = ", ".join(f"target_{k}={v}" for k, v in arch.items())
    if adapter.kind != "decoder":
        raise ValueError(
            f"CoFiConfig: a target architecture ({given}) is for LLaMA-family decoders; this model is a "
            f"{type(adapter.model).__name__}: use target_sparsity (and target_attention_layers / target_ffn_layers)"
        )
    d: EncoderDims = adapter.dims
    arch = check_arch_fits("CoFiConfig", arch, d)
    full = {"layers": d.num_layers, "kv_heads": d.head_units, "intermediate_size": d.intermediate_size,
            "hidden_size": d.hidden_size}
    enabled = {"layers": config.prune_layers, "kv_heads": config.prune_heads,
               "intermediate_size": config.prune_neurons, "hidden_size": config.prune_hidden}
    return {n: int(arch.get(n, full[n])) for n in full if enabled[n]}


def check_arch_fits(owner: str, arch: dict[str, int], d: EncoderDims) -> dict[str, int]:
    """`arch` (target-architecture fields that are set) checked against the model's dimensions `d`, with
    `heads` turned into `kv_heads` (a KV head is pruned with its query heads). Raises `ValueError` naming
    `owner.target_<field>` for a count the model cannot have."""
    arch = dict(arch)
    limits = {"layers": (d.num_layers, "num_hidden_layers"), "heads": (d.num_heads, "num_attention_heads"),
              "kv_heads": (d.head_units, "num_key_value_heads"),
              "intermediate_size": (d.intermediate_size, "intermediate_size"),
              "hidden_size": (d.hidden_size, "hidden_size")}
    for name, value in arch.items():
        limit, field = limits[name]
        if value > limit:
            raise ValueError(f"{owner}.target_{name}={value} is larger than the model ({field}={limit})")
    if "heads" in arch:
        g = d.group_size
        if arch["heads"] % g:
            raise ValueError(
                f"{owner}.target_heads={arch['heads']} does not divide into the model's KV groups: each of its "
                f"{d.head_units} KV heads serves {g} query heads (num_attention_heads={d.num_heads} / "
                f"num_key_value_heads={d.head_units}) and a KV head is pruned with its query heads; allowed: "
                f"{list(range(g, d.num_heads + 1, g))} (or give target_kv_heads)"
            )
        arch["kv_heads"] = arch.pop("heads") // g
    return arch


def full_counts(dims: EncoderDims) -> dict[str, int]:
    """Each dimension's count in the dense model (totals over layers for heads and neurons)."""
    L = dims.num_layers
    return {"layers": L, "kv_heads": L * dims.head_units, "intermediate_size": L * dims.intermediate_size,
            "hidden_size": dims.hidden_size}


def target_counts(targets: dict[str, int], dims: EncoderDims) -> dict[str, int]:
    """The final target of each constrained dimension as a count comparable to [`expected_counts`]."""
    layers = targets.get("layers", dims.num_layers)
    per_layer = {"kv_heads", "intermediate_size"}
    return {n: v * layers if n in per_layer else v for n, v in targets.items()}


def expected_counts(dims: EncoderDims, probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Expected kept layers, KV heads (total), FFN neurons (total) and hidden dims; exact for 0/1 inputs."""
    c = unit_counts(dims, **probs)
    return {"layers": c["layers"], "kv_heads": c["heads"].sum(), "intermediate_size": c["neurons"].sum(),
            "hidden_size": c["hidden"]}


def ramped(final: float, full: float, fraction: float) -> float:
    """The target at `fraction` of the warm-up: linear from the model's count `full` to `final`."""
    return full - fraction * (full - final)


def _top(log_alpha: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over the last dimension keeping the `k` highest logits per row, at their test-time gate values."""
    soft = (torch.sigmoid(log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(_MIN_KEPT, 1.0)
    keep = torch.zeros_like(soft, dtype=torch.bool)
    keep.scatter_(-1, torch.topk(log_alpha, k, dim=-1).indices, True)
    return torch.where(keep, soft, torch.zeros_like(soft))


def _kept(log_alpha: torch.Tensor) -> torch.Tensor:
    return _top(log_alpha, log_alpha.shape[-1])


@torch.no_grad()
def exact_arch_masks(masks: dict[str, torch.Tensor], gates, targets: dict[str, int]) -> dict[str, torch.Tensor]:
    """`masks` with every targeted dimension keeping exactly its target: the top layers by layer logit, and in every
    layer the top KV groups / neurons by logit, with each kept layer's attention and FFN sublayer gates kept."""
    masks = dict(masks)
    logits = {n: g.log_alpha.detach() for n, g in gates.gates.items()}
    for dim, gate in ARCH_GATES.items():
        if dim in targets and gate in logits:
            masks[gate] = _top(logits[gate], targets[dim])
    for sub, units in (("mha", "kv_heads"), ("ffn", "intermediate_size")):
        if units in targets and sub in logits:  # a layer keeps its target heads / neurons, so its sublayer stays
            masks[sub] = _kept(logits[sub])
    return masks
