"""Export of pruned models: compressed safetensors that load with `from_pretrained`, model cards, Hub upload.

Importing this package registers the `quant_method="hf_prune"` loader with transformers. See `docs/format.md` for the
on-disk layout.
"""

from .codecs import CorruptCheckpointError, TensorCodec, register_codec
from .formats import ExportFormat, get_export_format, register_export_format
from .quantizer import HfPruneExportConfig, HfPruneQuantizer
from .save import compressed_state_dict, disable_compressed_save, enable_compressed_save, save_pruned
from .card import build_model_card
from .hub import PushError, push_pruned
from .info import describe_export, format_description, load_compressed_state_dict

__all__ = [
    "CorruptCheckpointError",
    "ExportFormat",
    "HfPruneExportConfig",
    "HfPruneQuantizer",
    "PushError",
    "TensorCodec",
    "build_model_card",
    "compressed_state_dict",
    "describe_export",
    "disable_compressed_save",
    "enable_compressed_save",
    "format_description",
    "get_export_format",
    "load_compressed_state_dict",
    "push_pruned",
    "register_codec",
    "register_export_format",
    "save_pruned",
]
