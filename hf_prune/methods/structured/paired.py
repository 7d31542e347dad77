"""Second moments of one projection's inputs in the pruned model paired with the dense model's (for the dense-target
refit of `reconstruct.py`): both blocks run on the same calibration windows, each from its own model's hidden states."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...oneshot.blocks import BlockInputs, run_block


@dataclass
class PairedMoments:
    gram: torch.Tensor  # X^T X: the pruned model's inputs
    cross: torch.Tensor  # X^T X_d
    dense_gram: torch.Tensor  # X_d^T X_d


def _first_input(module: nn.Module, block: nn.Module, inputs: BlockInputs, b: int) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        run_block(block, inputs.hidden[b], inputs.extra_args[b], inputs.kwargs[b])
    finally:
        handle.remove()
    x = seen[0]
    return x.reshape(-1, x.shape[-1]).to(torch.float32)


@torch.no_grad()
def paired_moments(block: nn.Module, module: nn.Module, inputs: BlockInputs,
                   dense_block: nn.Module, dense_module: nn.Module, dense_inputs: BlockInputs) -> PairedMoments:
    """Runs `block` and `dense_block` over every calibration batch and accumulates the moments of the inputs of
    `module` (in `block`) and `dense_module` (in `dense_block`)."""
    m = None
    for b in range(len(inputs.hidden)):
        xd = _first_input(dense_module, dense_block, dense_inputs, b)
        x = _first_input(module, block, inputs, b)
        if m is None:
            p, q = x.shape[1], xd.shape[1]
            m = PairedMoments(*(torch.zeros(r, c, device=x.device) for r, c in ((p, p), (p, q), (q, q))))
        m.gram.addmm_(x.T, x)
        m.cross.addmm_(x.T, xd.to(x.device))
        m.dense_gram.addmm_(xd.T, xd)
    for name, t in vars(m).items():
        if not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"structured refit: the calibration {name} of a projection overflowed; prune in "
                                     "float32 or bfloat16")
    return m
