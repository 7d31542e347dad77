"""Structured one-shot pruning of decoders: importance, unit removal, least-squares refit of the consumers."""

from .config import StructuredConfig
from .prune import structured_oneshot

__all__ = ["StructuredConfig", "structured_oneshot"]
