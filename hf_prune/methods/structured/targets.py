"""The target shape of a structured one-shot run, resolved against the model and checked before any work."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..cofi.arch import _LLAMA_FAMILY, LlamaFamilyAdapter
from ..cofi.targets import check_arch_fits
from .config import StructuredConfig


@dataclass(frozen=True)
class TargetShape:
    """Kept units: decoder layers, KV groups per layer, FFN width per layer, hidden size."""

    layers: int
    kv_heads: int
    intermediate_size: int
    hidden_size: int


def adapter_for(model: nn.Module) -> LlamaFamilyAdapter:
    """The decoder adapter of `model`, or a `ValueError` naming the supported classes."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    classes = _LLAMA_FAMILY.get(model_type)
    if classes is None or type(model).__name__ not in classes:
        supported = sorted(c for family in _LLAMA_FAMILY.values() for c in family)
        raise ValueError(
            f"StructuredConfig: structured one-shot pruning supports LLaMA-family causal LMs {supported}; got "
            f"{type(model).__name__} (model_type={model_type!r})"
        )
    return LlamaFamilyAdapter(model)


def prunable_params(dims, shape: TargetShape) -> int:
    """Weights of the attention and FFN matrices of a decoder of `shape` (what `target_sparsity` counts)."""
    per_layer = dims.head_dim * (2 * dims.group_size + 2) * shape.kv_heads + 3 * shape.intermediate_size
    return shape.layers * per_layer * shape.hidden_size


def full_shape(dims) -> TargetShape:
    return TargetShape(dims.num_layers, dims.head_units, dims.intermediate_size, dims.hidden_size)


def resolve_target(config: StructuredConfig, ad: LlamaFamilyAdapter) -> TargetShape:
    """The shape `config` asks of this model. Raises `ValueError` naming the field for a shape it cannot have."""
    d = ad.dims
    full = full_shape(d)
    if config.target_sparsity is not None:
        shape = _from_sparsity(float(config.target_sparsity), d, full)
    else:
        arch = check_arch_fits("StructuredConfig", config.target_architecture(), d)
        shape = TargetShape(**{n: int(arch.get(n, getattr(full, n))) for n in full.__dataclass_fields__})
    if config.uniform:  # per-layer shapes keep the original config (with the structure record)
        check_plain_config(ad, shape)
    return shape


def _from_sparsity(s: float, d, full: TargetShape) -> TargetShape:
    """The documented split of `target_sparsity` (see `StructuredConfig`): KV groups by the same fraction, rounded,
    then the FFN width that lands the total on the target; depth and hidden size stay."""
    kv = max(1, round(d.head_units * (1.0 - s)))
    budget = (1.0 - s) * prunable_params(d, full)
    attn = d.head_dim * (2 * d.group_size + 2) * kv * d.hidden_size * d.num_layers
    width = round((budget - attn) / (3 * d.hidden_size * d.num_layers))
    if not 1 <= width <= d.intermediate_size:
        raise ValueError(
            f"StructuredConfig.target_sparsity={s}: keeping {kv} of {d.head_units} KV groups per layer, the FFN width "
            f"would have to be {width} (the model's is {d.intermediate_size}) to reach it; give a target "
            "architecture (target_layers, target_kv_heads, target_intermediate_size, target_hidden_size) instead"
        )
    return TargetShape(d.num_layers, kv, width, d.hidden_size)


def check_plain_config(ad: LlamaFamilyAdapter, shape: TargetShape) -> None:
    """Refuses a shape the model's config class will not accept as a plain config (so that the result saves as an
    ordinary checkpoint); `LlamaConfig` wants `hidden_size` divisible by `num_attention_heads`."""
    d = ad.dims
    config = copy.deepcopy(ad.model.config)
    heads = shape.kv_heads * d.group_size
    config.num_hidden_layers, config.num_attention_heads = shape.layers, heads
    config.num_key_value_heads, config.intermediate_size = shape.kv_heads, shape.intermediate_size
    config.hidden_size, config.head_dim = shape.hidden_size, d.head_dim
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[: shape.layers]
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except (StrictDataclassError, ValueError) as err:
        cause = getattr(err, "__cause__", None) or err
        start = heads * max(1, shape.hidden_size // heads - 2)
        near = [h for h in range(start, start + 6 * heads, heads) if h <= d.hidden_size]
        raise ValueError(
            f"StructuredConfig: hidden size {shape.hidden_size} (target_hidden_size, or the model's when not given) "
            f"with {heads} query heads is refused by "
            f"{type(config).__name__} as a plain config ({cause}); choose a hidden size divisible by the heads, "
            f"e.g. {near[:6]}"
        ) from None
