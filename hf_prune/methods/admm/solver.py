"""ADMM layer solver: min ||XW'ᵀ - XWᵀ||² s.t. W' sparse, with a gradually selected mask (DESIGN §4)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from ...cpu import use_bf16
from ...oneshot.masks import gradual_nm_mask, nm_mask, prune_lowest
from ...oneshot.parking import ParkedTensor
from ...oneshot.solver import LayerSolver, LayerStats, LayerTask, register_solver
from .config import ADMMConfig

logger = logging.getLogger(__name__)

_EPS = 1e-8
_MAX_DAMPING_RETRIES = 4


@dataclass
class _Factors:
    """What depends on the Gram matrix alone, shared by every layer that reads the same input (q/k/v; gate/up)."""

    stats: LayerStats
    norms: torch.Tensor  # column scale sqrt(diag G)
    gram_hat: torch.Tensor | None  # normalised Gram matrix (the statistics' own tensor when they are scratch)
    singular: str  # why G is singular, or ''
    parked: ParkedTensor | None = None  # low_memory: Ĝ in a temporary file while not needed
    damping: float | None = None
    system_inv: torch.Tensor | None = None  # (Ĝ + δ·mean(diag Ĝ)·I + ρI)⁻¹, or None when not positive definite


@register_solver(ADMMConfig)
class ADMMSolver(LayerSolver):
    full_gram = True

    def __init__(self, config: ADMMConfig):
        super().__init__(config)
        self._factors: _Factors | None = None

    def release(self) -> None:
        self._factors = None

    def _normalised(self, stats: LayerStats) -> _Factors:
        if self._factors is None or self._factors.stats is not stats:
            self._factors = None  # the previous layer's n x n matrices go before this one's are made
            gram = stats.gram
            singular = _singularity(gram, stats.tokens)
            norms = gram.diagonal().sqrt() + _EPS
            # scratch statistics (the runner's) are normalised in place: one n x n matrix less at the peak
            gram_hat = gram if stats.scratch else gram.clone()
            gram_hat.div_(norms[:, None]).div_(norms[None, :])
            self._factors = _Factors(stats, norms, gram_hat, singular)
        return self._factors

    def _factorise(self, factors: _Factors, damping: float) -> torch.Tensor | None:
        """(Ĝ + shift·I)⁻¹ with Ĝ shifted in place and restored bit for bit (its diagonal saved), the Cholesky
        factor inverted in place: Ĝ and one more n x n matrix at the peak (was Ĝ, G, a shifted copy and the factor)."""
        if factors.damping != damping:
            factors.system_inv = None
            if factors.gram_hat is None:
                _unpark(factors)
            diagonal = factors.gram_hat.diagonal()
            saved = diagonal.clone()
            shift = damping * diagonal.mean() + self.config.rho
            diagonal.add_(shift)
            try:
                chol, info = torch.linalg.cholesky_ex(factors.gram_hat)
            finally:
                diagonal.copy_(saved)
            factors.damping = damping
            factors.system_inv = torch.cholesky_inverse(chol, out=chol) if int(info) == 0 else None
            if factors.system_inv is not None and self.low_memory:
                _park(factors)  # needed again only for a damping retry
        return factors.system_inv

    def solve(self, task: LayerTask) -> torch.Tensor:
        cfg: ADMMConfig = self.config
        factors = self._normalised(task.stats)
        damping = cfg.damping
        reason = factors.singular
        if reason:
            damping = cfg.damping * 10
            warnings.warn(
                f"hf_prune ADMM: Gram matrix of {task.name} is singular ({reason}); damping raised from "
                f"{cfg.damping:g} to {damping:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
        for _ in range(_MAX_DAMPING_RETRIES):
            system_inv = self._factorise(factors, damping)
            result = None if system_inv is None else self._admm(task, system_inv, factors.norms)
            if result is not None and bool(torch.isfinite(result).all()):
                return result.div_(factors.norms[None, :])
            warnings.warn(
                f"hf_prune ADMM: {task.name} diverged (non-finite or non-PD system) at damping {damping:g}; "
                f"retrying with {damping * 10:g}.",
                RuntimeWarning,
                stacklevel=2,
            )
            damping *= 10
        raise FloatingPointError(f"ADMM could not produce finite weights for {task.name} even at damping {damping:g}")

    def _admm(self, task: LayerTask, system_inv: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """T ADMM iterations. With S = (Ĝ_δ + ρI)⁻¹ the V-step (ŴĜ_δ + ρ(Z - U))S is ŴĜ_δS + ρ(Z - U)S, and
        ŴĜ_δS = Ŵ - ρŴS, so each iteration is one fused `addmm` plus four elementwise passes into reused buffers
        (five weight-sized fp32 buffers and the mask: Ŵ is the first V, Z - U goes where V + U was, the result is
        built in place; `Ŵ = W·norms`, column-wise, |Ŵ| being Wanda's score, is made here, fresh for each retry).
        With `matmul_precision="bfloat16"` the product of the mask-selection iterations runs in bfloat16 (ADMM is a
        fixed-point iteration: the later float32 iterations remove what rounding perturbed); on a CPU without native
        bf16, where it would be ~10x slower, it runs in float32 with a warning (`hf_prune.cpu.use_bf16`)."""
        cfg: ADMMConfig = self.config
        rho = cfg.rho
        weight_hat = task.weight * norms[None, :]
        target = torch.addmm(weight_hat, weight_hat, system_inv, alpha=-rho)  # ŴĜ_δS
        mask = task.mask if cfg.mask_mode == "fixed" else None
        keep = None if mask is None else mask.to(weight_hat.dtype)
        fast_until = 0
        if cfg.matmul_precision == "bfloat16" and cfg.mask_mode == "gradual" and use_bf16(
                True, "ADMM's matmul_precision='bfloat16'", weight_hat.device):
            fast_until = min(cfg.mask_iterations, cfg.iterations - 1)
            system_inv_bf16 = (system_inv * rho).to(torch.bfloat16)
        v = weight_hat  # overwritten only after its last use (`target` above)
        del weight_hat
        u = torch.zeros_like(v)
        vu, z = torch.empty_like(v), torch.empty_like(v)
        for t in range(cfg.iterations):
            torch.add(v, u, out=vu)
            if cfg.mask_mode == "gradual" and (t < cfg.mask_iterations or mask is None):
                mask = keep = None  # the previous mask goes before the next is chosen; Z holds the scores
                mask = self._select(torch.abs(vu, out=z), task, min(t, max(cfg.mask_iterations - 1, 0)))
                keep = mask.to(vu.dtype)
            torch.mul(vu, keep, out=z)  # Z = Π(V + U)
            torch.sub(vu, z, out=u)  # U + V - Z
            d = torch.sub(z, u, out=vu)  # V + U is not read again this iteration
            if t < fast_until:
                torch.add(target, torch.mm(d.to(torch.bfloat16), system_inv_bf16), out=v)
            else:
                torch.addmm(target, d, system_inv, alpha=rho, out=v)
        del target, z
        return torch.add(v, u, out=vu).mul_(keep)

    def _select(self, scores: torch.Tensor, task: LayerTask, step: int) -> torch.Tensor:
        """The keep-mask for iteration `step` from `scores` = |V + U|."""
        cfg: ADMMConfig = self.config
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


def _park(factors: _Factors) -> None:
    """Moves Ĝ into an anonymous temporary file (exact bytes) and drops it, from the statistics too when it is
    theirs (scratch): an offloaded run's `down_proj` iterations then hold S alone (-121 MiB at n = 5632)."""
    factors.parked = ParkedTensor(factors.gram_hat)
    if factors.stats.gram is factors.gram_hat:
        factors.stats.gram = None
    factors.gram_hat = None


def _unpark(factors: _Factors) -> None:
    factors.gram_hat = factors.parked.restore()
    factors.parked = None


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
