"""Mask selection shared by all one-shot methods. A mask is a bool tensor shaped like the weight, True = kept.

Counts are exact: pruning a fraction `s` of `n` weights removes exactly `int(s * n)` of them (per group), ties
included, which the tests rely on.
"""

from __future__ import annotations

import torch


def num_to_prune(sparsity: float, size: int) -> int:
    # The small epsilon keeps e.g. 0.7 * 10 from flooring to 6 through float error.
    return min(size, int(sparsity * size + 1e-6))


def prune_lowest(scores: torch.Tensor, sparsity: float, group: str = "layer") -> torch.Tensor:
    """Keep-mask dropping the lowest-scoring `sparsity` fraction over the whole layer or within each output row."""
    if group == "row":
        k = num_to_prune(sparsity, scores.shape[1])
        return lowest_k_mask(scores, k)
    k = num_to_prune(sparsity, scores.numel())
    return lowest_k_mask(scores.reshape(1, -1), k).view_as(scores)


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask of a 2-D score tensor dropping exactly the `k` lowest scores of every row."""
    rows, cols = scores.shape
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.zeros_like(scores, dtype=torch.bool)
    # kthvalue (selection, O(n)) is much cheaper than a sort; fall back to exact indices only when ties at the
    # threshold would make the count inexact.
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values
    mask = scores > threshold
    if bool((mask.sum(dim=1) != cols - k).any()):
        lowest = scores.topk(k, dim=1, largest=False).indices
        mask = torch.ones_like(scores, dtype=torch.bool).scatter_(1, lowest, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly `n` kept in every group of `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) divisible by M={m}")
    grouped = scores.reshape(rows, cols // m, m)
    keep = grouped.topk(n, dim=-1).indices
    return torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, keep, True).view(rows, cols)


def select_mask(
    scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None, group: str = "layer"
) -> torch.Tensor:
    """The final mask of a method: N:M when `n_m` is given, else the lowest `sparsity` fraction per `group`."""
    if n_m is not None:
        return nm_mask(scores, *n_m)
    return prune_lowest(scores, sparsity, group)


def gradual_nm_mask(scores: torch.Tensor, fraction: float, n: int, m: int) -> torch.Tensor:
    """An intermediate N:M mask for gradual selection: the top `n` of every group always stay; of the rest, the
    lowest-scoring `fraction` of the whole layer is pruned. At `fraction = 1 - n/m` this is exactly N:M."""
    protected = nm_mask(scores, n, m)
    ranked = scores.masked_fill(protected, float("inf"))
    return prune_lowest(ranked, fraction, "layer")
