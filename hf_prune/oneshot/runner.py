"""`oneshot()`: block-sequential calibration and pruning shared by ADMM, Wanda, SparseGPT and magnitude.

Blocks are pruned in order; each block's statistics come from the outputs of the already-pruned blocks before it,
and only one block's statistics are in memory at a time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import PruningConfig
from ..state import PruningState, get_pruning_state, refuse_adapter_model, refuse_mid_training, set_pruning_state
from .blocks import capture_block_inputs, find_blocks, linear_weight_view, set_linear_weight
from .calibration import calibration_windows
from .checks import check_finite_parameters
from .config import OneShotConfig
from .offload import OffloadedCheckpoint
from .owl import owl_block_sparsities
from .passes import advance, collect_stats
from .plan import LayerPlan, plan_layers
from .solver import LayerSolver, LayerStats, LayerTask, build_solver

logger = logging.getLogger(__name__)

_RUNNERS: dict[type, Callable] = {}


def register_oneshot_runner(config_cls: type):
    """Binds a whole-model one-shot procedure to its config class: `oneshot(model, config, ...)` then calls
    `runner(model, config, calibration, tokenizer, show_progress=..., device=..., command=...)` and returns what it
    returns. For methods that change the model's shapes (structured pruning) rather than prune layer by layer
    through a `LayerSolver`; they reuse the runner's pieces (`blocks`, `passes`, `calibration`)."""

    def decorator(runner: Callable) -> Callable:
        _RUNNERS[config_cls] = runner
        return runner

    return decorator


@torch.no_grad()
def oneshot(
    model: nn.Module,
    config: OneShotConfig | PruningConfig,
    calibration=None,
    tokenizer=None,
    *,
    masks: dict[str, torch.Tensor] | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
    offload_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    restart: bool = False,
    dtype: torch.dtype = torch.float32,
    command: str | None = None,
    allow_repruning: bool = False,
) -> nn.Module | Path:
    """Prunes `model` in place with a one-shot method and returns it.

    Args:
        model: a `transformers` model (LLaMA family, GPT-2, OPT or BERT-style), on the device to compute on; with
            `offload_dir`, the path of its local safetensors checkpoint directory instead.
        config: an `ADMMConfig`, `WandaConfig`, `SparseGPTConfig`, `MagnitudeConfig` or `StructuredConfig` (or a
            registered subclass).
        calibration: a list of strings, a `datasets.Dataset` with a `text` or `input_ids` column, or token ids
            (2-D tensor or list of lists). Not needed for magnitude pruning.
        tokenizer: needed when `calibration` is text.
        masks: for `ADMMConfig(mask_mode="fixed")`, keep-masks `{module name: bool tensor (out, in)}`.
        show_progress: show a progress bar over blocks.
        device: where to compute. An in-memory model is moved there first (default: where it is); an offloaded
            run loads each block there (default: `"cuda"` if available, else `"cpu"`).
        offload_dir: prune a checkpoint that need not fit in memory: `model` is a checkpoint path, the model is
            built on the meta device, each block is loaded from the checkpoint when its turn comes, and once pruned
            it is written, compressed, as its own shard of the export in `offload_dir` and dropped. Only one block,
            one block's statistics and one calibration batch are resident (the hidden states are read from a file
            of the run's progress directory a batch at a time, the block's outputs held while computed; peak on
            the 1B benchmark model: docs/benchmarks/offload.md). `offload_dir` ends up holding the
            same export as `model.save_pretrained(offload_dir)` after an in-memory run (sharded, one shard per
            block), written atomically, with `tokenizer` saved beside it. OWL is not available offloaded (it needs
            every block before pruning). Resumable: each finished block is kept (with the hidden states entering the
            next one) in `.<name>.hf_prune-partial/` beside `offload_dir`, and the same call after an interruption
            continues at the next block (logged), giving the same export bit for bit; an interrupted run made with
            other settings (checkpoint, config, calibration, dtype) is refused, naming what differs. To keep the
            heap from fragmenting between phases, an offloaded run has glibc serve allocations of 1 MiB or more
            by their own memory maps, for the rest of the process (`mallopt`; measured no slower).
        overwrite: with `offload_dir`, replace a model already there (refused otherwise, before any work).
        restart: with `offload_dir`, discard the finished blocks of an interrupted run into it and start over
            (needed when its settings differ).
        dtype: with `offload_dir`, the dtype the blocks are loaded and computed in (as `from_pretrained`'s
            `dtype`). The export keeps the checkpoint's dtypes: each tensor is written in the dtype it has in the
            checkpoint (an fp16 checkpoint pruned in float32 is saved in fp16, the pruned values rounded once at
            the end, and its `config.json` says float16), so the export is never bigger than its input for want
            of a cast. (An in-memory run saves what the model holds: load it in fp16 to save fp16.)
        command: the command that reproduces the run, recorded in the `PruningState` (and so in the model card).
        allow_repruning: prune a model that hf_prune has already pruned (in memory, or loaded from an hf_prune
            checkpoint); refused otherwise, before any work. The earlier runs go to the `PruningState`'s `history`,
            and `module_sparsity` (so the card) is measured on the final weights, every run's modules included:
            magnitude 0.6 then 0.3 leaves 60 % zeros and says so. A structurally pruned model (CoFi) cannot be
            pruned again this way.

    Raises:
        ValueError: before any work, for a model already pruned (without `allow_repruning`), a peft model or a model
            holding adapter layers (prune the base model before wrapping it, or merge the adapters first), or a
            model in the middle of training-time pruning (CoFi, DynSparse).

    Returns:
        The same model, its linear layers exactly sparse, with a `PruningState` attached; with `offload_dir`, the
        export's path (nothing of the model stays in memory: load it with `from_pretrained(path)`). With a
        `StructuredConfig`: a **new**, physically smaller model of the same class (the model passed in is left
        unchanged; `masks` and `offload_dir` are not available).
    """
    runner = next((_RUNNERS[c] for c in type(config).__mro__ if c in _RUNNERS), None)
    if runner is not None:
        if masks is not None or offload_dir is not None:
            raise ValueError(f"oneshot(): masks= and offload_dir= are not available with {type(config).__name__}")
        return runner(model, config, calibration, tokenizer, show_progress=show_progress, device=device,
                      command=command)
    if not isinstance(config, OneShotConfig):
        raise TypeError(
            f"oneshot() takes a one-shot config (ADMMConfig, WandaConfig, SparseGPTConfig, MagnitudeConfig, "
            f"StructuredConfig), got {type(config).__name__}"
        )
    owner = type(config).__name__
    config.validate()  # again: lists may have been changed in place since construction
    previous = check_can_prune(model, allow_repruning) if isinstance(model, nn.Module) else None
    store = None
    if offload_dir is not None:
        if isinstance(model, nn.Module):
            raise TypeError(
                "oneshot(offload_dir=...) reads the model block by block from its checkpoint: pass the checkpoint "
                "directory (oneshot('path/to/model', config, ..., offload_dir=out)), not a loaded model"
            )
        if config.owl:
            raise ValueError(f"{owner}.owl needs every block's outputs before pruning; it is not available with offload_dir")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        store = OffloadedCheckpoint(model, offload_dir, overwrite=overwrite, dtype=dtype, device=device,
                                    layout=config.pattern, tokenizer=tokenizer, restart=restart)
        model = store.model
    elif not isinstance(model, nn.Module):
        raise TypeError(
            f"oneshot() takes a transformers model, got {type(model).__name__}; to prune a checkpoint directory "
            "without loading it whole, pass offload_dir= as well"
        )
    elif device is not None:
        model.to(device)
    solver = build_solver(config)
    solver.low_memory = store is not None
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
    device = store.device if store is not None else next(model.parameters()).device
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    zeros: dict[str, int] = {}
    try:
        if store is not None:
            masks_used = {e.name: e.mask for block in plan for e in block if e.mask is not None}
            store.start([e.name for block in plan for e in block], config=config, windows=windows, masks=masks_used)
            zeros.update(store.record["zeros"])  # the blocks an interrupted run finished
        if windows is None:
            _prune_without_calibration(blocks, plan, solver, show_progress, zeros, store)
        else:
            batches = [b.to(device) for b in windows.split(config.calibration_batch_size)]
            if config.owl:
                owl = owl_block_sparsities(model, blocks, plan, batches, config, show_progress)
                for entries, sparsity in zip(plan, owl):
                    for entry in entries:
                        entry.sparsity = sparsity
            _prune_block_sequential(model, blocks, plan, solver, batches, show_progress, config.method, zeros, store)
    except BaseException:
        if store is not None:
            store.close()  # the temporary export goes; the target directory was never touched
            if store.record.get("blocks_done"):
                logger.warning("The %d finished block(s) are kept in %s: the same call continues at the next one",
                               store.record["blocks_done"], store.progress.directory)
        raise
    finally:
        model.train(was_training)
        if use_cache is not None:
            model.config.use_cache = use_cache

    elapsed = store.elapsed if store is not None else time.perf_counter() - started
    entries = [e for block in plan for e in block]
    numel = {e.name: linear_weight_view(e.module).numel() for e in entries}
    sparsity = {e.name: zeros[e.name] / numel[e.name] for e in entries}
    metrics = {"pruning_time_s": round(elapsed, 2)}
    if windows is not None:
        metrics.update(calibration_samples=int(windows.shape[0]), calibration_tokens=int(windows.numel()))
    state = PruningState(
        config=config,
        layout=config.pattern,
        module_sparsity=sparsity,
        module_numel=numel,
        metrics=metrics,
        base_model=getattr(model.config, "_name_or_path", None) or None,
        command=command,
    )
    if previous is not None:
        _record_earlier_runs(model, state, previous)
    set_pruning_state(model, state)
    logger.info("%s pruned %d modules in %.1fs", config.method, len(sparsity), elapsed)
    if store is not None:
        try:
            return store.finish()
        finally:
            store.close()
    return model


def check_can_prune(model: nn.Module, allow_repruning: bool) -> PruningState | None:
    """Refuses, before any work, a model `oneshot` must not prune (see `oneshot`'s Raises); returns the model's
    earlier `PruningState` when re-pruning it is allowed."""
    refuse_adapter_model(model, "oneshot()")
    refuse_mid_training(model, "oneshot()", "Finish that run first (trainer.export_pruned_model(), or "
                        "pruner.finalize() for hf_prune.attach) and prune the exported model")
    previous = get_pruning_state(model)
    if previous is None:
        return None
    done = f"{previous.config.method or type(previous.config).__name__}, layout {previous.layout!r}"
    if previous.layout == "structured":
        raise ValueError(
            f"oneshot() got a model that hf_prune already pruned structurally ({done}): its export must keep the "
            "structure record that rebuilds the smaller layers, which a one-shot run would replace. One-shot pruning "
            "on top of structured pruning is not supported; prune the dense model with one method"
        )
    if not allow_repruning:
        raise ValueError(
            f"oneshot() got a model that hf_prune already pruned ({done}, {previous.overall_sparsity:.1%} of its "
            f"{len(previous.module_sparsity)} pruned modules' weights zero{_from(previous)}). Pruning it again keeps "
            "those zeros and adds the new run's, so its sparsity is not the new config's. To do it on purpose pass "
            "oneshot(..., allow_repruning=True) (CLI: --allow-repruning): every run is then recorded in the "
            "PruningState's history and the card; otherwise start from the dense model"
        )
    return previous


def _from(state: PruningState) -> str:
    return f"; base model {state.base_model}" if state.base_model else ""


def _record_earlier_runs(model: nn.Module, state: PruningState, previous: PruningState) -> None:
    """Adds the earlier runs to `state.history` and the modules only they pruned, measured now, to its sparsity."""
    state.history = [*previous.history, previous.run_record()]
    state.base_model = previous.base_model or state.base_model
    modules = dict(model.named_modules())
    missing = []
    for name in previous.module_sparsity:
        if name in state.module_sparsity:
            continue
        if name not in modules:
            missing.append(name)
            continue
        weight = linear_weight_view(modules[name])
        state.module_sparsity[name] = int((weight == 0).sum()) / weight.numel()
        state.module_numel[name] = weight.numel()
    if missing:
        logger.warning("The earlier PruningState names modules this model does not have (%s); left out", missing[:3])
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    state.module_sparsity = dict(sorted(state.module_sparsity.items(), key=lambda kv: order.get(kv[0], len(order))))


def _solve(entry: LayerPlan, solver: LayerSolver, stats: LayerStats | None, zeros: dict[str, int]) -> None:
    task = LayerTask(
        name=entry.name,
        weight=linear_weight_view(entry.module).detach().to(torch.float32),
        sparsity=entry.sparsity,
        n_m=solver.config.n_m,
        stats=stats,
        mask=None if entry.mask is None else entry.mask.to(linear_weight_view(entry.module).device),
    )
    set_linear_weight(entry.module, solver.solve(task))
    zeros[entry.name] = int((linear_weight_view(entry.module) == 0).sum())


def _prune_block_sequential(model, blocks, plan, solver, batches, show_progress, method, zeros, store) -> None:
    first = store.record["blocks_done"] if store is not None else 0  # > 0: resuming an interrupted run
    count = len(blocks.layers)
    if first < count:
        if store is not None:
            store.load_embeddings()
        inputs = capture_block_inputs(model, blocks, batches)
        if store is not None:
            store.release_embeddings()
        if first:
            inputs.hidden = store.restore_hidden(inputs.hidden)
        if store is not None:  # on disk between the passes: not resident while the block's layers are solved
            inputs.hidden = store.spill_hidden(inputs.hidden, first)
    bar = tqdm(total=count, initial=first, desc=f"{method}: pruning blocks", unit="block", disable=not show_progress)
    for index, (block, entries) in enumerate(zip(blocks.layers, plan)):
        if index < first:
            continue
        if store is not None:
            store.load_block(index)
        if entries:
            stats = collect_stats(block, entries, inputs, solver.full_gram)
            for layer_stats in stats.values():
                layer_stats.scratch = True  # each is read by its solve only
            if solver.low_memory:
                _park_later_statistics(entries, stats)
            for entry in entries:
                bar.set_postfix_str(entry.name.rsplit(".", 1)[-1])
                layer_stats = stats.pop(entry.name)
                if layer_stats.parked:  # its turn: what the previous layers' solves cached goes first
                    solver.release()
                    layer_stats.restore()
                _solve(entry, solver, layer_stats, zeros)
                del layer_stats
            solver.release()
            del stats
        if index + 1 < count:
            advance(block, inputs)
        if store is not None:
            zeros.update(store.write_block(index, {e.name: zeros[e.name] for e in entries},
                                           inputs.hidden if index + 1 < count else None))
        bar.update(1)
    bar.close()


def _park_later_statistics(entries: list[LayerPlan], stats: dict[str, LayerStats]) -> None:
    """A memory-bounded (offloaded) run: every statistics object but the first solved layer's goes to a temporary
    file until its layer's turn (`LayerStats.park`), so that a solve holds only its own layer's statistics (at 1B,
    `down_proj`'s 121 MiB Gram is not resident while the attention and gate/up layers are solved)."""
    first = stats[entries[0].name]
    for layer_stats in {id(s): s for s in stats.values()}.values():  # shared ones (q/k/v, gate/up) once
        if layer_stats is not first:
            layer_stats.park()


def _prune_without_calibration(blocks, plan, solver, show_progress: bool, zeros, store) -> None:
    first = store.record["blocks_done"] if store is not None else 0
    bar = tqdm(total=sum(map(len, plan)), initial=sum(map(len, plan[:first])),
               desc=f"{solver.config.method}: pruning layers", disable=not show_progress)
    for index, entries in enumerate(plan):
        if index < first:
            continue
        if store is not None:
            store.load_block(index)
        for entry in entries:
            _solve(entry, solver, None, zeros)
            bar.update(1)
        if store is not None:
            zeros.update(store.write_block(index, {e.name: zeros[e.name] for e in entries}))
    bar.close()
