"""Zero-/few-shot task accuracy of a (pruned) causal LM with EleutherAI's lm-evaluation-harness (`lm_eval`).

The checkpoint is loaded the hf_prune way (`import hf_prune`, then `AutoModelForCausalLM.from_pretrained`, so
compressed weights decode) and the loaded model object is handed to lm-eval's `HFLM` wrapper: lm-eval never loads
the files itself, so what it scores is exactly what users of the checkpoint get. Progress and the results table come
from lm-eval itself. Results can be recorded in the checkpoint's model card (model-index) next to the perplexity.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

EXTRA_HINT = "pip install 'hf_prune[eval]'"
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
# datasets' builders for local files: a task reading them has no Hub dataset id to name in the model-index
_LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            f"lm-eval evaluation needs the lm-evaluation-harness package (lm_eval), which is not installed: "
            f"{EXTRA_HINT}"
        ) from err
    return lm_eval


def _task_list(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names = [t.strip() for t in tasks or [] if isinstance(t, str) and t.strip()]
    if not names or len(names) != len(list(tasks)):
        raise ValueError(f"tasks must be a non-empty list of task names (or one comma-separated string), got {tasks!r}")
    return list(dict.fromkeys(names))


def _include_paths(include_path) -> list[Path]:
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"include_path {str(path)!r} is not a directory of lm-eval task YAML files")
    return [Path(p) for p in paths]


def _task_manager(include_paths: list[Path], tasks: list[str]):
    """lm-eval's task index over `include_paths` alone when it holds every task asked for (indexing lm-eval's own
    14,000 task files takes about 10 s), else over lm-eval's tasks and `include_paths`."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths]
    if paths:
        own = TaskManager(include_path=paths, include_defaults=False)
        # a group or tag may list lm-eval's own tasks, which only the full index resolves
        if all(t in own.all_tasks and t not in own.all_groups and t not in own.all_tags for t in tasks):
            return own
    return TaskManager(include_path=paths or None)


def _check_known(task_manager, tasks: list[str]) -> None:
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"unknown lm-eval task {', '.join(hints)}. Tasks are lm-eval's own (`lm-eval ls tasks`), hf_prune's local "
            f"ones ({', '.join(sorted(_local_tasks()))}) or YAML files in include_path"
        )


def _local_tasks() -> dict:
    from .local_tasks import LOCAL_TASKS

    return LOCAL_TASKS


def _load_checkpoint(directory: Path, dtype):
    import transformers

    import hf_prune.export  # noqa: F401  (registers the loader of compressed checkpoints)

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs), tokenizer


def evaluate_lm(
    model,
    tasks,
    *,
    tokenizer=None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    num_fewshot: int | None = None,
    include_path=None,
    device: str | None = None,
    dtype=None,
    write_card: bool = False,
    **simple_evaluate_kwargs,
) -> dict:
    """Runs lm-evaluation-harness tasks on a causal LM, loaded the hf_prune way when given as a directory.

    Needs the `eval` extra (`pip install 'hf_prune[eval]'`). Standard tasks (`hellaswag`, `arc_easy`, `piqa`, ...)
    download their data from the Hugging Face Hub; `"hf_prune_wiki_cloze"` (a last-word cloze on the held-out
    Wikipedia articles, see `hf_prune.evaluation.local_tasks`) and tasks in `include_path` that read local files need
    no network.

    Args:
        model (`str`, `os.PathLike` or `transformers.PreTrainedModel`):
            A checkpoint directory (an hf_prune export or any transformers checkpoint with its tokenizer), loaded with
            `AutoModelForCausalLM.from_pretrained` after `import hf_prune`, or a model already in memory.
        tasks (`list[str]` or `str`):
            lm-eval task or group names, or one comma-separated string.
        tokenizer (*optional*):
            Needed with an in-memory model; read from the directory otherwise.
        limit (`int` or `float`, *optional*):
            At most this many examples per task (a float < 1: that fraction). Recorded in the card as a split slice
            (`test[:20]`), since it is not the full task's score.
        batch_size (`int` or `"auto"`, *optional*, defaults to 1):
            lm-eval's batch size.
        num_fewshot (`int`, *optional*):
            Few-shot examples per prompt (default: each task's own setting, usually 0).
        include_path (`str`, `os.PathLike` or a list of them, *optional*):
            Directories of extra task YAML files (lm-eval's `--include_path`).
        device (`str`, *optional*):
            Where the model runs (default: `"cuda"` when available, else `"cpu"`). Ignored for an in-memory model,
            which is evaluated where it is.
        dtype (*optional*):
            `dtype` for `from_pretrained` (e.g. `"bfloat16"`); default: the checkpoint's.
        write_card (`bool`, *optional*, defaults to `False`):
            Record the results in the directory's model card (model-index and Evaluation table). Only `README.md`
            is rewritten (atomically); weights and config stay as they are.
        simple_evaluate_kwargs:
            Passed on to `lm_eval.simple_evaluate` (`gen_kwargs`, `apply_chat_template`, `log_samples`, ...).

    Returns:
        `dict`: lm-eval's results (`results[task]["acc,none"]`, `n-samples`, `configs`, ...); `samples` only with
        `log_samples=True`. [`harness_card_entries`] turns it into model-index entries for
        `save_pretrained(eval_results=...)`.

    Raises:
        `ImportError`: lm_eval is not installed. `ValueError`: unknown task names or bad arguments;
        `FileNotFoundError`: a missing checkpoint or include directory. All before any model is loaded.
    """
    lm_eval = _require_lm_eval()
    names = _task_list(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ValueError(f"limit must be a positive number of examples (or a fraction < 1), got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    directory = None
    if isinstance(model, (str, os.PathLike)):
        directory = Path(model)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no config.json: not a transformers checkpoint directory")
    else:
        if write_card:
            raise ValueError("write_card=True needs a checkpoint directory; for a model in memory pass "
                             "harness_card_entries(results) to save_pretrained(eval_results=...)")
        if tokenizer is None:
            raise ValueError("evaluate_lm with a model in memory needs its tokenizer=")

    paths = _include_paths(include_path)
    local = _local_tasks()
    wanted_local = [t for t in names if t in local]
    if wanted_local and paths:  # a task of the same name in include_path wins
        from lm_eval.tasks import TaskManager

        user_tasks = set(TaskManager(include_path=[str(p) for p in paths], include_defaults=False).all_tasks)
        wanted_local = [t for t in wanted_local if t not in user_tasks]
    if wanted_local:  # written into the cache on first use, then found like any include_path task
        from ..assets import cache_dir

        local_dir = cache_dir() / "lm_eval_tasks"
        for name in wanted_local:
            local[name](local_dir)
        paths.append(local_dir)
    task_manager = _task_manager(paths, names)
    _check_known(task_manager, names)

    if directory is not None:
        import torch

        model, tokenizer = _load_checkpoint(directory, dtype)
        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a bos_token nor an eos_token; lm-eval scores a continuation of "
                         "an empty context after one of them (set tokenizer.eos_token)")
    model.eval()

    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    simple_evaluate_kwargs.setdefault("log_samples", False)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager, **simple_evaluate_kwargs)
    if results is None:  # a non-zero rank under lm-eval's own distributed launch
        return {}
    if write_card:
        from ..export.card_results import add_card_eval_results

        add_card_eval_results(directory, harness_card_entries(results))
    return results


def harness_card_entries(results: dict) -> list[dict]:
    """Model-index entries (`huggingface_hub.EvalResult` arguments) for every task metric in lm-eval `results`.

    One entry per task and metric (`acc`, `acc_norm`, `perplexity`, ...; standard errors left out). The dataset is
    the task's Hub dataset id, or the task name for local files; a `limit` shows as a split slice (`test[:20]`), and
    few-shot counts as `dataset_args={"num_few_shot": k}`.
    """
    entries = []
    for task, metrics in results.get("results", {}).items():
        config = results.get("configs", {}).get(task, {})
        path = config.get("dataset_path")
        split = config.get("test_split") or config.get("validation_split")
        counts = results.get("n-samples", {}).get(task, {})
        if split and counts.get("effective") is not None and counts["effective"] < counts.get("original", 0):
            split = f"{split}[:{counts['effective']}]"
        shots = results.get("n-shot", {}).get(task)
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            entries.append(dict(
                task_type="text-generation",
                task_name=task,
                dataset_type=path if path and path not in _LOCAL_BUILDERS else task,
                dataset_name=task,
                dataset_config=config.get("dataset_name"),
                dataset_split=split,
                dataset_args={"num_few_shot": shots} if shots else None,
                metric_type=metric,
                metric_value=round(float(value), 4),
                metric_config=None if filter_name == "none" else filter_name,
                source_name="lm-evaluation-harness",
                source_url=LM_EVAL_URL,
            ))
    return entries
