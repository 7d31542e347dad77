"""Least-squares refit of a projection whose inputs were removed, on calibration second moments of its input.

With `X` the layer's calibration inputs in the pruned model (tokens x in), `S` the kept inputs and `Y` the output the
refit should reproduce, `argmin_V ||Y - X_S V^T||^2` is `V^T = G[S, S]^-1 X_S^T Y`. Two targets:
- **layer** (`Y = X W^T`, the layer's own output on the pruned model's inputs): `V = W G[:, S] G[S, S]^-1` with
  `G = X^T X`;
- **dense** (`Y = X_d W^T`, the dense model's output of the same layer, `X_d` its inputs there): `V = W C[S, :]^T
  G[S, S]^-1` with the cross moment `C = X^T X_d`; this also absorbs the error of every unit removed upstream.
A ridge term `delta = damping * mean(diag G[S, S])` keeps the solve well posed. `damping = inf` would give back the
sliced weight's direction (importance only); 0 is the exact least-squares solution.
"""

from __future__ import annotations

import torch


def refit(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float,
          cross: torch.Tensor | None = None) -> torch.Tensor:
    """The `(out, len(keep))` weight over the kept inputs `keep` (indices) that best reproduces `weight @ x` (or,
    with `cross = X^T X_d`, `weight @ x_d`)."""
    w = weight.to(torch.float32)
    g = gram.to(device=w.device, dtype=torch.float32)
    c = g if cross is None else cross.to(device=w.device, dtype=torch.float32)
    g_ss = g.index_select(0, keep).index_select(1, keep)
    ridge = damping * g_ss.diagonal().mean().clamp_min(1e-12)
    g_ss = g_ss + ridge * torch.eye(len(keep), dtype=g.dtype, device=g.device)
    rhs = c.index_select(0, keep) @ w.T  # C[S, :] W^T: (|S|, out)
    chol, info = torch.linalg.cholesky_ex(g_ss)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T
    return torch.linalg.lstsq(g_ss, rhs).solution.T  # singular even with the ridge (damping=0, dead inputs)


def relative_error(weight: torch.Tensor, new_cols: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor,
                   cross: torch.Tensor | None = None, dense_gram: torch.Tensor | None = None) -> float:
    """`||Y - X_S V^T||^2 / ||Y||^2` from the second moments: the calibration reconstruction error of the layer whose
    weight `weight` became `new_cols` (`V`) over the kept inputs `keep`; `Y = X W^T`, or `X_d W^T` with `cross`
    (`X^T X_d`) and `dense_gram` (`X_d^T X_d`)."""
    w = weight.to(torch.float64)
    g = gram.to(device=w.device, dtype=torch.float64)
    c = g if cross is None else cross.to(device=w.device, dtype=torch.float64)
    d = g if dense_gram is None else dense_gram.to(device=w.device, dtype=torch.float64)
    v = new_cols.to(device=w.device, dtype=torch.float64)
    g_ss = g.index_select(0, keep).index_select(1, keep)
    ref = ((w @ d) * w).sum().clamp_min(1e-30)
    err = ref - 2 * (v * (w @ c.index_select(0, keep).T)).sum() + ((v @ g_ss) * v).sum()
    return float(err.clamp_min(0) / ref)
