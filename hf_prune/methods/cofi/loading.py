"""`from_pretrained` support for CoFi-pruned checkpoints, through transformers' quantizer registry.

A saved pruned model keeps its original `config.json` (a stock `BertForSequenceClassification`, ...) plus
`quantization_config = {"quant_method": "hf_prune_structured", "structure": {...}}`. After `import hf_prune`, the
registered quantizer's `_process_model_before_weight_loading` reshapes the freshly built (meta-device) model with
[`apply_structure`], and the smaller weights load into it: the result is an ordinary model of the stock class.

Without hf_prune, transformers warns "Unknown quantization type, got hf_prune_structured", skips the quantizer and
then refuses the checkpoint because its shapes differ from the config's ("ignore_mismatched_sizes ... raising an
error"): it never silently loads random weights (unless the user forces `ignore_mismatched_sizes=True`).

This is the only file that touches the quantizer registry; the shared export registry can absorb it as is.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .structure import apply_structure

QUANT_METHOD = "hf_prune_structured"
_NOTE = "Structurally pruned by hf_prune (CoFi): `pip install hf_prune` and `import hf_prune` before from_pretrained."


class StructuredPruningConfig(QuantizationConfigMixin):
    """Carries the pruned structure in `config.json` under `quantization_config`.

    Args:
        structure (`dict`): output of [`describe_structure`].
    """

    def __init__(self, structure: dict[str, Any] | None = None, **kwargs):
        if structure is None:
            raise ValueError(f"{QUANT_METHOD} quantization_config needs a `structure`")
        self.quant_method = QUANT_METHOD
        self.structure = structure
        self.note = _NOTE

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "structure": self.structure, "note": _NOTE}


class StructuredPruningQuantizer(HfQuantizer):
    """Rebuilds the pruned shapes before the weights load; the weights themselves are ordinary dense tensors."""

    requires_calibration = True  # only pre-pruned checkpoints: passing this config to a dense model is an error

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs):
        apply_structure(model, self.quantization_config.structure)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs):
        # The weights are plain dense tensors: the model can be cast (.half()) and fine-tuned like any other.
        model.is_quantized = False
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Registers the config and quantizer with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(StructuredPruningConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(StructuredPruningQuantizer)


def mark_structured(model: nn.Module, structure: dict[str, Any]) -> None:
    """Records `structure` in `model.config` so that `save_pretrained` writes a loadable checkpoint."""
    model.config.quantization_config = StructuredPruningConfig(structure=structure)


register()
