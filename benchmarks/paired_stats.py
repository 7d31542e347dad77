"""Small-sample statistics of the benchmarks: mean ± std over seeds and paired-difference t intervals.

Written by hand because scipy is not a dependency of hf_prune: the only non-trivial piece is the Student t quantile,
held as a table of the two-sided 95 % critical values for 1–30 degrees of freedom (standard tables, 3 decimals) with
a Cornish–Fisher expansion of the normal quantile beyond (error < 1e-3 for df > 30).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# t_{0.975, df} for df = 1..30
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the half-width factor of a 95 % interval)."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"t_quantile_975: df must be an int >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975  # Cornish–Fisher expansion of t in powers of 1/df
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (n − 1; 0 for one value) and n."""
    if not values:
        raise ValueError("mean_std: no values")
    values = [float(v) for v in values]
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired difference a − b (same seeds, same order) with its two-sided 95 % t interval.

    Returns `mean`, `std` (of the differences), `n`, `low`, `high` and `significant` (the interval excludes 0).
    With one pair there is no interval (`low` = `high` = None, not significant).
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: need two equally long non-empty sequences, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    out = mean_std(diffs)
    if out["n"] < 2:
        return {**out, "low": None, "high": None, "significant": False}
    half = t_quantile_975(out["n"] - 1) * out["std"] / math.sqrt(out["n"])
    low, high = out["mean"] - half, out["mean"] + half
    return {**out, "low": low, "high": high, "significant": low > 0 or high < 0}


def paired_ratios(times: Sequence[float], baseline: Sequence[float]) -> dict:
    """Per-round ratios `times[i] / baseline[i]` (both measured in the same interleaved round) and their median,
    min and max.

    A slow spell of the machine, or a baseline that flips between two speeds from one process to the next, moves both
    times of a round together, or shows as one outlying ratio, instead of moving a best-over-best ratio's
    denominator alone. Returns `median`, `min`, `max`, `n` and `per_round` (in round order).
    """
    if len(times) != len(baseline) or not times:
        raise ValueError(f"paired_ratios: need one time and one baseline time per round, got {len(times)} times and "
                         f"{len(baseline)} baseline times")
    bad = [(i, b) for i, b in enumerate(baseline) if not b > 0]
    if bad:
        raise ValueError(f"paired_ratios: every baseline time must be > 0, got {bad[0][1]!r} in round {bad[0][0]}")
    ratios = [float(t) / float(b) for t, b in zip(times, baseline)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
            "per_round": ratios}
