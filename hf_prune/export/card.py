"""Model card of a pruned model, rendered with `huggingface_hub.ModelCard` from the Jinja template in `model_cards/`.

Where the template is found: the source of truth is `model_cards/pruned_model_card.md.j2` at the repository root.
`hf_prune/model_cards` is a symlink to it, listed as package data, so a wheel/sdist build copies the file into the
installed package; a source checkout or `pip install -e .` reads it through the symlink or the repository path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..state import get_pruning_state, get_training_record
from .summary import INTERNAL_METRICS, is_speed_metric

TEMPLATE_NAME = "pruned_model_card.md.j2"
TRAINED_TEMPLATE_NAME = "trained_model_card.md.j2"
CARD_MARKER = "hf_prune:model-card"

_LAYOUT_TEXT = {
    "unstructured": "unstructured sparsity",
    "structured": "structured pruning: heads, neurons and layers physically removed",
}


def template_path(name: str = TEMPLATE_NAME) -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "model_cards" / name, here.parents[1] / "model_cards" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"hf_prune model card template {name!r} not found next to the package or in the repository's "
        "model_cards/; reinstall hf_prune"
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _layout_description(layout: str) -> str:
    if layout in _LAYOUT_TEXT:
        return _LAYOUT_TEXT[layout]
    if layout.startswith("block:"):
        return f"block sparsity, {layout[len('block:'):]} blocks"
    return f"{layout} semi-structured sparsity"


def _format_description(layout: str) -> str:
    if layout == "structured":
        return ("the smaller model's own dense weights; its per-layer shapes are in config.json's quantization_config "
                "(format in hf_prune's docs/format.md)")
    if ":" in layout and layout.replace(":", "").isdigit():
        return f"non-zero values plus packed {layout} group indices (format in hf_prune's docs/format.md)"
    if layout.startswith("block:"):
        return "kept blocks plus a block bitmask (format in hf_prune's docs/format.md)"
    return "non-zero values plus a bitmask (format in hf_prune's docs/format.md)"


def layer_table(module_sparsity: dict[str, float]):
    """Pivots `{'model.layers.3.mlp.up_proj': 0.5}` into rows per layer and columns per module kind."""
    pivot: dict[int, dict[str, float]] = {}
    columns: list[str] = []
    others = []
    for name, value in module_sparsity.items():
        match = re.match(r"^(?:.*\.)?(\d+)\.(.+)$", name)
        if not match:
            others.append((name, _pct(value)))
            continue
        layer, kind = int(match.group(1)), match.group(2)
        if kind not in columns:
            columns.append(kind)
        pivot.setdefault(layer, {})[kind] = value
    if not pivot:
        return None, others
    rows = [
        {"layer": layer, "cells": [_pct(pivot[layer][c]) if c in pivot[layer] else "–" for c in columns]}
        for layer in sorted(pivot)
    ]
    return {"columns": columns, "rows": rows}, others


def _eval_results(results) -> list[EvalResult]:
    out = []
    for r in results or []:
        if isinstance(r, EvalResult):
            out.append(r)
        elif isinstance(r, dict):
            try:
                out.append(EvalResult(**r))
            except TypeError as err:
                raise ValueError(f"eval_results entry {r!r} is not valid for huggingface_hub.EvalResult: {err}") from None
        else:
            raise TypeError(f"eval_results entries must be EvalResult or dict, got {type(r).__name__}")
    return out


def _structure_summary(metrics: dict) -> dict | None:
    """What a structured (CoFi) export kept, per layer and overall, for the card."""
    structure = metrics.get("structure")
    if not isinstance(structure, dict) or "layers" not in structure:
        return None
    # a plain structure's "original" is its own (smaller) config; the structured one-shot records the model before
    before = metrics.get("structure_before")
    original = (before if isinstance(before, dict) else structure).get("original", {})
    kept = metrics.get("kept_neurons_per_layer") or [None] * len(structure["layers"])

    def ffn(width: int, n: int | None) -> str:  # CoFiConfig.multiple_of pads a kept FFN with zero neurons
        pad = f" ({n} kept + {width - n} zero padding)" if n is not None and width > n else ""
        return f"{width} / {original.get('intermediate_size', '?')}{pad}"

    rows = [
        {"layer": i, "heads": f"{layer['heads']} / {original.get('num_attention_heads', '?')}",
         "ffn": ffn(layer["intermediate_size"], n)}
        for i, (layer, n) in enumerate(zip(structure["layers"], kept))
    ]
    decoder = bool(structure["layers"]) and "kv_heads" in structure["layers"][0]
    return {"rows": rows, "hidden": structure.get("hidden_size"), "hidden_before": original.get("hidden_size"),
            "params_before": metrics.get("params_before"), "plain": bool(structure.get("plain")),
            "kind": "decoder" if decoder else "encoder",
            "facts": _decoder_facts(metrics, structure, before) if decoder else []}


def _decoder_shape(structure: dict) -> str:
    """`"30 layers, 9 query heads in 3 KV groups, FFN 1536, hidden 576"`; per-layer shapes as `min–max`."""
    layers = [s for s in structure["layers"] if not (s["attention_removed"] and s["ffn_removed"])]

    def span(key: str) -> str:
        values = sorted({int(s[key]) for s in layers})
        return f"{values[0]}" if len(values) == 1 else f"{values[0]}–{values[-1]} (per layer)"

    return (f"{len(layers)} layers, {span('heads')} query heads in {span('kv_heads')} KV groups, "
            f"FFN {span('intermediate_size')}, hidden {structure['hidden_size']}")


def _decoder_facts(metrics: dict, structure: dict, before) -> list[str]:
    """The card's lines on a structured decoder: its shape before and after, FLOPs per token, and the calibration
    and distillation data and tokens, from what the run recorded (a line is left out when its figures are not)."""
    m = metrics
    facts = []
    if isinstance(before, dict) and "layers" in before:
        facts.append(f"**Structure**: {_decoder_shape(before)} → {_decoder_shape(structure)}")
    before_flops, after_flops = m.get("flops_per_token_before"), m.get("flops_per_token_after")
    if before_flops and after_flops:
        context = f" at a {m['flops_context']}-token context" if m.get("flops_context") else ""
        facts.append(f"**FLOPs per generated token**{context}: {before_flops:,} → {after_flops:,} "
                     f"({after_flops / before_flops:.2f}×)")
    if m.get("calibration_tokens") and m.get("calibration_samples"):
        n, tokens = int(m["calibration_samples"]), int(m["calibration_tokens"])
        data = f"{m['calibration_data']}, " if m.get("calibration_data") else ""
        facts.append(f"**Calibration data**: {data}{n} windows × {tokens // n} tokens = {tokens:,} tokens")
    if m.get("distillation_tokens") is not None:
        ppl = ""
        if m.get("distillation_perplexity_after") is not None:
            ppl = (f"; held-out perplexity {m['distillation_perplexity_before']} → "
                   f"{m['distillation_perplexity_after']} (teacher {m['distillation_teacher_perplexity']})")
        facts.append(f"**Distillation data**: {m.get('distillation_data', 'not recorded')}, "
                     f"{m.get('distillation_steps')} steps × {m.get('distillation_seq_len')}-token windows = "
                     f"{int(m['distillation_tokens']):,} tokens, from `{m.get('distillation_teacher')}`{ppl}")
    return facts


def _model_stats(model, module_sparsity: dict[str, float], report=None) -> dict:
    """Zeros in the pruned weights (from the save's `CompressionReport` where it counted them: no second pass over
    the weights), parameter count and dense bytes."""
    modules = dict(model.named_modules())
    counted = report.entries if report is not None else {}
    zeros = numel = 0
    for name in module_sparsity:
        weight = getattr(modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            entry = counted.get(f"{name}.weight") or {}
            nonzero = entry.get("nonzero", -1) if entry.get("numel") == weight.numel() else -1
            if nonzero < 0 and weight.is_meta:  # an offloaded run's model: its recorded sparsity is exact
                nonzero = weight.numel() - round(module_sparsity[name] * weight.numel())
            zeros += weight.numel() - (nonzero if nonzero >= 0 else int(torch.count_nonzero(weight)))
            numel += weight.numel()
    total = model.num_parameters() if hasattr(model, "num_parameters") else sum(p.numel() for p in model.parameters())
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"zeros": zeros, "pruned_numel": numel, "total": total, "dense_bytes": dense_bytes}


def _auto_class(model) -> str:
    name = type(model).__name__
    for suffix, auto in (
        ("ForCausalLM", "AutoModelForCausalLM"),
        ("LMHeadModel", "AutoModelForCausalLM"),
        ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ("ForTokenClassification", "AutoModelForTokenClassification"),
        ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
        ("ForMaskedLM", "AutoModelForMaskedLM"),
    ):
        if name.endswith(suffix):
            return auto
    return "AutoModel"


def _history_rows(state, final: str) -> list[dict]:
    """One row per pruning run of a re-pruned model (empty for a model pruned once), the last one being `state`."""
    if not state.history:
        return []
    runs = [*state.history, {"config": state.config.to_dict(), "layout": state.layout, "command": state.command}]
    rows = []
    for index, run in enumerate(runs, 1):
        config = run.get("config") if isinstance(run.get("config"), dict) else {}
        configured = config.get("sparsity", config.get("target_sparsity"))
        after = run.get("sparsity")
        rows.append({
            "index": index, "method": config.get("method", "?"), "layout": run.get("layout", "?"),
            "configured": _pct(configured) if isinstance(configured, (int, float)) else "n/a",
            "after": final if index == len(runs) else (_pct(after) if isinstance(after, (int, float)) else "n/a"),
            "command": run.get("command"),
        })
    return rows


def build_model_card(
    model,
    directory: str | Path | None = None,
    *,
    report=None,
    eval_results=None,
    dense: bool = False,
    repo_id: str | None = None,
    tags: list[str] | None = None,
) -> ModelCard:
    """Renders the card of `model` (its `PruningState`); file sizes are read from `directory` when given."""
    state = get_pruning_state(model)
    if state is None and get_training_record(model):
        return build_trained_card(model, directory, eval_results=eval_results, repo_id=repo_id, tags=tags)
    if state is None:
        raise ValueError("build_model_card needs a model carrying an hf_prune PruningState")
    method = state.config.method or type(state.config).__name__
    stats = _model_stats(model, state.module_sparsity, report)
    size_after = None
    if directory is not None:
        size_after = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) or None
    size_before = stats["dense_bytes"]
    overall = stats["zeros"] / stats["pruned_numel"] if stats["pruned_numel"] else state.overall_sparsity
    structure = _structure_summary(state.metrics) if state.layout == "structured" else None
    if structure is not None:  # units were removed, not zeroed: compare with the original model
        overall = float(state.metrics.get("sparsity", overall))
        if structure["params_before"]:
            size_before = structure["params_before"] * next(model.parameters()).element_size()
    evals = _eval_results(eval_results)
    card_tags = ["hf_prune", "pruned", "structured" if state.layout == "structured" else "sparse", method]
    card_tags += [t for t in tags or [] if t not in card_tags]
    card_data = ModelCardData(
        base_model=state.base_model,
        library_name="transformers",
        tags=card_tags,
        eval_results=evals or None,
        model_name=(repo_id or (Path(directory).name if directory else None) or f"{method}-pruned") if evals else None,
    )
    table, others = layer_table(state.module_sparsity)
    # the structure itself is rendered as its own table (and stored in config.json), not as a metric value
    metrics = [(k, v) for k, v in state.metrics.items() if k not in INTERNAL_METRICS]
    speed_metrics = [(k, v) for k, v in metrics if is_speed_metric(k)]
    # the summary line keeps to the speed-up ratios when there are any; the full list is in the metrics table
    speed = ", ".join(f"{k}: {v}" for k, v in ([m for m in speed_metrics if "speedup" in m[0].lower()] or speed_metrics))
    base = state.base_model
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        marker=CARD_MARKER,
        title=f"{Path(base).name if base else 'Model'} pruned with {method} ({_pct(overall)} sparse)",
        base_model=base,
        base_model_link=f"https://huggingface.co/{base}" if base and not Path(base).exists() else base,
        method=method,
        layout=state.layout,
        layout_description=_layout_description(state.layout),
        format_description=_format_description(state.layout),
        overall_sparsity=_pct(overall),
        overall_model_sparsity=_pct(stats["zeros"] / stats["total"]) if stats["total"] else "n/a",
        n_pruned=len(state.module_sparsity),
        params_total=f"{stats['total']:,}",
        params_nonzero=f"{stats['total'] - stats['zeros']:,}",
        size_before=_size(size_before),
        size_after=_size(size_after),
        size_ratio=f"{size_after / size_before:.2f}×" if size_after and size_before else "n/a",
        dense_export=dense,
        plain_export=bool(structure and structure["plain"]),
        speed=speed,
        auto_class=_auto_class(model),
        repo_id=repo_id or (str(directory) if directory else "path/to/export"),
        config_json=json.dumps(state.config.to_dict(), indent=2, sort_keys=True),
        metrics=metrics,
        eval_results=evals,
        layer_table=table,
        other_modules=others,
        structure=structure,
        params_before=f"{structure['params_before']:,}" if structure and structure["params_before"] else None,
        command=state.command,
        history=_history_rows(state, _pct(overall)),
    )


_SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                 "vocab_size")


def build_trained_card(model, directory=None, *, eval_results=None, repo_id: str | None = None,
                       tags: list[str] | None = None) -> ModelCard:
    """The card of a plain (unpruned) model that hf_prune trained, e.g. a smaller student distilled from a teacher:
    its shape, parameters, the run's record ([`record_training`]) and how to load it with plain transformers."""
    record = get_training_record(model)
    teacher = record.get("distillation_teacher")
    evals = _eval_results(eval_results)
    base = getattr(model.config, "_name_or_path", None) or None
    card_tags = ["hf_prune"] + (["distillation"] if teacher else [])
    card_tags += [t for t in tags or [] if t not in card_tags]
    card_data = ModelCardData(base_model=base, library_name="transformers", tags=card_tags, eval_results=evals or None,
                              model_name=(repo_id or (Path(directory).name if directory else None) or "model") if evals else None)
    size = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors")) if directory is not None else None
    config = model.config
    shape = [(k, getattr(config, k)) for k in _SHAPE_FIELDS if getattr(config, k, None) is not None]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path(TRAINED_TEMPLATE_NAME)),
        marker=CARD_MARKER,
        title=f"{Path(base).name if base else 'Model'}" + (f" distilled from {Path(str(teacher)).name}" if teacher else ""),
        teacher=teacher,
        params_total=f"{sum(p.numel() for p in model.parameters()):,}",
        teacher_params=f"{record['distillation_teacher_params']:,}" if record.get("distillation_teacher_params") else None,
        size=_size(size) if size else None,
        model_type=getattr(config, "model_type", None),
        shape=shape,
        auto_class=_auto_class(model),
        repo_id=repo_id or (str(directory) if directory else "path/to/model"),
        metrics=[(k, v) for k, v in record.items() if k not in ("command", "distillation_command")],
        eval_results=evals,
        command=record.get("distillation_command") or record.get("command"),
    )
