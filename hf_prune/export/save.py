"""Atomic compressed save, and the per-model `save_pretrained` / `push_to_hub` that route through it.

[`enable_compressed_save`] is called for every pruned model (by `set_pruning_state`, and by the quantizer after
`from_pretrained`). It attaches the hf_prune quantizer (so transformers' own `save_pretrained` machinery writes the
compressed tensors and `quantization_config`) and sets two *instance* attributes, `save_pretrained` and
`push_to_hub`, that wrap the class methods with what transformers does not do: an atomic write, the overwrite check,
and our model card (transformers' `push_to_hub` would otherwise replace it with a generic one). The class and
transformers itself are not patched; other models are untouched. The two attributes are [`_InstanceMethod`]s, bound
methods that pickle, so `pickle`, `copy.deepcopy` and `torch.save(model)` copies keep the compressed save.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..output_dir import atomic_output_dir, check_output
from ..state import PruningState, get_pruning_state, get_training_record, register_export_hook
from .codecs import META_SUFFIX
from .export_config import compressed_state_dict, export_config_for, state_from_dict, state_to_dict  # noqa: F401
from .hub import DEFAULT_TIMEOUT
from .quantizer import disable_compressed_save, register_enable_save

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Files an export writes; their presence means "this directory already holds a model".
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_EXPORT_FILES = ("config.json", "generation_config.json", "hf_prune_manifest.json")
_README = "README.md"


# ------------------------------------------------------------------------------------------- attach / detach
def enable_compressed_save(model, state: PruningState | None = None, *, quantizer=None, format: str | None = None):
    """Makes `model.save_pretrained` / `model.push_to_hub` write the compressed hf_prune export with its card.

    Called for you by `set_pruning_state` and after `from_pretrained` of a compressed checkpoint. Idempotent.
    """
    from .quantizer import HfPruneQuantizer

    if quantizer is None:
        qconfig = export_config_for(model, state, format)
        quantizer = HfPruneQuantizer(qconfig, pre_quantized=True)
    elif get_pruning_state(model) is None and quantizer.quantization_config.pruning:
        restored = state_from_dict(quantizer.quantization_config.pruning)
        if restored is not None:
            from ..state import _ATTR

            setattr(model, _ATTR, restored)  # not set_pruning_state: that would call back into here
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model.save_pretrained = _InstanceMethod(_save_pretrained, model)
    model.push_to_hub = _InstanceMethod(_push_to_hub, model)
    from ..peft.loading import watch_adapter_loads  # saved masked adapters reload masked (no peft import here)

    watch_adapter_loads(model)
    return model


def _export_pruned_model(model, state: PruningState) -> None:
    """What `set_pruning_state` calls (registered below): a pruned transformers model saves (and pushes) in the
    compressed format with its model card."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        enable_compressed_save(model, state)


# The state and the quantizer are below this module: they call it through these registration points.
register_export_hook(_export_pruned_model)
register_enable_save(enable_compressed_save)


class _InstanceMethod:
    """A method bound to one model instance that survives `pickle` / `copy.deepcopy` / `torch.save(model)`.

    `types.MethodType` pickles as `getattr(model, func.__name__)`, a name the model class does not have, so a pickled
    pruned model failed to load. This pickles the module-level function by reference and the model through pickle's
    memo (the copy's method is bound to the copy, not to the original).
    """

    __slots__ = ("__func__", "__self__")

    def __init__(self, func, obj):
        self.__func__ = func
        self.__self__ = obj

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return (_InstanceMethod, (self.__func__, self.__self__))

    @property
    def __doc__(self):
        return self.__func__.__doc__

    @property
    def __name__(self):
        return self.__func__.__name__.lstrip("_")

    @property
    def __signature__(self):  # what `inspect.signature` (and so `help`) shows: the function's, without `self`
        sig = inspect.signature(self.__func__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __repr__(self):
        return f"<hf_prune compressed {self.__name__} of {type(self.__self__).__name__}>"


# ------------------------------------------------------------------------------------------------ atomic save
def _is_model_file(name: str) -> bool:
    return name in _EXPORT_FILES or name.endswith(_MODEL_FILE_SUFFIXES)


def _holds_model(directory: Path) -> list[str]:
    """What makes `directory` hold a model (`conflicts` of the save protocol), named in the "exists" error."""
    names = sorted(p.name for p in directory.iterdir() if _is_model_file(p.name))
    return [f"a model ({', '.join(names)})"] if names else []


def _is_our_card(path: Path) -> bool:
    from .card import CARD_MARKER

    try:
        return CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_can_write(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """The resolved target directory of an export (a symlink is followed), refused before any work if it is a file,
    a dangling link, or already holds a model (without `overwrite`)."""
    return check_output(save_directory, overwrite, conflicts=_holds_model, what="save_directory")


def save_pruned(
    model,
    save_directory: str | os.PathLike,
    *,
    overwrite: bool = False,
    dense: bool = False,
    model_card: bool = True,
    replace_readme: bool = False,
    eval_results: list | None = None,
    repo_id: str | None = None,
    tags: list[str] | None = None,
    tokenizer=None,
    is_main_process: bool = True,
    **save_kwargs,
) -> Path:
    """Writes a pruned model atomically: compressed safetensors, `config.json`, the model card (and the tokenizer).

    Args:
        model: a model pruned by hf_prune (it carries a `PruningState`) or loaded from a compressed export, or a
            plain model that `hf_prune.distill` trained (saved dense, with its own config and a card of the run).
        save_directory: output directory (a symlink to a directory is saved into, the link kept). If it exists and
            already holds a model (`config.json` or weight files), saving is an error unless `overwrite=True`;
            other content (your README, tokenizer files, Trainer checkpoints) is left in place.
        overwrite: replace an existing model in `save_directory`.
        dense: write ordinary dense safetensors (zeros included) without `quantization_config`, for runtimes that
            cannot read the compressed format. The card is still written.
        model_card: write `README.md` from `model_cards/`.
        replace_readme: replace a `README.md` that hf_prune did not write (kept by default).
        eval_results: evaluation results for the card's model-index: `huggingface_hub.EvalResult`s or dicts of
            their arguments (`task_type`, `dataset_type`, `dataset_name`, `metric_type`, `metric_value`, ...).
        repo_id: the Hub repository the card's usage snippet names (default: the directory name).
        tags: extra tags for the card.
        tokenizer: a tokenizer (or processor) to save with the model, in the same atomic write.
        is_main_process: only the main process writes (as in `save_pretrained`).
        save_kwargs: `max_shard_size` (bytes or `"200MB"`; default: transformers' `save_pretrained` default):
            bigger exports are written as `model-0000i-of-0000N.safetensors` shards with the standard
            `model.safetensors.index.json`, each compressed weight in the same shard as its companions. With
            `dense=True`, any argument of transformers' `save_pretrained`.

    Everything is written to a hidden build directory, verified, and then moved into place by the save protocol of
    `hf_prune.output_dir` (the guarantees, including a target under a read-only parent, are listed there): the
    target holds the complete old export, the complete new one, or nothing, never a mix; a full disk raises
    `OutputWriteError` and leaves the target as it was. Files and directories get the usual permissions (umask).
    """
    if not is_main_process:
        return Path(save_directory)
    if save_kwargs.pop("safe_serialization", True) is False:
        raise ValueError("hf_prune writes safetensors only; safe_serialization=False is not supported")
    if save_kwargs.pop("push_to_hub", False):
        raise ValueError("Use model.push_to_hub(repo_id) or hf_prune.push_pruned(directory, repo_id) to upload")
    if get_pruning_state(model) is None and get_training_record(model):
        dense = True  # a plain model trained by hf_prune (e.g. distilled): its own config, ordinary safetensors
    if not dense:
        check_compressed_save_kwargs(save_kwargs)
    target = check_can_write(save_directory, overwrite)
    user_readme = target / _README
    keep_user_readme = user_readme.is_file() and not _is_our_card(user_readme) and not replace_readme
    keep = export_keeps(keep_readme=keep_user_readme or not model_card)
    with atomic_output_dir(save_directory, overwrite=overwrite, conflicts=_holds_model, keep=keep,
                           what="save_directory") as tmp:
        report = _write_export(model, tmp, dense=dense, save_kwargs=save_kwargs)
        if model_card:
            if keep_user_readme:
                logger.warning(
                    "hf_prune: keeping your %s; pass replace_readme=True to write the hf_prune model card", user_readme
                )
            else:
                from .card import build_model_card

                card = build_model_card(
                    model, tmp, report=report, eval_results=eval_results, dense=dense,
                    repo_id=repo_id or Path(save_directory).name, tags=tags,
                )
                card.save(tmp / _README)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(save_directory)


def export_keeps(*, keep_readme: bool):
    """Which entries of an existing directory a model export leaves in place: everything but the old export's
    files (and the old README unless `keep_readme`)."""

    def keep(entry: Path) -> bool:
        return not _is_model_file(entry.name) and (keep_readme or entry.name != _README)

    return keep


def _write_export(model, directory: Path, *, dense: bool, save_kwargs: dict):
    """Writes the export into `directory`: dense through transformers' own `save_pretrained` (the class method, not
    our wrapper), compressed through [`write_compressed_export`]."""
    cls_save = type(model).save_pretrained
    if dense:
        saved = (model.__dict__.get("hf_quantizer"), getattr(model.config, "quantization_config", None))
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        try:
            cls_save(model, directory, **save_kwargs)
        finally:
            model.hf_quantizer = saved[0]
            if saved[1] is not None:
                model.config.quantization_config = saved[1]
        return None
    from .quantizer import HfPruneQuantizer

    qconfig = export_config_for(model)  # refreshed from the current PruningState
    if not isinstance(getattr(model, "hf_quantizer", None), HfPruneQuantizer):
        enable_compressed_save(model)
    model.hf_quantizer.quantization_config = qconfig
    model.hf_quantizer.last_report = None
    model.config.quantization_config = qconfig
    files, report = write_compressed_export(model, directory, qconfig, **save_kwargs)
    model.hf_quantizer.last_report = report
    from .integrity import verify_checksums

    # Read back what was written (from the page cache): an export that would not load is never moved into place.
    verify_checksums(files, required=True)
    return report


# Arguments of transformers' `save_pretrained` that a compressed save accepts and has nothing to do with.
_IGNORED_SAVE_KWARGS = ("token", "save_peft_format")


def check_compressed_save_kwargs(save_kwargs: dict) -> None:
    """Refuses, before anything is written, what a compressed save cannot honour (a bad `max_shard_size`, an
    argument of transformers' `save_pretrained` that has no meaning here)."""
    from .shards import shard_size_bytes

    unsupported = sorted(k for k in save_kwargs if k not in ("max_shard_size", "save_original_format", *_IGNORED_SAVE_KWARGS))
    if unsupported:
        raise TypeError(
            f"save_pretrained of an hf_prune model got unsupported argument(s) {unsupported}; a compressed save "
            "takes max_shard_size and save_original_format (dense=True saves through transformers with all of its "
            "arguments)"
        )
    shard_size_bytes(save_kwargs.get("max_shard_size"))


def write_compressed_export(model, directory: Path, qconfig=None, *, max_shard_size: int | str | None = None,
                            save_original_format: bool = True, **others) -> tuple[list[Path], object]:
    """Writes `config.json`, `generation_config.json` and the compressed weights of `model` into `directory`.

    What transformers' `save_pretrained` writes, but the weights go through [`ShardWriter`] so that a compressed
    weight and its companions always share a shard (transformers' splitter works tensor by tensor). Not atomic:
    [`save_pruned`] calls it on a temporary directory. Returns the weight files and the `CompressionReport`.
    """
    from transformers.modeling_utils import unwrap_model

    from ..version import __version__
    from .quantizer import FORMAT_VERSION
    from .shards import ShardWriter, default_max_shard_size

    from .integrity import new_export_id

    check_compressed_save_kwargs({"max_shard_size": max_shard_size, **others})
    qconfig = qconfig or export_config_for(model)
    # Format version 3: one fresh id for config.json, every shard and the manifest, checked on load.
    qconfig.format_version, qconfig.export_id = FORMAT_VERSION, new_export_id()
    model_to_save = unwrap_model(model)
    write_model_config(model_to_save, directory)
    state_dict, report = compressed_state_dict(model_to_save, qconfig)
    for key in model_to_save._keys_to_ignore_on_save or ():
        state_dict.pop(key, None)
    if save_original_format:
        state_dict = _revert_weight_conversion(model_to_save, state_dict)
    writer = ShardWriter(
        directory,
        max_shard_size=default_max_shard_size() if max_shard_size is None else max_shard_size,
        metadata={"hf_prune_format": qconfig.format, "hf_prune_version": __version__},
        export_id=qconfig.export_id,
    )
    writer.add(state_dict)
    del state_dict
    files = writer.close(total_parameters=model_to_save.num_parameters())
    return files, report


def write_model_config(model, directory: Path, *, export_id: str | None = None,
                       dtype: torch.dtype | None = None) -> None:
    """`config.json` (with the `quantization_config` the model carries), `generation_config.json` and remote code,
    as transformers' `save_pretrained` writes them: what a streamed export writes beside its shards (pass the
    `ShardWriter`'s `export_id`, which config.json must carry, and the `dtype` its weights are written in when
    that is not the model's)."""
    from transformers.dynamic_module_utils import custom_object_save

    if export_id is not None:
        model.config.quantization_config.export_id = export_id

    model.config.dtype = str(dtype or model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if model.is_remote_code():
        custom_object_save(model, directory, config=model.config)
    model.config.save_pretrained(directory)
    if model.can_generate():
        model.generation_config.save_pretrained(directory)


def _revert_weight_conversion(model, state_dict: dict) -> dict:
    """transformers' `revert_weight_conversion` (renames back to the checkpoint's original key names), skipped when
    the model has no conversion: transformers would rebuild every key for nothing (about 1 ms per key)."""
    from transformers.core_model_loading import revert_weight_conversion

    if getattr(model, "_weight_conversions", None) == []:
        return state_dict
    return revert_weight_conversion(model, state_dict)


# --------------------------------------------------------------------------------- per-instance entry points
def _save_pretrained(self, save_directory, *, overwrite: bool = False, dense: bool = False, **kwargs):
    """`save_pretrained` of a pruned model: see [`save_pruned`] (same arguments)."""
    if kwargs.pop("push_to_hub", False):
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "private", "commit_message", "create_pr", "revision", "timeout") if k in kwargs}
        path = save_pruned(self, save_directory, overwrite=overwrite, dense=dense, **kwargs)
        from .hub import push_pruned

        push_pruned(path, repo_id, **hub_kwargs)
        return path
    state_dict = kwargs.pop("state_dict", None)
    if state_dict is not None and set(state_dict) != set(self.state_dict()):
        # Trainer passes `model.state_dict()` here; anything else (a partial or renamed dict) cannot be honoured.
        raise ValueError(
            "save_pretrained(state_dict=...) with a custom state dict is not supported for hf_prune models: the "
            "compressed export is built from the model's own weights. Call "
            "hf_prune.export.disable_compressed_save(model) first to save it the plain transformers way."
        )
    return save_pruned(self, save_directory, overwrite=overwrite, dense=dense, **kwargs)


def _push_to_hub(
    self,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = None,
    tags: list[str] | None = None,
    eval_results: list | None = None,
    dense: bool = False,
    timeout: float | None = DEFAULT_TIMEOUT,
):
    """Uploads the compressed export and the hf_prune model card (the same files `save_pretrained` writes; sharded
    with the standard index when bigger than `max_shard_size`, transformers' default when `None`). `timeout`: seconds
    one request may go without progress before the push fails with `PushError` (`None`: no limit)."""
    from .hub import PushError, check_timeout, push_pruned

    check_timeout(timeout)
    with tempfile.TemporaryDirectory(prefix="hf_prune-push-") as tmp:
        path = save_pruned(
            self,
            Path(tmp) / "export",
            dense=dense,
            eval_results=eval_results,
            repo_id=repo_id,
            tags=tags,
            **({} if max_shard_size is None else {"max_shard_size": max_shard_size}),
        )
        try:
            return push_pruned(
                path,
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                timeout=timeout,
            )
        except PushError as err:  # its message names the temporary export, which is deleted on the way out
            raise PushError(
                f"Pushing to {err.repo_id!r} failed while {err.step}: {err.cause}. The export was built in a "
                "temporary directory, now deleted; the model in memory is unchanged: retry "
                f"model.push_to_hub({repo_id!r}), or save it with model.save_pretrained(DIR) and push that with "
                f"hf_prune.push_pruned(DIR, {repo_id!r}) (a retry is safe: the repository is created only if missing).",
                step=err.step, repo_id=err.repo_id, cause=err.cause,
            ) from err.__cause__


__all__ = [
    "compressed_state_dict",
    "disable_compressed_save",
    "enable_compressed_save",
    "save_pruned",
    "META_SUFFIX",
]
