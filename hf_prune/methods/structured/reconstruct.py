"""Least-squares refit of a projection whose inputs were removed, on the calibration Gram matrix of its input.

With `X` the layer's calibration inputs (tokens x in), `G = X^T X` and `S` the kept inputs, the weight over `S` that
best reproduces the dense layer's output, `argmin_V ||X W^T - X_S V^T||^2`, is `V = W G[:, S] G[S, S]^-1`; a ridge
term `delta = damping * mean(diag G[S, S])` keeps the solve well posed. `damping = inf` would give back the sliced
weight's direction (importance only); 0 is the exact least-squares solution.
"""

from __future__ import annotations

import torch


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """The `(out, len(keep))` weight over the kept inputs `keep` (indices) that best reproduces `weight @ x`."""
    w = weight.to(torch.float32)
    g = gram.to(device=w.device, dtype=torch.float32)
    g_ss = g.index_select(0, keep).index_select(1, keep)
    ridge = damping * g_ss.diagonal().mean().clamp_min(1e-12)
    g_ss = g_ss + ridge * torch.eye(len(keep), dtype=g.dtype, device=g.device)
    rhs = g.index_select(0, keep) @ w.T  # G[S, :] W^T: (|S|, out)
    chol, info = torch.linalg.cholesky_ex(g_ss)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(g_ss, rhs).solution.T  # singular even with the ridge (damping=0, dead inputs)


def relative_error(weight: torch.Tensor, new_cols: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> float:
    """`||X W^T - X_S V^T||^2 / ||X W^T||^2` from the Gram matrix: the calibration reconstruction error of the layer
    whose weight `weight` became `new_cols` over the kept inputs `keep`."""
    w = weight.to(torch.float32)
    g = gram.to(device=w.device, dtype=torch.float32)
    diff = w.clone()
    diff[:, keep] -= new_cols.to(torch.float32)
    err = ((diff @ g) * diff).sum()
    ref = ((w @ g) * w).sum().clamp_min(1e-30)
    return float(err / ref)
