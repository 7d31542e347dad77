"""Finding a model's transformer blocks and their prunable linear layers, and capturing block inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# model_type values whose block layout the runner is tested on (LLaMA family incl. GQA, GPT-2, OPT, BERT-style).
SUPPORTED_MODEL_TYPES = {
    "llama": "LLaMA",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma-2",
    "gemma3_text": "Gemma-3",
    "phi3": "Phi-3",
    "gpt2": "GPT-2",
    "opt": "OPT",
    "bert": "BERT",
    "roberta": "RoBERTa",
    "xlm-roberta": "XLM-RoBERTa",
    "electra": "ELECTRA",
}


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # GPT-2's Conv1D is a Linear with a transposed weight (in, out).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight_view(module: nn.Module) -> torch.Tensor:
    """The weight in the `(out_features, in_features)` layout (a view, transposed for `Conv1D`)."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.T


def set_linear_weight(module: nn.Module, weight_out_in: torch.Tensor) -> None:
    target = module.weight
    new = weight_out_in if isinstance(module, nn.Linear) else weight_out_in.T
    with torch.no_grad():
        target.copy_(new.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return linear_weight_view(module).shape[1]


@dataclass
class Blocks:
    prefix: str  # qualified name of the ModuleList, e.g. "model.layers"
    layers: nn.ModuleList


def find_blocks(model: nn.Module) -> Blocks:
    """The ModuleList holding the transformer blocks. Raises naming the supported families otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    supported = ", ".join(sorted(set(SUPPORTED_MODEL_TYPES.values())))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"hf_prune one-shot pruning supports {supported} models (model_type in "
            f"{sorted(SUPPORTED_MODEL_TYPES)}); got {type(model).__name__} with model_type={model_type!r}"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None) or getattr(text_config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers and len(module) > 0:
            if any(_is_linear(m) for m in module[0].modules()):
                return Blocks(prefix=name, layers=module)
    raise ValueError(
        f"Could not find the transformer blocks of {type(model).__name__} (no ModuleList of {num_layers} blocks "
        f"containing Linear layers); hf_prune one-shot pruning supports {supported} models"
    )


def block_linears(block: nn.Module, block_name: str) -> dict[str, nn.Module]:
    """Qualified name -> Linear/Conv1D module, for every linear layer inside one block."""
    return {f"{block_name}.{n}": m for n, m in block.named_modules() if n and _is_linear(m)}


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        self.args_ = args
        self.kwargs_ = kwargs


@dataclass
class BlockInputs:
    """The first block's inputs for each calibration batch: hidden states plus the other call arguments."""

    hidden: list[torch.Tensor]
    extra_args: list[tuple]
    kwargs: list[dict[str, Any]]


def capture_block_inputs(model: nn.Module, blocks: Blocks, batches: list[torch.Tensor]) -> BlockInputs:
    """Runs the model up to its first block on each batch and records what the block was called with."""

    def hook(module, args, kwargs):
        raise _Captured(args, kwargs)

    handle = blocks.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    inputs = BlockInputs([], [], [])
    try:
        for batch in batches:
            try:
                model(input_ids=batch, use_cache=False)
            except _Captured as captured:
                args, kwargs = captured.args_, dict(captured.kwargs_)
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                inputs.hidden.append(hidden)
                inputs.extra_args.append(rest)
                inputs.kwargs.append(kwargs)
            else:  # pragma: no cover - only if the first block is never called
                raise RuntimeError(f"{type(model).__name__}.forward never called its first transformer block")
    finally:
        handle.remove()
    return inputs


def run_block(block: nn.Module, hidden: torch.Tensor, extra_args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *extra_args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
