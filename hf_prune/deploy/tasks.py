"""Export tasks: which transformers head each one is, and how a checkpoint's architecture maps to one.

The task names are optimum's (`optimum-cli export onnx --task ...`), so a directory exported here says what an
`ORTModelFor*` class would expect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # the transformers Auto class that loads the checkpoint for this task
    ort_class: str  # optimum's ORTModel class for the exported directory
    suffixes: tuple[str, ...]  # architecture names (config.architectures) this task fits
    decoder: bool = False  # exported with a KV cache (past key values in, present out)


TASKS = {
    t.name: t
    for t in (
        Task("text-classification", "AutoModelForSequenceClassification", "ORTModelForSequenceClassification",
             ("ForSequenceClassification",)),
        Task("fill-mask", "AutoModelForMaskedLM", "ORTModelForMaskedLM", ("ForMaskedLM",)),
        Task("text-generation", "AutoModelForCausalLM", "ORTModelForCausalLM", ("ForCausalLM", "LMHeadModel"),
             decoder=True),
    )
}
TASK_CHOICES = ("auto", *TASKS)


def task_of_architecture(architecture: str) -> Task | None:
    for task in TASKS.values():
        if architecture.endswith(task.suffixes):
            return task
    return None


def resolve_task(task: str, architecture: str | None, where: str) -> Task:
    """The `Task` for `task` ("auto" or a name) and a checkpoint of `architecture`; clear errors if they do not fit.

    `where` names the model in the messages (its directory, or the in-memory model's class).
    """
    if task not in TASK_CHOICES:
        raise ValueError(f"task {task!r} is not supported; choose from {', '.join(TASK_CHOICES)}")
    found = task_of_architecture(architecture) if architecture else None
    if task == "auto":
        if found is None:
            raise ValueError(
                f"cannot infer the task of {where} (architecture {architecture!r}); the exporter handles "
                f"{', '.join(s for t in TASKS.values() for s in t.suffixes)} heads: pass --task explicitly only if "
                "the architecture has one of them"
            )
        return found
    chosen = TASKS[task]
    if found is not None and found is not chosen:
        raise ValueError(
            f"task {task!r} does not fit {where}: its architecture {architecture} is a {found.name!r} model "
            f"(use --task {found.name} or auto)"
        )
    if found is None and architecture is not None:
        raise ValueError(f"task {task!r} does not fit {where}: architecture {architecture!r} has no "
                         f"{'/'.join(chosen.suffixes)} head")
    return chosen
