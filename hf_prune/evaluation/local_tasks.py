"""lm-evaluation-harness tasks built from local files, for machines that cannot reach the Hugging Face Hub.

Standard lm-eval tasks download their data from the Hub. The tasks here are written as an ordinary task YAML with
`dataset_path: json` and `dataset_kwargs: {data_files: ...}` pointing at a JSONL file next to it, so lm-eval reads
them from disk with its usual code path; a directory of them is passed to lm-eval as an `include_path`.

`hf_prune_wiki_cloze` is a last-word cloze in the LAMBADA format (predict the final word of a passage from the words
before it; `acc` is 1 when the word is the model's greedy continuation) built from the **held-out** Wikipedia
articles of [`hf_prune.assets.wikipedia_split`] (never the calibration ones). Unlike LAMBADA, passages are not
filtered by humans for needing the broad context: it is a cheap, honest language-modelling probe, not a LAMBADA score.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

WIKI_CLOZE_TASK = "hf_prune_wiki_cloze"
WIKI_CLOZE_VERSION = 1

_MARKUP = re.compile(r"'{2,}")  # ''italic'' and '''bold''' left in by gensim's filter_wiki
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z][A-Za-z-]*[A-Za-z])\.$", re.DOTALL)


def wiki_cloze_rows(articles, *, min_words: int = 40, max_context_words: int = 150) -> list[dict]:
    """Cloze examples from `(title, text)` articles: one per paragraph that ends in `... word.`.

    Args:
        articles: `(title, plain text)` pairs, e.g. the evaluation side of `hf_prune.assets.split_articles`.
        min_words: paragraphs with fewer words are skipped (too little context to predict from).
        max_context_words: the context keeps at most this many words before the target (the paragraph's tail).

    Returns:
        `list[dict]`: `{"title", "context", "target"}` rows in article order. `target` is the paragraph's last word
        (letters and inner hyphens only, at least two letters, its final full stop dropped); `context` is the text
        before it, whitespace collapsed, without a trailing space (the task YAML puts one space between them).
    """
    rows = []
    for title, text in articles:
        for paragraph in text.split("\n"):
            words = _MARKUP.sub("", paragraph).split()
            if len(words) < min_words:
                continue
            match = _LAST_WORD.match(" ".join(words))
            if match is None:
                continue
            context = " ".join(match.group(1).split()[-max_context_words:])
            rows.append({"title": title, "context": context, "target": match.group(2)})
    return rows


def _task_yaml(task: str, data_file: Path) -> str:
    # JSON strings are valid YAML scalars: paths with spaces or colons need no escaping of our own
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data_file))}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\n'
        # the space goes into the target, as in lm-eval's own lambada_openai.yaml (the continuation is " word")
        "doc_to_target: \"{{' ' + target}}\"\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        f"metadata:\n  version: {WIKI_CLOZE_VERSION}\n"
    )


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_local_task(directory: str | os.PathLike, task: str, rows: list[dict]) -> Path:
    """Writes `rows` (dicts with `context` and `target`) as the lm-eval task `task` into `directory`.

    The task is a last-word cloze: `acc` (is the target the greedy continuation of the context) and `perplexity`
    of the target. Files: `{task}.jsonl` and `{task}.yaml`, each written atomically.

    Returns:
        `pathlib.Path`: `directory`, ready for `lm_eval.tasks.TaskManager(include_path=...)`.
    """
    if not re.fullmatch(r"[A-Za-z0-9_]+", task):
        raise ValueError(f"task name {task!r} may hold only letters, digits and underscores")
    if not rows:
        raise ValueError(f"task {task!r} has no examples")
    for i, row in enumerate(rows):
        if not isinstance(row.get("context"), str) or not isinstance(row.get("target"), str) or not row["target"]:
            raise ValueError(f"task {task!r} row {i}: needs a 'context' string and a non-empty 'target' string")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data_file = (directory / f"{task}.jsonl").resolve()
    _write_atomic(data_file, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write_atomic(directory / f"{task}.yaml", _task_yaml(task, data_file))
    return directory


def write_wiki_cloze(directory: str | os.PathLike | None = None) -> Path:
    """Writes the `hf_prune_wiki_cloze` lm-eval task (YAML + JSONL) built from the held-out Wikipedia articles.

    Args:
        directory: where to write; default `hf_prune.assets.cache_dir() / "lm_eval_tasks"`.

    Returns:
        `pathlib.Path`: the directory, to pass as `include_path` (`hf-prune eval --include-path`). Reused when it
        already holds this version's files. Calling
        [`hf_prune.evaluate_lm`] with `tasks=["hf_prune_wiki_cloze"]` does this by itself.
    """
    from ..assets import cache_dir, split_articles, wikipedia_articles

    directory = Path(directory) if directory is not None else cache_dir() / "lm_eval_tasks"
    data_file, task_file = (directory / f"{WIKI_CLOZE_TASK}.jsonl").resolve(), directory / f"{WIKI_CLOZE_TASK}.yaml"
    if data_file.is_file() and task_file.is_file() and task_file.read_text() == _task_yaml(WIKI_CLOZE_TASK, data_file):
        return directory  # written before by this version (the YAML is written last, so the data is complete)
    _, held_out = split_articles(wikipedia_articles())  # the same split as wikipedia_split(): never calibration text
    return write_local_task(directory, WIKI_CLOZE_TASK, wiki_cloze_rows(held_out))


# task name -> writer(directory) for the tasks evaluate_lm can build by itself when asked for them
LOCAL_TASKS = {WIKI_CLOZE_TASK: write_wiki_cloze}
