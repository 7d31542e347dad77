"""Sparsity-preserving LoRA recovery of pruned models with peft (masked LoRA, merged back into the same mask)."""

from .model import get_sparse_peft_model, is_sparse_peft_model

__all__ = ["get_sparse_peft_model", "is_sparse_peft_model"]
