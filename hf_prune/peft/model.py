"""`get_sparse_peft_model`: a real `peft.PeftModel` whose LoRA updates keep a pruned model's sparsity."""

from __future__ import annotations

import copy
import json
import logging

import torch

from ..state import get_pruning_state

logger = logging.getLogger(__name__)

# LoraConfig options that change what the update is (a second weight, a bias, base weights rewritten at init, ...).
# Masking them is not implemented, so they are refused by name instead of being silently left unmasked.
_UNSUPPORTED = {
    "use_dora": "DoRA (its magnitude vector rescales every column, pruned entries included)",
    "use_qalora": "QA-LoRA",
    "lora_bias": "a trainable LoRA bias",
    "use_bdlora": "BD-LoRA",
    "velora_config": "VeLoRA",
    "alora_invocation_tokens": "aLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication",
    "loftq_config": "LoftQ (rewrites the base weights)",
    "eva_config": "EVA initialisation",
    "corda_config": "CorDA (rewrites the base weights)",
    "lora_ga_config": "LoRA-GA (rewrites the base weights)",
}
_SUPPORTED_INIT = (True, False, "gaussian")


def _check_lora_config(config) -> None:
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"get_sparse_peft_model needs a peft.LoraConfig, got {type(config).__name__}")
    for name, what in _UNSUPPORTED.items():
        if getattr(config, name, None):
            raise ValueError(
                f"LoraConfig.{name} ({what}) is not supported by hf_prune's masked LoRA yet; "
                f"supported: plain LoRA with any r, lora_alpha, use_rslora, lora_dropout, rank_pattern, alpha_pattern"
            )
    if config.init_lora_weights not in _SUPPORTED_INIT:
        raise ValueError(
            f"LoraConfig.init_lora_weights={config.init_lora_weights!r} is not supported by hf_prune's masked LoRA "
            f"(it rewrites the base weights or needs its own variant); use one of {list(_SUPPORTED_INIT)}"
        )


def _pruned_modules(model, state) -> dict[str, torch.nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in state.module_sparsity if n not in modules]
    if missing:
        raise ValueError(
            f"the model's PruningState names modules it does not have ({missing[:3]}...); was the model wrapped or "
            "changed after pruning? Pass the pruned model itself"
        )
    return {n: modules[n] for n in state.module_sparsity}


def _check_targets(model, config, pruned: dict) -> None:
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = config.target_modules
    if isinstance(targets, str) and targets == "all-linear" or targets is None:
        return  # peft expands these itself (every Linear but the output head / the model type's defaults)
    names = [n for n, _ in model.named_modules() if n]
    if not any(check_target_module_exists(config, n) for n in names):
        raise ValueError(
            f"LoraConfig.target_modules={targets!r} matches no module of this {type(model).__name__}; pruned "
            f"modules are e.g. {sorted(pruned)[:4]} (names or their last parts, like 'q_proj', or 'all-linear')"
        )
    if config.modules_to_save:
        for name in pruned:
            parts = name.split(".")
            prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
            hit = [t for t in config.modules_to_save if any(p == t or p.endswith("." + t) for p in prefixes)]
            if hit:
                raise ValueError(
                    f"LoraConfig.modules_to_save={config.modules_to_save!r} would train pruned module {name!r} (via "
                    f"{hit[0]!r}) densely and fill its pruned entries; leave pruned modules out of modules_to_save"
                )


class _SparseDispatch:
    """peft custom-module entry (`LoraConfig._register_custom_module`): masked LoRA for pruned Linears only.

    peft calls it for every targeted `nn.Linear` (the custom mapping is consulted before its default dispatch) with
    the module's qualified name as `target_name`; returning None hands an unpruned module back to peft's default
    `lora.Linear`. Holds names only, so deep copies of the config stay cheap.
    """

    def __init__(self, pruned_names):
        self.pruned_names = frozenset(pruned_names)

    def __call__(self, target, adapter_name, config, **kwargs):
        if kwargs.get("target_name") not in self.pruned_names:
            return None
        from peft.tuners.tuners_utils import BaseTunerLayer

        from .layer import SparseLoraLinear

        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, torch.nn.Linear):
            raise NotImplementedError(
                f"masked LoRA supports pruned torch.nn.Linear layers; {kwargs.get('target_name')!r} is a "
                f"{type(base).__name__}"
            )
        return SparseLoraLinear(target, adapter_name, config=config, **kwargs)


def get_sparse_peft_model(model, peft_config, adapter_name: str = "default", **kwargs):
    """Wraps a pruned model in a `peft.PeftModel` whose LoRA updates keep its sparsity exactly.

    Each adapted layer that hf_prune pruned computes `x·(W + M ⊙ (s·B·A))ᵀ` with `M` its keep mask (the non-zeros of
    `W`), so training trains exactly what `merge_and_unload()` produces: the merged weights keep every pruned entry
    at 0 (N:M intact), and the returned model still carries its `PruningState`, so its `save_pretrained` writes the
    compressed export. Targeted modules the pruning skipped get ordinary LoRA. Everything else is peft's: adapter
    save/load (`PeftModel.from_pretrained(base, "adapter")` on the pruned base keeps masking, after `import hf_prune`),
    `Trainer`, multiple adapters.

    Args:
        model: a model pruned by hf_prune, in memory or loaded with `from_pretrained` from an hf_prune checkpoint.
        peft_config (`peft.LoraConfig`): the LoRA settings (copied, not modified). DoRA and the other LoRA variants
            that change what the update is are refused by name.
        adapter_name: peft's adapter name.
        **kwargs: passed to `peft.get_peft_model` (e.g. `autocast_adapter_dtype`).

    Returns:
        `peft.PeftModel`.

    Example:
        ```python
        peft_model = hf_prune.get_sparse_peft_model(pruned, LoraConfig(r=16, target_modules="all-linear"))
        Trainer(model=peft_model, args=args, train_dataset=train).train()
        merged = peft_model.merge_and_unload()   # same mask, exactly
        merged.save_pretrained("recovered")      # compressed export + card recording the recovery
        ```
    """
    import peft

    if isinstance(model, peft.PeftModel):
        raise TypeError("model is already a PeftModel; pass the pruned base model (add adapters with add_adapter)")
    state = get_pruning_state(model)
    if state is None:
        raise ValueError(
            f"this {type(model).__name__} carries no hf_prune PruningState (it was not pruned by hf_prune, or not "
            "loaded from an hf_prune checkpoint after `import hf_prune`), so there is no mask to keep; for a dense "
            "model plain `peft.get_peft_model(model, config)` is the tool"
        )
    if state.layout == "structured":
        raise ValueError(
            "this model was pruned structurally (units removed, no zeros left to keep), so it is an ordinary dense "
            "model: plain `peft.get_peft_model(model, config)` is the tool"
        )
    _check_lora_config(peft_config)
    pruned = _pruned_modules(model, state)
    _check_targets(model, peft_config, pruned)

    config = copy.deepcopy(peft_config)
    from transformers.pytorch_utils import Conv1D

    dispatch = _SparseDispatch(pruned)  # Conv1D too, so that a pruned GPT-2 layer is refused, not left unmasked
    config._register_custom_module({torch.nn.Linear: dispatch, Conv1D: dispatch})
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)
    # the mapping is only needed while peft injects the layers; the saved adapter_config.json never holds it
    peft_model.peft_config[adapter_name]._custom_modules = None

    from .layer import SparseLoraLinear

    masked = [n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, SparseLoraLinear)]
    if not masked:
        logger.warning(
            "None of the modules LoraConfig.target_modules=%r selects was pruned: every adapter is ordinary LoRA.",
            peft_config.target_modules,
        )
    logger.info("Masked LoRA on %d pruned modules, ordinary LoRA on the other targeted ones.", len(masked))
    state.metrics["recovery"] = "masked LoRA (hf_prune.get_sparse_peft_model): W + M ⊙ (s·B·A), mask kept exactly"
    state.metrics["recovery_adapter"] = json.dumps(_adapter_summary(config), sort_keys=True)
    state.metrics["recovery_masked_modules"] = len(masked)
    return peft_model


def _adapter_summary(config) -> dict:
    targets = config.target_modules
    if isinstance(targets, (set, frozenset, list, tuple)):
        targets = sorted(targets)
    return {"r": config.r, "lora_alpha": config.lora_alpha, "lora_dropout": config.lora_dropout,
            "use_rslora": config.use_rslora, "target_modules": targets}


def is_sparse_peft_model(model) -> bool:
    """Whether `model` holds at least one hf_prune masked LoRA layer."""
    from .layer import SparseLoraLinear

    return any(isinstance(m, SparseLoraLinear) for m in model.modules())
