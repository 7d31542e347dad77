"""CoFi: coarse- and fine-grained structured pruning with distillation (Xia, Zhong & Chen, ACL 2022)."""

from .config import CoFiConfig
from .loading import QUANT_METHOD, StructuredPruningConfig
from .plugin import CoFiPlugin
from .structure import apply_structure, describe_structure

__all__ = [
    "CoFiConfig",
    "CoFiPlugin",
    "QUANT_METHOD",
    "StructuredPruningConfig",
    "apply_structure",
    "describe_structure",
]
