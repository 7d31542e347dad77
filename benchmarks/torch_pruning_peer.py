"""The Torch-Pruning 1.6.1 peer row of `benchmarks/structured_smollm2.py` (benchmark-only dependency:
`pip install torch-pruning==1.6.1`).

Settings of Torch-Pruning's LLM example (`examples/LLMs/prune_llm.py`): `MetaPruner` with the group L2-magnitude
importance (`GroupMagnitudeImportance(p=2, group_reduction="mean")`, 1.6.1's name for the example's
`GroupNormImportance`), local (per-layer) pruning at one `pruning_ratio` for hidden channels and FFN neurons, the LM
head ignored, head dimensions kept (`prune_head_dims=False`: RoPE), no calibration data and no recovery; the config
is then rewritten to the new widths as the example does. Departures, each needed for SmolLM2 and recorded:
- the embeddings are untied for pruning, so that no shared tensor is sliced twice, and tied again after it (both
  tables lose the same hidden channels, so the tie is exact). Issue 30 saw the dependency graph of the tied model
  unfinished after 22 CPU-minutes; with the trace below the tied graph builds in seconds (`tied_build_probe`,
  recorded as the results' `torch_pruning_tied_probe`);
- `round_to` is lcm(4, query heads) = 36 instead of 4: `LlamaConfig` refuses a hidden size the 9 query heads do not
  divide, so a hidden size of 460 would not save as a plain checkpoint;
- the attention's heads are kept whole: `q_proj`, `k_proj`, `v_proj` are ignored layers as well (their inputs, the
  hidden channels, are still pruned). With `num_heads` given, 1.6.1 fails on SmolLM2's grouped-query attention
  (9 query / 3 KV heads: `shape '[9, -1]' is invalid for input of size 192`, the 192 KV channels grouped by the 9
  query heads); mapping the query heads by KV group instead prunes them inconsistently with their KV head (8 query
  heads left over 2 KV heads); and without `num_heads`, `prune_head_dims=False` does not protect the head dimensions
  (q 576 -> 492 channels, not a whole number of heads). So the peer prunes hidden channels and FFN neurons;
- the forward it traces returns the logits only (`output_transform`) with `use_cache=False`: the output's KV cache
  object is not a tensor it can trace.
The ratio is the one whose result has the non-embedding parameter count nearest the target, found on a one-layer
truncation (the pruning is per layer and uniform, so one layer gives every layer's shape).
"""

from __future__ import annotations

import cProfile
import copy
import io
import math
import pstats
import signal
import time

import torch
from torch import nn

SETTINGS = {"importance": "GroupMagnitudeImportance(p=2, group_reduction='mean')", "global_pruning": False,
            "prune_num_heads": False, "prune_head_dims": False,
            "ignored_layers": ["lm_head", "q_proj", "k_proj", "v_proj"],
            "untied_for_tracing": True, "round_to": "lcm(4, num_attention_heads)", "calibration": None}


def _untie(model: nn.Module) -> None:
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False


def _retie(model: nn.Module) -> bool:
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    if emb.shape != head.shape or not torch.equal(emb, head):
        return False
    model.lm_head.weight = emb
    model.config.tie_word_embeddings = True
    return True


def _pruner(model: nn.Module, ratio: float):
    import torch_pruning as tp

    model.config.use_cache = False
    attention = [getattr(layer.self_attn, n) for layer in model.model.layers for n in ("q_proj", "k_proj", "v_proj")]
    return tp.pruner.MetaPruner(
        model, example_inputs=torch.tensor([[1, 2, 3, 4, 5]]),
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"), global_pruning=False,
        pruning_ratio=ratio, ignored_layers=[model.lm_head, *attention], prune_num_heads=False, prune_head_dims=False,
        round_to=math.lcm(4, model.config.num_attention_heads), output_transform=lambda out: out.logits)


def prune(model: nn.Module, ratio: float) -> dict:
    """Prunes `model` in place at `ratio` (the module docstring's settings); returns the timings."""
    use_cache = model.config.use_cache
    _untie(model)
    start = time.perf_counter()
    pruner = _pruner(model, ratio)
    built = time.perf_counter()
    for group in pruner.step(interactive=True):
        group.prune()
    done = time.perf_counter()
    first = model.model.layers[0]
    model.config.hidden_size = model.lm_head.in_features
    model.config.intermediate_size = first.mlp.gate_proj.out_features
    model.config.use_cache = use_cache
    retied = _retie(model)
    return {"graph_build_s": round(built - start, 2), "prune_s": round(done - built, 2), "retied": retied}


def non_embedding_params(model: nn.Module) -> int:
    tables = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.lm_head.weight)}
    return sum(p.numel() for p in model.parameters()) - sum(tables.values())


def ratio_for(load_dense, target: int, *, grid: int = 60) -> tuple[float, int]:
    """`(ratio, non-embedding params)`: the ratio among `0.6 * k / grid` whose pruned model is nearest `target`
    non-embedding parameters, measured on a one-layer truncation of `load_dense()` (every layer is pruned alike)."""
    model = load_dense()
    layers = model.config.num_hidden_layers
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:1]
    best = None
    for step in range(1, grid + 1):
        ratio = round(0.6 * step / grid, 4)
        trial = copy.deepcopy(model)
        prune(trial, ratio)
        final_norm = trial.model.norm.weight.numel()
        count = (non_embedding_params(trial) - final_norm) * layers + final_norm
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (ratio, count)
    return best


def tied_build_probe(load_dense, timeout_s: int) -> dict:
    """Builds the example's pruner on the **tied** model (as shipped) for at most `timeout_s`; returns the build time
    or, when it is cut off, the cProfile top 10 (cumulative) of the build so far."""
    model = load_dense()
    profile = cProfile.Profile()

    def stop(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(timeout_s)
    start = time.perf_counter()
    result = {"timeout_s": timeout_s}
    profile.enable()
    try:
        _pruner(model, 0.2)
        result["graph_build_s"] = round(time.perf_counter() - start, 2)
    except TimeoutError:
        result["finished"] = False
    except Exception as err:  # noqa: BLE001 -- recorded: whether the tied model can be traced at all
        result["error"] = f"{type(err).__name__}: {err}"[:500]
    finally:
        profile.disable()
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    if "graph_build_s" not in result:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(10)
        result["profile_top10"] = out.getvalue().strip().splitlines()[-12:]
    return result
