"""CoFi: coarse- and fine-grained structured pruning with distillation (Xia, Zhong & Chen, ACL 2022)."""

from .config import CoFiConfig
from .export_format import StructuredFormat
from .plugin import CoFiPlugin
from .structure import apply_structure, describe_structure

__all__ = [
    "CoFiConfig",
    "CoFiPlugin",
    "StructuredFormat",
    "apply_structure",
    "describe_structure",
]
