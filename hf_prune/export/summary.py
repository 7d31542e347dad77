"""The text side of `hf-prune info`: module names in natural order, sparsity grouped per block, and the results
recorded with an export (the `PruningState` metrics in `config.json` and the model card's model-index)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

# Metrics that describe the export's structure, not a result (the card renders them as their own tables).
INTERNAL_METRICS = ("export_format", "structure", "kept_head_indices", "structure_before", "kept_kv_groups",
                    "kept_layer_indices", "layer_influence", "reconstruction_error", "target_architecture")
_SPEED_WORDS = ("speed", "latency", "throughput", "tokens_per")
_QUALITY_WORDS = ("perplexity", "accuracy", "exact_match", "bleu", "rouge")  # matched anywhere in the name
_QUALITY_TOKENS = {"ppl", "acc", "loss", "f1", "eval"}  # matched as whole `_`-separated parts


def is_speed_metric(name: str) -> bool:
    return any(word in name.lower() for word in _SPEED_WORDS)


def _is_quality_metric(name: str) -> bool:
    lower = name.lower()
    return any(w in lower for w in _QUALITY_WORDS) or bool(_QUALITY_TOKENS & set(re.split(r"[^a-z0-9]+", lower)))


def natural_key(name: str) -> list:
    """Sort key comparing runs of digits as numbers: `layers.2` before `layers.10`."""
    # re.split with a capturing group alternates text / digits, so ints only ever meet ints
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def natural_sorted(mapping: dict) -> dict:
    """`mapping` with its module-name keys in natural order (config.json stores them sorted as text)."""
    return {key: mapping[key] for key in sorted(mapping, key=natural_key)}


# ------------------------------------------------------------------------------------------ recorded results
def card_eval_results(directory: str | Path) -> list[dict]:
    """The model card's model-index entries (what `save_pruned(eval_results=...)` wrote), as plain dicts."""
    from huggingface_hub import ModelCard

    readme = Path(directory) / "README.md"
    if not readme.is_file():
        return []
    try:
        results = ModelCard.load(readme).data.eval_results or []
    except Exception:  # a hand-written README with malformed metadata: info reports what it can, never fails
        return []
    return [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in results]


def recorded_results(directory: str | Path, metrics: dict) -> dict:
    """Results recorded with the export, grouped: `evaluation` (model card), `quality`, `speed` and `run` metrics."""
    out = {"evaluation": card_eval_results(directory), "quality": {}, "speed": {}, "run": {}}
    for name, value in metrics.items():
        if name in INTERNAL_METRICS or isinstance(value, (dict, list)):
            continue
        group = "speed" if is_speed_metric(name) else "quality" if _is_quality_metric(name) else "run"
        out[group][name] = value
    return out


def _value(v) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def format_results(results: dict) -> list[str]:
    """Lines of the "Recorded results" section; `x_before` / `x_after` pairs are shown as one `before -> after`."""
    lines = []
    evaluation = results.get("evaluation") or []
    if evaluation:
        lines.append("  evaluation (model card):")
    for r in evaluation:
        where = r.get("dataset_name") or r.get("dataset_type", "")
        split = f" [{r['dataset_split']}]" if r.get("dataset_split") else ""
        lines.append(f"    {r.get('metric_type')}: {_value(r.get('metric_value'))} on {where}{split} ({r.get('task_type')})")
    for group in ("quality", "speed", "run"):
        metrics = results.get(group) or {}
        if metrics:
            lines.append(f"  {group}:")
        for name, value in metrics.items():
            stem = name.removesuffix("_before").removesuffix("_after")
            before, after = f"{stem}_before", f"{stem}_after"
            if name == after and before in metrics:
                continue  # shown with its `_before`
            if name == before and after in metrics:
                lines.append(f"    {stem}: {_value(value)} -> {_value(metrics[after])} (before -> after)")
            else:
                lines.append(f"    {name}: {_value(value)}")
    return ["Recorded results:"] + lines if lines else ["Recorded results: none"]


# ------------------------------------------------------------------------------------------ sparsity per block
def split_block(name: str) -> tuple[str | None, str]:
    """`model.layers.3.mlp.up_proj` -> (`model.layers.3`, `mlp.up_proj`); (None, name) outside numbered blocks."""
    match = re.match(r"^(.*?\.\d+)\.(.+)$", name)
    return (match.group(1), match.group(2)) if match else (None, name)


def _value4(v) -> str:
    return f"{v:.4f}" if v is not None else "-"


def _cell(recorded, measured) -> str:
    if recorded is None:
        return f"-/{measured:.4f}" if measured is not None else "-"
    if measured is not None and abs(measured - recorded) > 5e-5:
        return f"{recorded:.4f}/{measured:.4f}"
    return f"{recorded:.4f}"


def format_sparsity(desc: dict, *, per_module: bool = False) -> list[str]:
    """Sparsity lines of `hf-prune info`: one row per block (columns per module kind), or one line per module."""
    recorded = desc["module_sparsity"]
    measured = desc["measured_sparsity"]
    names = sorted(list(recorded) + [n for n in measured if n not in recorded], key=natural_key)
    if not names:
        return []
    codecs = desc["codecs"]
    if per_module:
        lines = [f"Sparsity per module ({len(names)} modules, recorded / measured):"]
        for name in names:
            r, m = recorded.get(name), measured.get(name)
            codec = codecs.get(f"{name}.weight", "dense")
            lines.append(f"  {name:<60} {_value4(r)} / {_value4(m)}  [{codec}]")
        return lines
    blocks: dict[str, dict[str, str]] = {}
    kinds: list[str] = []
    others = []
    for name in names:
        block, kind = split_block(name)
        cell = _cell(recorded.get(name), measured.get(name))
        if block is None:
            others.append((name, cell))
            continue
        if kind not in kinds:
            kinds.append(kind)
        blocks.setdefault(block, {})[kind] = cell
    used = sorted({codecs.get(f"{n}.weight", "dense") for n in names})
    lines = [f"Sparsity per block ({len(names)} modules in {len(blocks)} blocks; recorded, or recorded/measured where "
             f"they differ; codecs: {', '.join(used)}; --per-module for one line each):"]
    if blocks:
        width = max(len(b) for b in blocks)
        widths = [max(len(k), *(len(cells.get(k, "-")) for cells in blocks.values())) for k in kinds]
        lines.append("  " + " ".join([f"{'block':<{width}}"] + [f"{k:>{w}}" for k, w in zip(kinds, widths)]))
        for block, cells in blocks.items():
            lines.append("  " + " ".join([f"{block:<{width}}"] + [f"{cells.get(k, '-'):>{w}}" for k, w in zip(kinds, widths)]))
    lines += [f"  {name}: {cell}" for name, cell in others]
    return lines
