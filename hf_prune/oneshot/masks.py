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
    if rows == 1 and cols >= _NARROW_MIN:
        threshold, at_or_below = _kth_smallest_and_count(scores.reshape(-1), k)
        mask = scores > threshold
        if at_or_below == k:  # known from the bracket: no full pass to count the mask
            return mask
    else:
        threshold = scores.kthvalue(k, dim=1, keepdim=True).values
        mask = scores > threshold
        if not bool((mask.sum(dim=1) != cols - k).any()):
            return mask
    lowest = scores.topk(k, dim=1, largest=False).indices
    return torch.ones_like(scores, dtype=torch.bool).scatter_(1, lowest, False)


_NARROW_MIN = 1 << 16  # below this many scores, a plain kthvalue is as fast as narrowing first
_SAMPLE = 1 << 14


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a 1-D tensor: exactly `flat.kthvalue(k).values`, several times faster.

    ADMM re-selects a layer-wide mask every iteration, and `kthvalue` over millions of scores dominated its solve.
    A strided sample brackets the k-th value; the exact selection then runs on the few values inside the bracket.
    When the bracket misses (it cannot on continuous scores, but may on heavily tied ones) the full kthvalue runs.
    """
    if flat.numel() < _NARROW_MIN:
        return flat.kthvalue(k).values
    return _kth_smallest_and_count(flat, k)[0]


def _kth_smallest_and_count(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int]:
    """`kth_smallest` and how many values are <= it (k unless values tie with it), from the bracketed values."""
    n = flat.numel()
    sample = flat[:: max(1, n // _SAMPLE)]
    s = sample.numel()
    margin = max(16, int(4 * (s * (k / n) * (1 - k / n)) ** 0.5))  # ~4 standard deviations of the sample quantile
    pos = k * s / n
    lo = sample.kthvalue(max(1, min(s, int(pos) - margin))).values
    hi = sample.kthvalue(max(1, min(s, int(pos) + margin + 1))).values
    below_lo = flat < lo
    below = int(torch.count_nonzero(below_lo))
    inside = flat[(flat <= hi) ^ below_lo]  # lo <= value <= hi, in one pass more
    rank = k - below
    if 1 <= rank <= inside.numel():
        value = inside.kthvalue(rank).values
        return value, below + int(torch.count_nonzero(inside <= value))
    value = flat.kthvalue(k).values
    return value, int(torch.count_nonzero(flat <= value))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with exactly `n` kept in every group of `m` consecutive inputs of each row.

    Within a group the `n` highest scores are kept; of equal scores the earlier position wins. Ranks are counted
    over the `m` positions as contiguous slices (m² elementwise compares), which is several times faster than
    `topk` along a last dimension of 2–16 entries.
    """
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M pruning needs the input size ({cols}) divisible by M={m}")
    slices = scores.reshape(rows, cols // m, m).permute(2, 0, 1).contiguous()  # [m, rows, groups]
    keep = torch.empty(slices.shape, dtype=torch.bool, device=scores.device)
    for j in range(m):
        # how many positions of the group outrank position j (ties go to the earlier position)
        beaten_by = torch.zeros(slices.shape[1:], dtype=torch.uint8, device=scores.device)
        for i in range(m):
            if i != j:
                beaten_by += slices[i] >= slices[j] if i < j else slices[i] > slices[j]
        keep[j] = beaten_by < n
    return keep.permute(1, 2, 0).reshape(rows, cols)


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
