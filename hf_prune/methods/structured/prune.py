"""Structured one-shot pruning of a decoder: importance, unit removal, least-squares refit, physical shrinking.

Order of work (all under `torch.no_grad`, the model passed in is never modified):
1. one pass of the dense model over the calibration windows, block by block: block influence of every layer and the
   hidden channels' norm-output importance ([`dense_scores`]); with `uniform=False`, also every layer's KV-group and
   neuron scores, from which [`allocate`] splits the budget into per-layer counts;
2. a copy without the lowest-influence layers (CoFi's decoder export with a layer mask: a plain config);
3. the hidden cut is applied to the copy *in place* without changing its shapes: removed channels are zeroed in the
   embedding and in every row written to the residual stream (`o_proj`, `down_proj`), so they stay exactly zero, and
   every RMSNorm's weight is multiplied by `sqrt(kept / hidden)`, which turns its mean over all channels into the
   mean over the kept ones (exact up to the norm's epsilon): the copy computes what the smaller model will;
4. block by block over the copy, with the one-shot runner's statistics on the pruned prefix's outputs: the `o_proj`
   input Gram gives the KV groups' importance, the layer's lowest groups' columns go and `o_proj` is refit on the
   rest; then, with this block's attention already pruned, the same for the FFN neurons through `down_proj`; then the block's
   outputs become the next block's inputs;
5. the copy's norm weights are restored and CoFi's decoder export slices it to the target shape (per-layer shapes:
   the original config with the structure record, CoFi's heterogeneous export).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...oneshot.blocks import Blocks, capture_block_inputs
from ...oneshot.calibration import calibration_windows
from ...oneshot.passes import advance, collect_stats
from ...oneshot.plan import LayerPlan
from ...oneshot.runner import check_finite_parameters, register_oneshot_runner
from ...state import PruningState, set_pruning_state
from ..cofi.arch import LlamaFamilyAdapter
from ..cofi.prune_decoder import build_pruned_decoder
from ..cofi.structure import describe_structure
from .allocation import allocate
from .config import StructuredConfig
from .damping import FALLBACK, choose_damping, split_grams
from .flops import flops_per_token
from .importance import dense_scores, group_scores, neuron_scores, top
from .paired import PairedMoments, paired_moments
from .reconstruct import refit, relative_error
from .targets import TargetShape, adapter_for, full_shape, prunable_params, resolve_target

logger = logging.getLogger(__name__)


@register_oneshot_runner(StructuredConfig)
@torch.no_grad()
def structured_oneshot(
    model: nn.Module,
    config: StructuredConfig,
    calibration=None,
    tokenizer=None,
    *,
    show_progress: bool = True,
    device: str | torch.device | None = None,
    command: str | None = None,
) -> nn.Module:
    """What `oneshot(model, StructuredConfig(...), ...)` runs: returns a new, smaller model of `model`'s class with
    a `PruningState` (structure before / after, FLOPs per token, reconstruction errors); `model` is left unchanged
    (moved to `device` when given). Raises `ValueError` for a target the model cannot have, before any work."""
    config.validate()
    ad = adapter_for(model)
    shape = resolve_target(config, ad)
    check_finite_parameters(model)
    if device is not None:
        model.to(device)
    windows = calibration_windows(
        calibration, tokenizer, num_samples=config.num_calibration_samples, seq_len=config.max_seq_length,
        seed=config.seed, owner="StructuredConfig", vocab_size=ad.embedding().num_embeddings,
    )
    _warn_underdetermined(config, ad.dims, shape, int(windows.numel()))
    dev = ad.embedding().weight.device
    batches = [b.to(dev) for b in windows.split(config.calibration_batch_size)]
    started = time.perf_counter()
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    try:
        scores = dense_scores(model, ad, batches, units=not config.uniform)
        keep_layers = top(scores["layers"], shape.layers)
        counts = _per_layer_counts(config, shape, scores, keep_layers)
        keep_hidden = top(scores["hidden"], shape.hidden_size)
        layer_mask = torch.zeros(ad.dims.num_layers)
        layer_mask[keep_layers] = 1.0
        work, _ = build_pruned_decoder(model, ad, _masks(ad.dims, layer=layer_mask))
        work.eval()
        work.config.use_cache = False
        wad = LlamaFamilyAdapter(work)
        norms = _cut_hidden(wad, keep_hidden)
        to_dense = config.reconstruct and config.refit_target == "dense"
        dense_ref = (ad, keep_layers.tolist(), keep_hidden) if to_dense else None
        heads, neurons, errors = _prune_width(work, wad, counts, batches, config, show_progress, dense_ref)
    finally:
        model.train(was_training)
        model.config.use_cache = use_cache
    for norm, weight in norms:
        norm.weight.copy_(weight)
    hidden_mask = torch.zeros(wad.dims.hidden_size)
    hidden_mask[keep_hidden] = 1.0
    small, structure = build_pruned_decoder(work, wad, _masks(wad.dims, head=heads, neuron=neurons, hidden=hidden_mask))
    del work
    small.config.use_cache = use_cache
    elapsed = time.perf_counter() - started

    before, after = prunable_params(ad.dims, full_shape(ad.dims)), LlamaFamilyAdapter(small).prunable_weight_count()
    context = config.max_seq_length
    metrics = {
        "sparsity": 1.0 - after / before,
        "prunable_params_before": before,
        "prunable_params_after": after,
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in small.parameters()),
        "flops_per_token_before": flops_per_token(model, context),
        "flops_per_token_after": flops_per_token(small, context),
        "flops_context": context,
        "target_architecture": {**asdict(shape), "heads": shape.kv_heads * ad.dims.group_size},
        "structure_before": describe_structure(model),
        "structure": structure,
        "kept_layer_indices": keep_layers.tolist(),
        "kept_kv_groups": [torch.nonzero(h).flatten().tolist() for h in heads],
        "kept_neurons_per_layer": [int(n.sum()) for n in neurons],
        "layer_influence": [round(float(v), 6) for v in scores["layers"]],
        "reconstruction_error": errors,
        "calibration_data": _calibration_name(calibration),
        "calibration_samples": int(windows.shape[0]),
        "calibration_tokens": int(windows.numel()),
        "pruning_time_s": round(elapsed, 2),
    }
    set_pruning_state(small, PruningState(config=config, layout="structured", metrics=metrics, command=command,
                                          base_model=getattr(model.config, "_name_or_path", None) or None))
    logger.info("structured: %s -> %s in %.1fs", full_shape(ad.dims), shape, elapsed)
    return small


def _warn_underdetermined(config: StructuredConfig, dims, shape: TargetShape, tokens: int) -> None:
    """Warns when a refit layer has more kept inputs than there are calibration tokens: its least-squares problem is
    then underdetermined and only `damping` holds it (SmolLM2, 512 tokens for 1092 kept FFN inputs: held-out
    perplexity 4266 with the refit, 116 without)."""
    kept = max([shape.intermediate_size] * (shape.intermediate_size < dims.intermediate_size)
               + [shape.kv_heads * dims.group_size * dims.head_dim] * (shape.kv_heads < dims.head_units), default=0)
    if config.reconstruct and tokens < kept:
        logger.warning(
            "StructuredConfig: %d calibration tokens for a least-squares refit over %d kept inputs: underdetermined, "
            "the refit will overfit the calibration windows; give more calibration tokens (num_calibration_samples x "
            "max_seq_length >= %d, several times that is better), raise damping, or reconstruct=False", tokens, kept, kept)


def _calibration_name(calibration) -> str:
    """How the card names the calibration data: the CLI's file, a `datasets.Dataset`'s name, or what it was."""
    path = getattr(calibration, "path", None)  # hf_prune.text_files.TextFiles (`--calibration`)
    if path is not None:
        return Path(path).name
    name = getattr(getattr(calibration, "info", None), "dataset_name", None)
    if name:
        return str(name)
    if isinstance(calibration, (list, tuple)) and calibration and isinstance(calibration[0], str):
        return f"{len(calibration)} texts"
    return "token ids"


def _per_layer_counts(config: StructuredConfig, shape: TargetShape, scores, keep_layers) -> dict[str, list[int]]:
    """KV groups and FFN neurons each kept layer keeps: the target's counts (uniform), or its totals split by
    [`allocate`] over the kept layers' dense scores."""
    if config.uniform:
        return {"kv_heads": [shape.kv_heads] * shape.layers, "neurons": [shape.intermediate_size] * shape.layers}
    return {"kv_heads": allocate(scores["groups"][keep_layers], shape.layers * shape.kv_heads),
            "neurons": allocate(scores["neurons"][keep_layers], shape.layers * shape.intermediate_size)}


def _masks(dims, *, layer=None, head=None, neuron=None, hidden=None) -> dict[str, torch.Tensor]:
    """0/1 masks in CoFi's gate names (all ones where not given), for `build_pruned_decoder`."""
    L = dims.num_layers
    ones = torch.ones(L)
    return {
        "layer": ones.clone() if layer is None else layer,
        "mha": ones.clone(),
        "ffn": ones.clone(),
        "head": torch.ones(L, dims.head_units) if head is None else head,
        "neuron": torch.ones(L, dims.intermediate_size) if neuron is None else neuron,
        "hidden": torch.ones(dims.hidden_size) if hidden is None else hidden,
    }


def _cut_hidden(ad: LlamaFamilyAdapter, keep: torch.Tensor) -> list[tuple[nn.Module, torch.Tensor]]:
    """Step 3 of the module docstring; returns each norm with its original weight, to restore before slicing."""
    H = ad.dims.hidden_size
    if len(keep) == H:
        return []
    drop = torch.ones(H, dtype=torch.bool)
    drop[keep] = False
    ad.embedding().weight[:, drop.to(ad.embedding().weight.device)] = 0
    if not ad.tied():
        ad.lm_head().weight[:, drop.to(ad.lm_head().weight.device)] = 0
    for i in range(ad.dims.num_layers):
        for lin in (ad.attn_out(i), ad.ffn_down(i)):
            lin.weight[drop.to(lin.weight.device)] = 0
            if lin.bias is not None:
                lin.bias[drop.to(lin.bias.device)] = 0
    saved = []
    scale = (len(keep) / H) ** 0.5
    for norm in ad.norms():
        saved.append((norm, norm.weight.detach().clone()))
        w = norm.weight.float() * scale
        w[drop.to(w.device)] = 0
        norm.weight.copy_(w)
    return saved


def _prune_width(work, ad: LlamaFamilyAdapter, counts: dict[str, list[int]], batches, config: StructuredConfig,
                 show_progress: bool, dense_ref=None):
    """Step 4 of the module docstring, keeping `counts["kv_heads"][i]` groups and `counts["neurons"][i]` neurons in
    layer `i`: the head and neuron masks `(L, kv)`, `(L, I)` and each refit layer's calibration reconstruction error,
    importance only and refit (relative to its output's energy).

    With `dense_ref = (dense adapter, kept dense layer of each block, kept hidden channels)` (`refit_target="dense"`)
    every projection of a block is refit to the dense model's output of the same projection, in the order the block
    computes them (q/k/v, o_proj, gate/up, down_proj), each on the inputs the projections refit before it produce."""
    d = ad.dims
    L, g, dh = d.num_layers, d.group_size, d.head_dim
    heads = torch.ones(L, d.head_units)
    neurons = torch.ones(L, d.intermediate_size)
    errors: dict[str, dict[str, float]] = {}
    kv, ffn = counts["kv_heads"], counts["neurons"]
    if dense_ref is None and all(k == d.head_units for k in kv) and all(n == d.intermediate_size for n in ffn):
        return heads, neurons, errors
    inputs = capture_block_inputs(work, Blocks("model.layers", ad.layers), batches)
    if dense_ref is not None:
        dad, dense_of, keep_hidden = dense_ref
        dense_inputs = capture_block_inputs(dad.model, Blocks("model.layers", dad.layers), batches)
        dense_next = 0  # the dense layer whose inputs `dense_inputs` holds
    bar = tqdm(total=L, desc="structured: pruning blocks", unit="block", disable=not show_progress)
    for i, layer in enumerate(ad.layers):
        to_dense = dense_ref is not None
        if to_dense:
            k = dense_of[i]
            for j in range(dense_next, k):  # through the dense layers that were dropped
                advance(dad.layers[j], dense_inputs)
            dense_next, dense_layer = k, dad.layers[k]

            def paired(lin, dense_lin, layer=layer, dense_layer=dense_layer):
                return paired_moments(layer, lin, inputs, dense_layer, dense_lin, dense_inputs)

            m = paired(ad.qkv(i)[0], dad.qkv(k)[0])  # q, k and v read the same input
            for proj, lin in zip(("q_proj", "k_proj", "v_proj"), ad.qkv(i)):
                errors[f"model.layers.{i}.self_attn.{proj}"] = _cut_inputs(lin, m.gram, keep_hidden, config, m)
        if kv[i] < d.head_units or to_dense:
            name = f"model.layers.{i}.self_attn.o_proj"
            m = paired(ad.attn_out(i), dad.attn_out(k)) if to_dense else None
            gram, split = (m.gram, None) if m else _input_gram(layer, name, ad.attn_out(i), inputs, config)
            groups = top(group_scores(gram.diagonal(), d.head_units), kv[i])
            cols = (groups.unsqueeze(1) * (g * dh) + torch.arange(g * dh, device=groups.device)).flatten()
            errors[name] = _cut_inputs(ad.attn_out(i), gram, cols, config, m, split)
            heads[i] = 0
            heads[i, groups.cpu()] = 1
        if to_dense:
            m = paired(ad.ffn_in(i)[0], dad.ffn_in(k)[0])  # gate and up read the same input
            for proj, lin in zip(("gate_proj", "up_proj"), ad.ffn_in(i)):
                errors[f"model.layers.{i}.mlp.{proj}"] = _cut_inputs(lin, m.gram, keep_hidden, config, m)
        if ffn[i] < d.intermediate_size or to_dense:
            name = f"model.layers.{i}.mlp.down_proj"
            m = paired(ad.ffn_down(i), dad.ffn_down(k)) if to_dense else None
            gram, split = (m.gram, None) if m else _input_gram(layer, name, ad.ffn_down(i), inputs, config)
            keep = top(neuron_scores(gram.diagonal()), ffn[i])
            errors[name] = _cut_inputs(ad.ffn_down(i), gram, keep, config, m, split)
            neurons[i] = 0
            neurons[i, keep.cpu()] = 1
        if i + 1 < L:
            advance(layer, inputs)
            if to_dense:
                advance(dense_layer, dense_inputs)
                dense_next = k + 1
        bar.update(1)
    bar.close()
    return heads, neurons, errors


def _input_gram(layer: nn.Module, name: str, lin: nn.Linear, inputs, config: StructuredConfig):
    """`(G, split)`: the Gram of `lin`'s input over the calibration windows and, with `damping="auto"` (and a refit to
    make), its `(fitting, held-out)` parts for choosing the ridge ([`choose_damping`]); else `split` is None."""
    if config.damping == "auto" and config.reconstruct:
        fit, held = split_grams(layer, lin, inputs)
        return fit + held, (fit, held)
    return collect_stats(layer, [LayerPlan(name, lin, 0.0)], inputs, True)[name].gram, None


def _cut_inputs(lin: nn.Linear, gram: torch.Tensor, keep: torch.Tensor, config: StructuredConfig,
                moments: PairedMoments | None = None, split: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Zeroes the removed input columns of `lin` and (with `config.reconstruct`) refits the kept ones, to the layer's
    own output or, given the paired `moments`, to the dense model's; with the `split` Gram (`damping="auto"`) the
    ridge is chosen on the held-out windows first."""
    w = lin.weight.detach().float()
    keep = keep.to(w.device)
    cross, dense_gram = (moments.cross, moments.dense_gram) if moments is not None else (None, None)
    sliced = w.index_select(1, keep)
    damping = choose_damping(w, *split, keep)[0] if split is not None else config.damping
    damping = FALLBACK if damping == "auto" else damping  # refit_target="dense": its paired moments are not split
    new = refit(w, gram, keep, damping, cross) if config.reconstruct else sliced
    record = {"importance_only": relative_error(w, sliced, gram, keep, cross, dense_gram)}
    if config.reconstruct:
        record["reconstructed"] = relative_error(w, new, gram, keep, cross, dense_gram)
        record["damping"] = damping
    full = torch.zeros_like(w)
    full[:, keep] = new
    lin.weight.copy_(full.to(lin.weight.dtype))
    return record
