"""The model card of an ONNX export: the pruned model's own card (when it has one) plus a section on the export."""

from __future__ import annotations

from pathlib import Path

import onnxruntime
import torch
from huggingface_hub import ModelCard, ModelCardData

from ..state import get_pruning_state
from ..version import __version__

SECTION_MARKER = "<!-- hf_prune:onnx-export -->"


def _limit(report) -> str:
    if report.logit_tolerance is None:
        return f"{report.atol:g}"
    return (f"{report.logit_tolerance:.2e} = {report.atol:g} + {report.rtol:g} x max |logit| "
            f"{report.verification['max_abs_logit']:.3g}")


def export_section(report) -> str:
    """Markdown saying how the directory was exported and checked (`report`: an `OnnxExportReport`)."""
    v = report.verification
    lines = [
        SECTION_MARKER, "## ONNX export", "",
        f"Exported with hf_prune {__version__} (`torch.onnx`, TorchScript exporter, torch {torch.__version__}) to "
        f"ONNX opset {report.opset}, task `{report.task}`, in optimum's layout: `{report.onnx_file}` "
        f"({'weights in `' + report.external_data + '`' if report.external_data else 'weights inside'}), "
        "`config.json`, tokenizer files.",
        f"Inputs: {', '.join(f'`{n}`' for n in report.inputs if not n.startswith('past_key_values.'))}"
        + (f", `past_key_values.{{0..{report.num_layers - 1}}}.key/value`" if report.num_layers else "")
        + "; outputs: `logits`" + (f", `present.{{0..{report.num_layers - 1}}}.key/value` (KV cache)"
                                  if report.num_layers else "") + ". Batch and sequence axes are dynamic.",
        "",
        f"Checked against the PyTorch model in ONNX Runtime {onnxruntime.__version__} before writing, on "
        f"{v['positions']} predicted positions{' (prompt and cached decoding steps)' if report.num_layers else ''}: "
        f"max abs logit difference **{v['max_abs_logit_diff']:.2e}** (limit {_limit(report)}), argmax agreement "
        f"{v['argmax_agreement']:.4f}.",
    ]
    if report.int8 is not None:
        q = report.int8
        from .quantize import DESCRIPTIONS

        lines += [
            "",
            f"`{report.quantized_file}`: {DESCRIPTIONS[report.int8_scheme]}. Argmax agreement with PyTorch "
            f"**{q['argmax_agreement']:.4f}** (limit {report.min_int8_agreement:g}), max abs logit difference "
            f"{q['max_abs_logit_diff']:.2e}, verified in ONNX Runtime {onnxruntime.__version__} on "
            f"{report.verified_on}; these settings cannot saturate on x86-64 CPUs with or without VNNI, nor on ARM64.",
        ]
    lines += [
        "", "```python",
        "from hf_prune_ort import OnnxModel   # onnxruntime + numpy only; or optimum's "
        f"{report.ort_class} once it supports transformers 5",
        'model = OnnxModel.from_pretrained("path/to/export"'
        + (f', file_name="{report.quantized_file}"' if report.int8 is not None else "") + ")",
        "```",
    ]
    if report.command:
        lines += ["", f"Command: `{report.command}`"]
    return "\n".join(lines) + "\n"


def build_card(model, source_dir: Path | None, report) -> ModelCard:
    """The source directory's card (or the in-memory pruned model's) with the export section appended."""
    card = None
    if source_dir is not None and (source_dir / "README.md").is_file():
        card = ModelCard.load(source_dir / "README.md")
    elif get_pruning_state(model) is not None:
        from ..export.card import build_model_card

        card = build_model_card(model)
    if card is None:
        card = ModelCard(f"---\n{ModelCardData(library_name='onnx').to_yaml()}\n---\n\n# {type(model).__name__}\n")
    text = card.text.split(SECTION_MARKER)[0].rstrip() + "\n\n" + export_section(report)
    card = ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")
    tags = list(card.data.tags or [])
    card.data.tags = tags + [t for t in ("onnx", "int8" if report.int8 is not None else None) if t and t not in tags]
    return card
