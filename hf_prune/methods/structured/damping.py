"""`StructuredConfig(damping="auto")`: the refit's ridge chosen per layer by its error on held-out calibration windows.

The best ridge depends on the shape. On SmolLM2-135M (32 x 512 calibration tokens) a smaller ridge than 0.01 lowers
the held-out perplexity of shape B (FFN 864 of 1536 kept: 187 at 0.01, 170 at 0.001) and raises that of shape A
(FFN 1092 kept: 60 at 0.01, 87 at 0.0001), where the larger kept block overfits the calibration windows. So the
penalty is chosen the way ridge regression usually chooses it, by cross-validation: every `HOLDOUT_EVERY`-th
calibration window is held out, each candidate is fit on the others and scored by the layer's relative output error
on the held-out windows, and the layer is then refit on all windows with the winner.

Hand-written because the refit works on second moments only (`reconstruct.refit` / `relative_error`): the
validation error of a candidate is a closed form on the held-out Gram, so no token matrix is ever materialised,
which scikit-learn's `RidgeCV` would need.
"""

from __future__ import annotations

import torch
from torch import nn

from ...oneshot.blocks import run_block
from .reconstruct import refit, relative_error

#: ridge candidates (fractions of the mean diagonal of the kept Gram block), smallest first
CANDIDATES = (1e-4, 1e-3, 1e-2, 1e-1)
#: every HOLDOUT_EVERY-th window of each calibration batch is held out for choosing the ridge
HOLDOUT_EVERY = 4
#: the ridge used when there are no held-out windows (fewer than HOLDOUT_EVERY windows in every batch), and for
#: `refit_target="dense"` (whose paired moments are not split)
FALLBACK = 1e-2


@torch.no_grad()
def split_grams(block: nn.Module, lin: nn.Linear, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """`(G_fit, G_held_out)`: the Gram matrices of `lin`'s input over the fitting and the held-out calibration windows,
    from one run of `block` over every batch of `inputs` (the one-shot runner's captured block inputs)."""
    n = lin.in_features
    fit = torch.zeros(n, n, dtype=torch.float32, device=lin.weight.device)
    held = torch.zeros_like(fit)

    def hook(module, args):
        x = args[0].detach().to(torch.float32)
        windows = x.reshape(-1, x.shape[-2], n) if x.dim() > 2 else x.unsqueeze(0)
        is_held = torch.zeros(windows.shape[0], dtype=torch.bool, device=x.device)
        is_held[HOLDOUT_EVERY - 1::HOLDOUT_EVERY] = True
        for target, rows in ((fit, windows[~is_held]), (held, windows[is_held])):
            rows = rows.reshape(-1, n)
            if rows.shape[0]:
                target.addmm_(rows.T, rows)

    handle = lin.register_forward_pre_hook(hook)
    try:
        for hidden, extra, kwargs in zip(inputs.hidden, inputs.extra_args, inputs.kwargs):
            run_block(block, hidden, extra, kwargs)
    finally:
        handle.remove()
    return fit, held


def choose_damping(weight: torch.Tensor, fit: torch.Tensor, held: torch.Tensor, keep: torch.Tensor,
                   candidates=None) -> tuple[float, dict[float, float]]:
    """The candidate ridge whose refit on `fit` reproduces `weight`'s output best on the held-out Gram `held`, and
    every candidate's held-out relative error; `FALLBACK` (and no errors) when nothing was held out."""
    if not bool(held.diagonal().gt(0).any()):
        return FALLBACK, {}
    errors = {d: relative_error(weight, refit(weight, fit, keep, d), held, keep) for d in candidates or CANDIDATES}
    return min(errors, key=errors.get), errors
