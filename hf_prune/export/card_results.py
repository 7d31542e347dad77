"""Adding evaluation results to the model card of a saved checkpoint, without touching its weights or config.

Evaluations (lm-eval task accuracy) often run after the export, on the saved directory. Re-saving the model to get a
new card would rewrite every weight file; instead only `README.md` changes: its model-index (the YAML metadata the
Hub reads, and `hf-prune info` prints) gets the new results, replacing earlier entries of the same task, dataset and
metric and keeping every other one (the perplexity `hf-prune oneshot --eval` recorded), and an hf_prune card's
"Evaluation" table is rewritten to match. The new README replaces the old one in a single rename.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .card import CARD_MARKER, _eval_results

_README = "README.md"
# the "## Evaluation" section of the template: up to the next "## " heading or the end of the card
_EVAL_SECTION = re.compile(r"\n## Evaluation\n.*?(?=\n## |\Z)", re.DOTALL)
_INSERT_BEFORE = ("\n## Kept units per layer", "\n## Sparsity per layer", "\n## Reproduce")


def _key(r) -> tuple:
    return (r.task_type, r.task_name, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split,
            r.metric_type, r.metric_config)


def merge_eval_results(existing, new) -> list:
    """`existing` with each entry that `new` measures again (same task, dataset, split, metric) replaced, in place,
    and the rest of `new` appended. Both: `huggingface_hub.EvalResult`s or dicts of their arguments."""
    merged = list(_eval_results(existing))
    positions = {_key(r): i for i, r in enumerate(merged)}
    for r in _eval_results(new):
        if _key(r) in positions:
            merged[positions[_key(r)]] = r
        else:
            positions[_key(r)] = len(merged)
            merged.append(r)
    return merged


def _evaluation_section(results) -> str:
    # the same table as model_cards/pruned_model_card.md.j2 renders
    rows = "".join(f"| {r.task_type} | {r.dataset_name} | {r.metric_type} | {r.metric_value} |\n" for r in results)
    return "\n## Evaluation\n\n| Task | Dataset | Metric | Value |\n|---|---|---|---|\n" + rows


def _with_evaluation_table(text: str, results) -> str:
    section = _evaluation_section(results)
    if _EVAL_SECTION.search(text):
        return _EVAL_SECTION.sub(lambda _: section.rstrip("\n") + "\n", text, count=1)
    for heading in _INSERT_BEFORE:
        at = text.find(heading)
        if at >= 0:
            return text[:at] + section + text[at:]
    return text.rstrip("\n") + "\n" + section


def add_card_eval_results(directory: str | os.PathLike, results) -> list:
    """Adds `results` to the model-index of `directory/README.md` (created if missing) and writes it atomically.

    Args:
        directory: a saved checkpoint directory (hf_prune's or any other).
        results: `huggingface_hub.EvalResult`s or dicts of their arguments, e.g. from
            `hf_prune.evaluation.harness_card_entries`.

    Returns:
        `list[huggingface_hub.EvalResult]`: every result the card now holds.

    Only `README.md` is written. A README that hf_prune did not write keeps its text: only its YAML metadata changes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    new = _eval_results(results)  # validated before anything is read or written
    readme = directory / _README
    if readme.is_file():
        card = ModelCard.load(readme)
    else:
        card = ModelCard(f"---\n---\n\n# {directory.name}\n\nEvaluation results recorded by hf_prune.\n")
        card.data = ModelCardData()
    merged = merge_eval_results(card.data.eval_results or [], new)
    card.data.eval_results = merged
    if not card.data.model_name:  # huggingface_hub needs a model name to write a model-index
        card.data.model_name = directory.resolve().name
    if CARD_MARKER in card.text:
        card.text = _with_evaluation_table(card.text, merged)
    fd, tmp = tempfile.mkstemp(prefix=f".{_README}.", dir=directory)
    os.close(fd)
    try:
        card.save(tmp)
        os.chmod(tmp, readme.stat().st_mode & 0o777 if readme.is_file() else 0o666 & ~_umask())
        os.replace(tmp, readme)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return merged


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

