"""`StructuredConfig`: one-shot width / depth pruning of LLaMA-family decoders with least-squares reconstruction."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PruningConfig, check_positive_int, check_positive_number, register_pruning_method

_OWNER = "StructuredConfig"
_REFIT_TARGETS = ("layer", "dense")
_ARCH = ("layers", "heads", "kv_heads", "intermediate_size", "hidden_size")


@register_pruning_method("structured")
@dataclass(kw_only=True)
class StructuredConfig(PruningConfig):
    """One-shot structured pruning of a LLaMA-family decoder (LLaMA, Mistral, Qwen2, Qwen3; GQA included) to a
    smaller architecture, without training (Minitron's importance, Muralidharan et al. 2024; ShortGPT's block
    influence, Men et al. 2024), with the consuming projections refit by least squares.

    `oneshot(model, StructuredConfig(...), calibration=texts, tokenizer=tok)` returns a **new**, physically smaller
    model of the same class (the model passed in is left unchanged); every kept layer has the same shape, so it saves
    as a plain config of its class that loads without hf_prune.

    What is removed, and how it is chosen (see `hf_prune.methods.structured.prune` for the order):
    - whole decoder layers, by block influence `1 - cos(input, output)` on the calibration tokens of the dense model;
    - hidden channels, by the norms of the RMSNorm outputs per channel, summed over every norm of the dense model;
    - KV groups (a key / value head with its query heads), per layer, by the norm of their attention output (the
      `o_proj` input columns of the group), and FFN neurons by the norm of their `down_proj` input: both measured
      block by block on the outputs of the blocks pruned before (and, for the FFN, after this block's attention
      was pruned), with the block-sequential runner of the one-shot methods.
    After KV groups or neurons are removed, `o_proj` / `down_proj` are refit on the kept inputs by least squares on the
    calibration Gram matrix `G = X^T X` of their input: `W_S = W G[:, S] (G[S, S] + delta I)^-1`, with
    `delta = damping * mean(diag G[S, S])`. (Hidden channels need no refit in this scheme: the blocks after the cut
    see exactly the kept channels, so the readers' least-squares solution is their own weights.)

    Args:
        target_layers (`int`, *optional*): decoder layers kept.
        target_heads (`int`, *optional*): query heads per layer; a multiple of the model's query heads per KV head
            (heads go with their KV group).
        target_kv_heads (`int`, *optional*): KV heads per layer (instead of `target_heads`).
        target_intermediate_size (`int`, *optional*): FFN width per layer.
        target_hidden_size (`int`, *optional*): hidden size. For a plain config it must suit the config class
            (`LlamaConfig` wants it divisible by the query heads).
        target_sparsity (`float`, *optional*): instead of an architecture: the fraction of the non-embedding
            parameters (the attention and FFN weight matrices) to remove, in (0, 1). Split rule (width first, as
            Minitron found width pruning recovers better than depth pruning): depth and hidden size stay; every layer
            keeps `max(1, round(kv_heads * (1 - target_sparsity)))` KV groups, and the FFN width is then the one that
            lands the total on the target (to the nearest neuron). A target the FFN cannot reach is refused.
        uniform (`bool`, defaults to `True`): every kept layer gets the same number of KV groups and FFN neurons, so
            the result is a plain config that loads without hf_prune. `False`: per-layer shapes under the same
            budget (the uniform target's totals, so the same parameter count): the KV groups of all kept layers are
            ranked together, and so are the FFN neurons, by their activation norm on the dense model divided by the
            mean of their layer's (the residual stream grows with depth, so raw norms would favour late layers);
            every layer keeps at least one of each. The checkpoint keeps the original config plus the per-layer
            structure record (as CoFi's heterogeneous export) and loads with `import hf_prune`.
        reconstruct (`bool`, defaults to `True`): refit `o_proj` and `down_proj` by least squares after their inputs
            were removed; `False` only slices the weights (importance only).
        refit_target (`str`, defaults to `"layer"`): what the refit reproduces. `"layer"`: each refit projection's
            own output on the pruned model's inputs (`o_proj` and `down_proj` only). `"dense"`: the dense model's
            output of the same projection, for every projection of each kept layer (q/k/v and gate/up on the kept
            hidden channels too), in the block's order; this also compensates the error of the units removed
            upstream, at about twice the calibration compute (the dense blocks run beside the pruned ones).
        damping (`float` or `"auto"`, defaults to `"auto"`): relative ridge term `delta` of the refit, as a fraction
            of the mean diagonal of the kept Gram block; keeps the solve well posed for inputs the calibration barely
            excites. `"auto"` chooses it per refit layer among 1e-4, 1e-3, 1e-2 and 1e-1 by the layer's output error
            on every fourth calibration window, held out of the fit (`hf_prune.methods.structured.damping`); each
            choice is in the card's `reconstruction_error` records. On SmolLM2-135M it beat the fixed 0.01 at both
            benchmark shapes (held-out perplexity before training 59.65 -> 54.40 and 187.35 -> 175.69). With
            `refit_target="dense"`, `"auto"` means 0.01.
        num_calibration_samples (`int`, defaults to 128): calibration sequences.
        max_seq_length (`int`, defaults to 512): tokens per calibration sequence.
        calibration_batch_size (`int`, defaults to 8): sequences per forward pass while calibrating.
        seed (`int`, defaults to 0): seed for choosing calibration windows.
    """

    target_layers: int | None = None
    target_heads: int | None = None
    target_kv_heads: int | None = None
    target_intermediate_size: int | None = None
    target_hidden_size: int | None = None
    target_sparsity: float | None = None
    uniform: bool = True
    reconstruct: bool = True
    refit_target: str = "layer"
    damping: float | str = "auto"
    num_calibration_samples: int = 128
    max_seq_length: int = 512
    calibration_batch_size: int = 8
    seed: int = 0

    #: the runner's flag: structured pruning always needs calibration activations
    uses_calibration = True

    def target_architecture(self) -> dict[str, int]:
        """The target-architecture fields that are set (`{"layers": 24, "kv_heads": 2, ...}`)."""
        return {n: getattr(self, f"target_{n}") for n in _ARCH if getattr(self, f"target_{n}") is not None}

    def validate(self) -> None:
        super().validate()
        arch = self.target_architecture()
        for name, value in arch.items():
            check_positive_int(_OWNER, f"target_{name}", value)
        if self.target_heads is not None and self.target_kv_heads is not None:
            raise ValueError(f"{_OWNER}: give target_heads or target_kv_heads, not both (heads go with their KV group)")
        t = self.target_sparsity
        if t is not None and not 0.0 < float(t) < 1.0:
            raise ValueError(f"{_OWNER}.target_sparsity must be a number in the open interval (0, 1), got {t!r}")
        if arch and t is not None:
            raise ValueError(
                f"{_OWNER}: give target_sparsity={t} or a target architecture "
                f"({', '.join(f'target_{k}' for k in arch)}), not both: the architecture fixes the size"
            )
        if not arch and t is None:
            raise ValueError(
                f"{_OWNER} needs a target: target_sparsity (fraction of the non-embedding parameters to remove) or a "
                "target architecture (target_layers, target_heads / target_kv_heads, target_intermediate_size, "
                "target_hidden_size)"
            )
        for name in ("uniform", "reconstruct"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_OWNER}.{name} must be True or False, got {getattr(self, name)!r}")
        if self.refit_target not in _REFIT_TARGETS:
            raise ValueError(f"{_OWNER}.refit_target must be one of {list(_REFIT_TARGETS)}, got {self.refit_target!r}")
        if isinstance(self.damping, str):
            if self.damping != "auto":
                raise ValueError(f"{_OWNER}.damping must be a number >= 0 or 'auto', got {self.damping!r}")
        else:
            check_positive_number(_OWNER, "damping", self.damping, allow_zero=True)
        check_positive_int(_OWNER, "num_calibration_samples", self.num_calibration_samples)
        check_positive_int(_OWNER, "max_seq_length", self.max_seq_length)
        check_positive_int(_OWNER, "calibration_batch_size", self.calibration_batch_size)
