"""ADMM layer solver: min ||XW'ᵀ - XWᵀ||² s.t. W' sparse, with a gradually selected mask (DESIGN §4)."""

from __future__ import annotations

import logging
import warnings

import torch

from ...oneshot.masks import gradual_nm_mask, nm_mask, prune_lowest
from ...oneshot.solver import LayerSolver, LayerTask, register_solver
from .config import ADMMConfig

logger = logging.getLogger(__name__)

_EPS = 1e-8
_MAX_DAMPING_RETRIES = 4


@register_solver(ADMMConfig)
class ADMMSolver(LayerSolver):
    full_gram = True

    def solve(self, task: LayerTask) -> torch.Tensor:
        cfg: ADMMConfig = self.config
        gram = task.stats.gram
        norms = gram.diagonal().sqrt() + _EPS
        gram_hat = gram / norms[:, None] / norms[None, :]
        weight_hat = task.weight * norms[None, :]  # column-wise scaling: |Ŵ| is Wanda's score

        damping = cfg.damping
        reason = _singularity(gram, task.stats.tokens)
        if reason:
            damping = cfg.damping * 10
            warnings.warn(
                f"hf_prune ADMM: Gram matrix of {task.name} is singular ({reason}); damping raised from "
                f"{cfg.damping:g} to {damping:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
        for _ in range(_MAX_DAMPING_RETRIES):
            result = self._admm(task, gram_hat, weight_hat, damping)
            if result is not None and bool(torch.isfinite(result).all()):
                return result / norms[None, :]
            warnings.warn(
                f"hf_prune ADMM: {task.name} diverged (non-finite or non-PD system) at damping {damping:g}; "
                f"retrying with {damping * 10:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            damping *= 10
        raise FloatingPointError(f"ADMM could not produce finite weights for {task.name} even at damping {damping:g}")

    def _admm(self, task: LayerTask, gram_hat, weight_hat, damping: float) -> torch.Tensor | None:
        cfg: ADMMConfig = self.config
        n = gram_hat.shape[0]
        eye = torch.eye(n, dtype=gram_hat.dtype, device=gram_hat.device)
        gram_hat = gram_hat + damping * gram_hat.diagonal().mean() * eye
        chol, info = torch.linalg.cholesky_ex(gram_hat + cfg.rho * eye)
        if int(info) != 0:
            return None
        system_inv = torch.cholesky_inverse(chol)  # (Ĝ + ρI)⁻¹, symmetric: right-multiplying rows of W is exact
        target = weight_hat @ gram_hat  # Ŵ Ĝ, the reconstruction term in (out, in) layout

        if cfg.mask_mode == "fixed":
            mask = task.mask
        else:
            mask = None
        v = weight_hat
        u = torch.zeros_like(v)
        for t in range(cfg.iterations):
            if cfg.mask_mode == "gradual" and (t < cfg.mask_iterations or mask is None):
                mask = self._select(v + u, task, min(t, max(cfg.mask_iterations - 1, 0)))
            z = (v + u) * mask
            u = u + v - z
            v = (target + cfg.rho * (z - u)) @ system_inv
        return (v + u) * mask

    def _select(self, scores_source: torch.Tensor, task: LayerTask, step: int) -> torch.Tensor:
        cfg: ADMMConfig = self.config
        scores = scores_source.abs()
        if cfg.mask_iterations == 0:
            fraction = task.sparsity
        else:
            fraction = cfg.sparsity_at(step, task.sparsity)
        if task.n_m is not None:
            n, m = task.n_m
            if fraction >= task.sparsity - 1e-12:
                return nm_mask(scores, n, m)
            return gradual_nm_mask(scores, fraction, n, m)
        return prune_lowest(scores, fraction, cfg.mask_group)


def _singularity(gram: torch.Tensor, tokens: int) -> str:
    """Why the Gram matrix is singular, or '' if it is not obviously so."""
    dead = int((gram.diagonal() <= 0).sum())
    n = gram.shape[0]
    reasons = []
    if dead:
        reasons.append(f"{dead} of {n} inputs are always zero")
    if tokens < n:
        reasons.append(f"{tokens} calibration tokens for {n} inputs")
    return "; ".join(reasons)
