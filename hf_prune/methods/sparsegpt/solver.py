"""SparseGPT layer solver: the OBS column sweep with lazy block updates (Frantar & Alistarh, 2023)."""

from __future__ import annotations

import warnings

import torch

from ...oneshot.masks import lowest_k_mask, num_to_prune
from ...oneshot.solver import LayerSolver, LayerTask, register_solver
from .config import SparseGPTConfig


@register_solver(SparseGPTConfig)
class SparseGPTSolver(LayerSolver):
    full_gram = True

    def solve(self, task: LayerTask) -> torch.Tensor:
        cfg: SparseGPTConfig = self.config
        weight = task.weight.clone()
        rows, cols = weight.shape
        hessian = task.stats.gram * (2.0 / max(task.stats.tokens, 1))
        dead = hessian.diagonal() == 0
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
        hinv = _upper_cholesky_of_inverse(hessian, cfg.damping, task.name)

        n_m = task.n_m
        for start in range(0, cols, cfg.block_size):
            end = min(start + cfg.block_size, cols)
            block = weight[:, start:end].clone()
            hinv_block = hinv[start:end, start:end]
            diag = hinv_block.diagonal()
            pruned = torch.zeros_like(block)
            errors = torch.zeros_like(block)
            if n_m is None:
                # Exact per-layer count: this block prunes its share of floor(s * numel) along the sweep.
                k = num_to_prune(task.sparsity, rows * end) - num_to_prune(task.sparsity, rows * start)
                scores = block.square() / diag.square()[None, :]
                drop = ~lowest_k_mask(scores.reshape(1, -1), k).view_as(block)
            else:
                drop = torch.zeros_like(block, dtype=torch.bool)
            for i in range(end - start):
                column = block[:, i]
                if n_m is not None and i % n_m[1] == 0:
                    n, m = n_m
                    scores = block[:, i : i + m].square() / diag[i : i + m].square()[None, :]
                    lowest = scores.topk(m - n, dim=1, largest=False).indices
                    drop.scatter_(1, i + lowest, True)
                quantised = column.masked_fill(drop[:, i], 0.0)
                pruned[:, i] = quantised
                err = (column - quantised) / diag[i]
                block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]
                errors[:, i] = err
            weight[:, start:end] = pruned
            weight[:, end:] -= errors @ hinv[start:end, end:]
        return weight


def _upper_cholesky_of_inverse(hessian: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    mean_diag = hessian.diagonal().mean()
    for attempt in range(5):
        # the damping goes onto a copy's diagonal in place: no identity and no sum buffer (two n x n matrices less
        # at the peak of a 1B offloaded run), and the same values as `hessian + shift * eye`
        damped = hessian.clone()
        damped.diagonal().add_((damping * 10**attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
        warnings.warn(
            f"hf_prune SparseGPT: Hessian of {name} is not positive definite at damping {damping * 10**attempt:g}; "
            f"raising damping to {damping * 10 ** (attempt + 1):g}.",
            RuntimeWarning,
            stacklevel=3,
        )
    raise FloatingPointError(f"SparseGPT could not factorise the Hessian of {name}")
