"""`oneshot()`: block-sequential calibration and pruning shared by ADMM, Wanda, SparseGPT and magnitude.

Blocks are pruned in order; each block's statistics come from the outputs of the already-pruned blocks before it,
and only one block's statistics are in memory at a time.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..state import PruningState, set_pruning_state
from .blocks import capture_block_inputs, find_blocks, linear_weight_view, set_linear_weight
from .calibration import calibration_windows
from .config import OneShotConfig
from .owl import owl_block_sparsities
from .passes import advance, collect_stats
from .plan import LayerPlan, plan_layers
from .solver import LayerSolver, LayerStats, LayerTask, build_solver

logger = logging.getLogger(__name__)


@torch.no_grad()
def oneshot(
    model: nn.Module,
    config: OneShotConfig,
    calibration=None,
    tokenizer=None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
) -> nn.Module:
    """Prunes `model` in place with a one-shot method and returns it.

    Args:
        model: a `transformers` model (LLaMA family, GPT-2, OPT or BERT-style), on the device to compute on.
        config: an `ADMMConfig`, `WandaConfig`, `SparseGPTConfig` or `MagnitudeConfig` (or a registered subclass).
        calibration: a list of strings, a `datasets.Dataset` with a `text` or `input_ids` column, or token ids
            (2-D tensor or list of lists). Not needed for magnitude pruning.
        tokenizer: needed when `calibration` is text.
        masks: for `ADMMConfig(mask_mode="fixed")`, keep-masks `{module name: bool tensor (out, in)}`.
        show_progress: show a progress bar over blocks.

    Returns:
        The same model, its linear layers exactly sparse, with a `PruningState` attached.
    """
    if not isinstance(config, OneShotConfig):
        raise TypeError(f"oneshot() takes a one-shot config (ADMMConfig, WandaConfig, ...), got {type(config).__name__}")
    owner = type(config).__name__
    config.validate()  # again: lists may have been changed in place since construction
    solver = build_solver(config)
    blocks = find_blocks(model)
    plan = plan_layers(blocks, config, masks)
    check_finite_parameters(model)
    windows = None
    if config.uses_calibration:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        windows = calibration_windows(
            calibration, tokenizer, num_samples=config.num_calibration_samples, seq_len=config.max_seq_length,
            seed=config.seed, owner=owner, vocab_size=getattr(embeddings, "num_embeddings", None),
        )
    started = time.perf_counter()
    device = next(model.parameters()).device
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    try:
        if windows is None:
            _prune_without_calibration(plan, solver, show_progress)
        else:
            batches = [b.to(device) for b in windows.split(config.calibration_batch_size)]
            if config.owl:
                owl = owl_block_sparsities(model, blocks, plan, batches, config, show_progress)
                for entries, sparsity in zip(plan, owl):
                    for entry in entries:
                        entry.sparsity = sparsity
            _prune_block_sequential(model, blocks, plan, solver, batches, show_progress, config.method)
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache

    elapsed = time.perf_counter() - started
    entries = [e for block in plan for e in block]
    numel = {e.name: linear_weight_view(e.module).numel() for e in entries}
    sparsity = {e.name: (linear_weight_view(e.module) == 0).sum().item() / numel[e.name] for e in entries}
    metrics = {"pruning_time_s": round(elapsed, 2)}
    if windows is not None:
        metrics.update(calibration_samples=int(windows.shape[0]), calibration_tokens=int(windows.numel()))
    set_pruning_state(
        model,
        PruningState(
            config=config,
            layout=config.pattern,
            module_sparsity=sparsity,
            module_numel=numel,
            metrics=metrics,
            base_model=getattr(model.config, "_name_or_path", None) or None,
        ),
    )
    logger.info("%s pruned %d modules in %.1fs", config.method, len(sparsity), elapsed)
    return model


def check_finite_parameters(model: nn.Module) -> None:
    """Refuses a model with NaN or inf in any floating-point parameter or buffer, before any layer is touched: the
    methods would otherwise prune around it (magnitude, Wanda) or fail half-way with unrelated advice (ADMM)."""
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta":
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                bad.append(f"{name} ({count} of {tensor.numel()})")
    if bad:
        raise ValueError(
            f"the model has non-finite (NaN or inf) values in {len(bad)} tensor(s): {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + ". Nothing was pruned; check how the model was loaded or trained (e.g. fp16 overflow) first."
        )


def _solve(entry: LayerPlan, solver: LayerSolver, stats: LayerStats | None) -> None:
    task = LayerTask(
        name=entry.name,
        weight=linear_weight_view(entry.module).detach().to(torch.float32),
        sparsity=entry.sparsity,
        n_m=solver.config.n_m,
        stats=stats,
        mask=entry.mask,
    )
    set_linear_weight(entry.module, solver.solve(task))


def _prune_block_sequential(model, blocks, plan, solver, batches, show_progress: bool, method: str) -> None:
    inputs = capture_block_inputs(model, blocks, batches)
    bar = tqdm(total=len(blocks.layers), desc=f"{method}: pruning blocks", unit="block", disable=not show_progress)
    for index, (block, entries) in enumerate(zip(blocks.layers, plan)):
        if entries:
            stats = collect_stats(block, entries, inputs, solver.full_gram)
            for entry in entries:
                bar.set_postfix_str(entry.name.rsplit(".", 1)[-1])
                _solve(entry, solver, stats.pop(entry.name))
            solver.release()
            del stats
        if index + 1 < len(blocks.layers):
            advance(block, inputs)
        bar.update(1)
    bar.close()


def _prune_without_calibration(plan, solver, show_progress: bool) -> None:
    entries = [e for block in plan for e in block]
    for entry in tqdm(entries, desc=f"{solver.config.method}: pruning layers", disable=not show_progress):
        _solve(entry, solver, None)
