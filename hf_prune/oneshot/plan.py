"""Which layers to prune, at which sparsity: resolved and validated against the model before any work."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .blocks import Blocks, block_linears, in_features, linear_weight_view
from .config import OneShotConfig, name_matches


@dataclass
class LayerPlan:
    name: str
    module: nn.Module
    sparsity: float
    mask: torch.Tensor | None = None  # fixed keep-mask (ADMM mask_mode="fixed")


def plan_layers(
    blocks: Blocks, config: OneShotConfig, masks: dict[str, torch.Tensor] | None = None
) -> list[list[LayerPlan]]:
    """Per block, the layers to prune. Raises `ValueError` naming the field for anything that cannot work."""
    owner = type(config).__name__
    per_block = [block_linears(block, f"{blocks.prefix}.{i}") for i, block in enumerate(blocks.layers)]
    every = {name: module for layer in per_block for name, module in layer.items()}
    examples = ", ".join(list(every)[:4])

    def check_matches(field: str, patterns) -> None:
        for pattern in patterns:
            if not any(name_matches(pattern, name) for name in every):
                raise ValueError(
                    f"{owner}.{field}: {pattern!r} matches no Linear module inside the transformer blocks "
                    f"({blocks.prefix}.*); module names look like: {examples}"
                )

    if config.targets is not None:
        check_matches("targets", config.targets)
    check_matches("ignore", config.ignore)
    check_matches("sparsity_overrides", config.sparsity_overrides)

    fixed = getattr(config, "mask_mode", "gradual") == "fixed"
    masks = dict(masks or {})
    if masks and not fixed:
        raise ValueError("masks= is only used by ADMMConfig(mask_mode='fixed'), to update weights for given masks")

    plan: list[list[LayerPlan]] = []
    for layer in per_block:
        entries = []
        for name, module in layer.items():
            if config.targets is not None and not any(name_matches(p, name) for p in config.targets):
                continue
            if any(name_matches(p, name) for p in config.ignore):
                continue
            sparsity = next(
                (s for p, s in config.sparsity_overrides.items() if name_matches(p, name)), config.sparsity
            )
            if config.n_m is not None and in_features(module) % config.n_m[1]:
                raise ValueError(
                    f"{owner}.pattern {config.pattern!r}: M={config.n_m[1]} does not divide the input size "
                    f"{in_features(module)} of {name}; ignore that module or choose another M"
                )
            mask = _fixed_mask(name, module, masks.pop(name, None)) if fixed else None
            if mask is not None:
                sparsity = 1.0 - mask.float().mean().item()
            entries.append(LayerPlan(name, module, sparsity, mask))
        plan.append(entries)
    if masks:
        raise ValueError(f"masks= names modules that are not pruning targets: {sorted(masks)[:5]}")
    if not any(plan):
        raise ValueError(f"{owner}: targets and ignore leave no module to prune")
    return plan


def _fixed_mask(name: str, module: nn.Module, given: torch.Tensor | None) -> torch.Tensor:
    weight = linear_weight_view(module)
    if given is None:
        # The weights are the reconstruction target, so the mask cannot come from an already-pruned weight.
        raise ValueError(
            f"ADMMConfig.mask_mode='fixed' needs masks= with a keep-mask for every target; {name} has none "
            "(pass the dense model and {module name: bool tensor (out, in)}, or narrow targets)"
        )
    if tuple(given.shape) != tuple(weight.shape):
        raise ValueError(
            f"masks[{name!r}] has shape {tuple(given.shape)}, expected {tuple(weight.shape)} (out, in) of the weight"
        )
    # an offloaded model is on the meta device until its block is loaded: the runner moves the mask then
    return given.to(device=given.device if weight.is_meta else weight.device, dtype=torch.bool)
