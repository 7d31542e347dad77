"""peft's LoRA `Linear`, with the pruned layer's keep mask applied to the update.

Everything but the masking is peft's own `lora.Linear` (adapters, scaling, rank/alpha patterns, dropout, merge,
unmerge, save/load). What is hand-written here, and why:

- `get_delta_weight` masks `s·B·A` with `M`, so peft's own `merge` / `merge_and_unload` write `W + M ⊙ (s·B·A)`:
  every pruned entry stays exactly 0 and the N:M pattern is intact.
- `forward` computes `x·(W + M ⊙ (s·B·A))ᵀ`, the same effective weight. No LoRA formulation does this with the two
  low-rank products alone (the mask does not factor through `B·A`), and autograd over a dense masked delta would keep
  one `d_out × d_in` tensor per layer alive from forward to backward. `_MaskedLoraFunction` saves only what it was
  given (input, frozen weight, A, B) and rebuilds the delta in backward, one layer at a time.

The keep mask is the frozen weight's non-zeros (`W != 0`): in hf_prune's format a weight's zeros *are* its mask (the
compressed export stores exactly those positions), so nothing is stored per layer; one elementwise comparison per
forward and backward rebuilds it, exactly, far cheaper than the matmuls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora.layer import Linear as LoraLinear

# A per-adapter marker in the adapter's state dict ("...q_proj.lora_sparse"): `PeftModel.from_pretrained` of a saved
# adapter on a pruned base finds it and turns those layers back into masked ones (see `hf_prune.peft.loading`).
MARKER = "lora_sparse"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _MaskedLoraFunction(torch.autograd.Function):
    """`x·(W + M ⊙ s·B·A)ᵀ + b` (with_base) or `x·(M ⊙ s·B·A)ᵀ` (without), with M = (W != 0).

    Backward recomputes the masked delta instead of saving it, so between forward and backward a layer holds no
    dense tensor beyond the frozen weight itself. Runs in the autocast dtype when autocast is on (bf16 on CPU), where
    every d_out × d_in pass is in that dtype too (the scaling is folded into the small B).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, with_base: bool):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            effective = _masked_update(weight, lora_A, lora_B, scaling, dtype, with_base, weight == 0)
            out = F.linear(x.to(dtype), effective, bias.to(dtype) if (with_base and bias is not None) else None)
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling, ctx.with_base, ctx.dtype, ctx.has_bias = scaling, with_base, dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        dtype, scaling = ctx.dtype, ctx.scaling
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.to(dtype)
            pruned = weight == 0
            grad_x = None
            if ctx.needs_input_grad[0]:
                effective = _masked_update(weight, lora_A, lora_B, scaling, dtype, ctx.with_base, pruned)
                grad_x = (g @ effective).to(x.dtype)
                del effective
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]).to(dtype)
            outer = g2.T @ x2  # d_out × d_in, transient: dL/dW
            grad_weight = outer.to(weight.dtype, copy=True) if (ctx.with_base and ctx.needs_input_grad[1]) else None
            grad_bias = g2.sum(0).to(weight.dtype) if (ctx.with_base and ctx.has_bias and ctx.needs_input_grad[2]) else None
            outer.masked_fill_(pruned, 0)  # M ⊙ dL/dW; dL/d(BA) is s times that
            del pruned
            grad_A = ((lora_B.to(dtype) * scaling).T @ outer).to(lora_A.dtype) if ctx.needs_input_grad[3] else None
            grad_B = (outer @ (lora_A.to(dtype).T * scaling)).to(lora_B.dtype) if ctx.needs_input_grad[4] else None
        return grad_x, grad_weight, grad_bias, grad_A, grad_B, None, None


def _masked_update(weight, lora_A, lora_B, scaling, dtype, with_base, pruned) -> torch.Tensor:
    """`W + M ⊙ s·B·A` (with_base) or `M ⊙ s·B·A`, in `dtype`: one matmul, one add, one fill over d_out × d_in
    (`W + M ⊙ Δ` equals `M ⊙ (W + Δ)` because W is 0 wherever M is)."""
    out = (lora_B.to(dtype) * scaling) @ lora_A.to(dtype)
    if with_base:
        out.add_(weight)
    return out.masked_fill_(pruned, 0)


class SparseLoraLinear(LoraLinear):
    """peft `lora.Linear` whose adapters update only the kept entries of the (pruned) base weight.

    Adapters marked in `lora_sparse` are masked; any other adapter on the layer is ordinary LoRA. Every adapter
    added to a layer of this class is marked (`update_layer`), so `add_adapter` keeps masking too.
    """

    other_param_names = LoraLinear.other_param_names + (MARKER,)

    def update_layer(self, adapter_name, *args, **kwargs):
        super().update_layer(adapter_name, *args, **kwargs)
        self.mark_sparse(adapter_name)

    def mark_sparse(self, adapter_name: str) -> None:
        if MARKER not in self._modules:
            self.lora_sparse = BufferDict({}, persistent=True)
        weight = self.get_base_layer().weight
        self.lora_sparse[adapter_name] = torch.ones((), dtype=torch.uint8, device=weight.device)

    def is_sparse(self, adapter_name: str) -> bool:
        return MARKER in self._modules and adapter_name in self.lora_sparse

    def keep_mask(self) -> torch.Tensor:
        """The layer's keep mask (the base weight's non-zeros), as a fresh bool tensor."""
        return self.get_base_layer().weight != 0

    def get_delta_weight(self, adapter) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        if self.is_sparse(adapter):
            delta = delta.masked_fill(self.get_base_layer().weight == 0, 0)
        return delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if self.disable_adapters or self.merged or not any(self.is_sparse(a) for a in active):
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError("adapter_names= (mixed-adapter batches) is not supported by hf_prune's masked LoRA layers")
        self._check_forward_args(x, *args, **kwargs)
        base = self.get_base_layer()
        # the fused path replaces the base layer's own call, so only when that call is plain F.linear (no hooks)
        fusable = type(base) is torch.nn.Linear and not (base._forward_hooks or base._forward_pre_hooks)
        result = None
        for adapter in active:
            lora_A, lora_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
            dropout, scaling = self.lora_dropout[adapter], self.scaling[adapter]
            if not self.is_sparse(adapter):
                if result is None:
                    result = self.base_layer(x, *args, **kwargs)
                lx = self._cast_input_dtype(x, lora_A.dtype)
                result = result + self.lora_B[adapter](self.lora_A[adapter](dropout(lx))) * scaling
            elif result is None and fusable and isinstance(dropout, torch.nn.Identity):
                result = _MaskedLoraFunction.apply(x, base.weight, base.bias, lora_A, lora_B, scaling, True)
            else:
                if result is None:
                    result = self.base_layer(x, *args, **kwargs)
                delta = _MaskedLoraFunction.apply(dropout(x), base.weight, None, lora_A, lora_B, scaling, False)
                result = result + delta.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "hf_prune.sparse_" + super().__repr__()
