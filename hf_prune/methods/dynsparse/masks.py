"""Block masks: one bool per block (per weight when unstructured), never a dense float copy of a weight.

A weight W of shape (O, I) with blocks of (R, C) is viewed as (O/R, R, I/C, C); the mask has shape (O/R, I/C) and
broadcasts over the block dimensions, so masking is an in-place multiply without expanding the mask.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from torch import nn


class BlockMask:
    """The sparsity pattern of one weight.

    Args:
        name (`str`): qualified module name (for messages and checkpoints).
        weight (`torch.Tensor`): the 2-D weight the mask applies to.
        block_shape (`tuple[int, int]`): (rows, cols) of one block; must divide the weight's shape.
    """

    def __init__(self, name: str, weight: torch.Tensor, block_shape: tuple[int, int]):
        if weight.dim() != 2:
            raise ValueError(f"DynSparse: {name!r} has a {weight.dim()}-D weight; only 2-D Linear weights are supported")
        rows, cols = block_shape
        out_f, in_f = weight.shape
        if out_f % rows or in_f % cols:
            raise ValueError(
                f"DynSparseConfig.block_size={rows}x{cols} does not divide the weight of {name!r} with shape "
                f"({out_f}, {in_f}); choose a block size dividing every sparse weight or exclude the module "
                "(exclude_modules)"
            )
        self.name = name
        self.block_shape = (rows, cols)
        self.weight_shape = (out_f, in_f)
        self.grid = (out_f // rows, in_f // cols)
        self.mask = torch.zeros(self.grid, dtype=torch.bool, device=weight.device)
        self.ever_active = torch.zeros(self.grid, dtype=torch.bool, device=weight.device)

    # ------------------------------------------------------------------------------------------------- geometry
    @property
    def num_blocks(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def block_numel(self) -> int:
        return self.block_shape[0] * self.block_shape[1]

    @property
    def numel(self) -> int:
        return self.weight_shape[0] * self.weight_shape[1]

    def blocked(self, tensor: torch.Tensor) -> torch.Tensor:
        """A (O/R, R, I/C, C) view of a tensor shaped like the weight."""
        rows, cols = self.block_shape
        return tensor.view(self.grid[0], rows, self.grid[1], cols)

    def _broadcast(self, mask: torch.Tensor) -> torch.Tensor:
        return mask[:, None, :, None]

    def to_(self, device: torch.device) -> "BlockMask":
        """Moves the masks to `device` (the model may have moved since the masks were made)."""
        self.mask = self.mask.to(device)
        self.ever_active = self.ever_active.to(device)
        return self

    # ---------------------------------------------------------------------------------------------- operations
    def init_random(self, num_active: int, generator: torch.Generator) -> None:
        """A uniformly random pattern with exactly `num_active` active blocks."""
        order = torch.randperm(self.num_blocks, generator=generator)
        flat = torch.zeros(self.num_blocks, dtype=torch.bool)
        flat[order[:num_active]] = True
        self.mask.copy_(flat.view(self.grid))
        self.ever_active |= self.mask

    @torch.no_grad()
    def apply_(self, tensor: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Zeroes, in place, the entries of `tensor` (shaped like the weight) outside `keep` (default: the mask)."""
        keep = self.mask if keep is None else keep
        self.blocked(tensor).mul_(self._broadcast(keep.to(tensor.device)))
        return tensor

    def masked(self, tensor: torch.Tensor) -> torch.Tensor:
        """An out-of-place masked copy (used on gradients)."""
        return (self.blocked(tensor) * self._broadcast(self.mask)).view(self.weight_shape)

    @torch.no_grad()
    def block_scores(self, tensor: torch.Tensor, metric: str = "l1") -> torch.Tensor:
        """Lp norm of every block of `tensor`, shape (O/R, I/C), in fp32. L2 returns the squared norm (same order)."""
        blocks = self.blocked(tensor.detach()).abs().float()
        if metric == "l1":
            return blocks.sum(dim=(1, 3))
        if metric == "l2":
            return blocks.square().sum(dim=(1, 3))
        if metric == "linf":
            return blocks.amax(dim=(1, 3))
        raise ValueError(f"Unknown block metric {metric!r}")

    def num_active(self) -> int:
        return int(self.mask.sum())

    def density(self) -> float:
        return self.num_active() / self.num_blocks

    def explored(self) -> float:
        return int(self.ever_active.sum()) / self.num_blocks


# ------------------------------------------------------------------------------------------------ module choice
def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def transformer_block_prefix(model: nn.Module) -> str | None:
    """Qualified name of the model's transformer block list: its `ModuleList` holding the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > best_params:
                best, best_params = name, n
    return best


def select_sparse_modules(
    model: nn.Module, target_modules: list[str] | str | None, exclude_modules: list[str] | str | None
) -> list[tuple[str, nn.Linear]]:
    """The `Linear` modules made sparse, in model order. Raises when nothing matches."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules is None:
        prefix = transformer_block_prefix(model)
        if prefix is None:
            raise ValueError(
                "DynSparse: could not find the transformer blocks (no nn.ModuleList in the model); "
                "set DynSparseConfig.target_modules"
            )
        chosen = [(n, m) for n, m in linears if n.startswith(prefix + ".")]
    else:
        chosen = [(n, m) for n, m in linears if _matches(n, target_modules)]
    if exclude_modules is not None:
        chosen = [(n, m) for n, m in chosen if not _matches(n, exclude_modules)]
    if not chosen:
        raise ValueError(
            f"DynSparseConfig.target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) selects no "
            f"Linear module; Linear modules of the model: {[n for n, _ in linears][:20]}"
        )
    return chosen


def non_embedding_linears(model: nn.Module) -> Iterable[tuple[str, nn.Linear]]:
    """Every `Linear` except the output embedding (LM / MLM decoder), for FLOP counts."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_weights = {id(m.weight) for m in (out_emb, in_emb) if m is not None and hasattr(m, "weight")}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not out_emb and id(module.weight) not in emb_weights:
            yield name, module
