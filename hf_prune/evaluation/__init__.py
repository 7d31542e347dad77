"""Evaluating pruned models: held-out perplexity, and task accuracy with lm-evaluation-harness (the `eval` extra)."""

from .harness import evaluate_lm, harness_card_entries
from .perplexity import perplexity

__all__ = ["evaluate_lm", "harness_card_entries", "perplexity"]
