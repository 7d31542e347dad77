"""Outlier-weighted layer-wise sparsity (OWL, Yin et al. 2023): non-uniform sparsity across blocks.

A block's outlier ratio is the fraction of its Wanda scores |W_ij|·||X_j|| above `owl_threshold` times the block's
mean score, measured on the dense model. Ratios are rescaled to [0, 2λ], centred, and blocks with more outliers
keep more weights; the mean block sparsity equals the target.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .blocks import capture_block_inputs, linear_weight_view
from .passes import advance, collect_stats


def owl_block_sparsities(model, blocks, plan, batches, config, show_progress: bool) -> list[float]:
    inputs = capture_block_inputs(model, blocks, batches)
    ratios = []
    bar = tqdm(blocks.layers, desc="OWL: outlier ratios", unit="block", disable=not show_progress)
    for index, (block, entries) in enumerate(zip(bar, plan)):
        if entries:
            stats = collect_stats(block, entries, inputs, full_gram=False)
            scores = torch.cat(
                [
                    (linear_weight_view(e.module).float().abs() * stats[e.name].column_sq_norms.sqrt()[None, :]).flatten()
                    for e in entries
                ]
            )
            ratios.append((scores > config.owl_threshold * scores.mean()).float().mean().item())
        else:
            ratios.append(None)
        if index + 1 < len(blocks.layers):
            advance(block, inputs)
    return owl_sparsities_from_ratios(ratios, config.sparsity, config.owl_lambda)


def owl_sparsities_from_ratios(ratios: list[float | None], sparsity: float, owl_lambda: float) -> list[float]:
    """Block sparsities from outlier ratios (blocks without targets, `None`, keep the target sparsity)."""
    known = torch.tensor([r for r in ratios if r is not None], dtype=torch.float64)
    if known.numel() == 0 or float(known.max() - known.min()) == 0.0:
        return [sparsity] * len(ratios)
    scaled = (known - known.min()) / (known.max() - known.min()) * (2 * owl_lambda)
    keep = scaled - scaled.mean() + (1.0 - sparsity)
    values = iter((1.0 - keep).tolist())
    return [next(values) if r is not None else sparsity for r in ratios]
