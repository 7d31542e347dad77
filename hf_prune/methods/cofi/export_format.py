"""The `"structured"` export format: CoFi checkpoints are physically smaller dense models.

A saved CoFi model keeps its original `config.json` (a stock `BertForSequenceClassification`, ...) with the shared
hf_prune `quantization_config` (`quant_method="hf_prune"`, `format="structured"`), whose `format_config` holds the
per-layer structure from [`describe_structure`]. Inside `from_pretrained` (after `import hf_prune`), `prepare_model`
reshapes the freshly built meta-device model with [`apply_structure`] and the smaller dense weights load into it:
the result is an ordinary model of the stock class.

Without hf_prune, transformers skips the unknown quantizer and then refuses the checkpoint because its shapes differ
from the config's (size-mismatch error); it never silently loads random weights.
"""

from __future__ import annotations

from torch import nn

from ...export.formats import ExportFormat, register_export_format
from .structure import apply_structure, describe_structure


@register_export_format("structured")
class StructuredFormat(ExportFormat):
    """Dense tensors of the shrunk model; the structure travels in `config.json`."""

    def format_config(self, model: nn.Module, state) -> dict:
        return {"structure": describe_structure(model)}

    def prepare_model(self, model: nn.Module, qconfig) -> None:
        structure = qconfig.format_config.get("structure")
        if structure is None:
            raise ValueError("hf_prune structured checkpoint: quantization_config.format_config has no `structure`")
        apply_structure(model, structure)

    def candidate_parameters(self, model, state_dict, qconfig) -> list[str]:
        # Nothing to compress: the removed heads, neurons and dimensions are gone from the shapes already.
        return []
