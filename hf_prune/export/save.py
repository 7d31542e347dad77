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

import ctypes
import errno
import glob
import inspect
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..state import PruningState, get_pruning_state
from .codecs import META_SUFFIX

logger = logging.getLogger(__name__)

# Files an export writes; their presence means "this directory already holds a model".
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
_EXPORT_FILES = ("config.json", "generation_config.json")
_README = "README.md"


# ---------------------------------------------------------------------------------------------- state <-> JSON
def state_to_dict(state: PruningState) -> dict:
    return {
        "config": state.config.to_dict(),
        "layout": state.layout,
        "module_sparsity": {k: float(v) for k, v in state.module_sparsity.items()},
        "metrics": _jsonable(state.metrics),
        "base_model": state.base_model,
        "command": state.command,
        **({"history": _jsonable(state.history)} if state.history else {}),  # absent for a model pruned once
    }


def state_from_dict(data: dict) -> PruningState | None:
    """Rebuilds the `PruningState`; `None` (with a warning) when the method's config class is not registered."""
    from ..config import PruningConfig

    try:
        config = PruningConfig.from_dict(data["config"])
    except (KeyError, ValueError, TypeError) as err:
        logger.warning("hf_prune: could not rebuild the pruning config from the checkpoint (%s)", err)
        return None
    return PruningState(
        config=config,
        layout=data.get("layout", "unstructured"),
        module_sparsity=dict(data.get("module_sparsity") or {}),
        metrics=dict(data.get("metrics") or {}),
        base_model=data.get("base_model"),
        command=data.get("command"),
        history=[r for r in data["history"] if isinstance(r, dict)] if isinstance(data.get("history"), list) else [],
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ------------------------------------------------------------------------------------------- attach / detach
def export_config_for(model, state: PruningState | None = None, format: str | None = None):
    """The `HfPruneExportConfig` describing `model` now (refreshed from its current `PruningState`)."""
    from .formats import get_export_format
    from .quantizer import FORMAT_VERSION, HfPruneExportConfig

    state = state or get_pruning_state(model)
    current = getattr(model.config, "quantization_config", None)
    current = current if isinstance(current, HfPruneExportConfig) else None
    if state is None:
        if current is None:
            raise ValueError("This model has no hf_prune PruningState; prune it with hf_prune first")
        current.format_version = FORMAT_VERSION  # what a save writes now, whatever version it was read from
        return current
    fmt_name = format or state.metrics.get("export_format") or (current.format if current else None)
    fmt_name = fmt_name or ("structured" if state.layout == "structured" and _has_format("structured") else "sparse")
    fmt = get_export_format(fmt_name)
    return HfPruneExportConfig(
        format=fmt_name, layout=state.layout, format_config=fmt.format_config(model, state), pruning=state_to_dict(state)
    )


def _has_format(name: str) -> bool:
    from .formats import _FORMATS

    return name in _FORMATS


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


def disable_compressed_save(model) -> None:
    """Back to plain transformers behaviour (dense saves). `model.dequantize()` calls this."""
    for attr in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(attr, None)


def compressed_state_dict(model, qconfig=None):
    """The tensors a compressed save writes, and a [`CompressionReport`]. Tied duplicates are dropped first."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from .formats import get_export_format

    qconfig = qconfig or export_config_for(model)
    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return get_export_format(qconfig.format).compress_state_dict(model, state_dict, qconfig)


# ------------------------------------------------------------------------------------------------ atomic save
def _holds_model(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name in _EXPORT_FILES or p.name.endswith(_MODEL_FILE_SUFFIXES)
    )


def _is_our_card(path: Path) -> bool:
    from .card import CARD_MARKER

    try:
        return CARD_MARKER in path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def check_can_write(save_directory: str | os.PathLike, overwrite: bool) -> Path:
    """The target directory of an export, refused (before any work) if it is a file or already holds a model."""
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"save_directory {str(target)!r} exists and is not a directory")
    if target.is_dir() and not overwrite:
        existing = _holds_model(target)
        if existing:
            raise FileExistsError(
                f"{str(target)!r} already holds a model ({', '.join(existing)}); pass overwrite=True to replace it "
                "or choose another directory"
            )
    return target


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
    is_main_process: bool = True,
    **save_kwargs,
) -> Path:
    """Writes a pruned model atomically: compressed safetensors, `config.json`, and the model card.

    Args:
        model: a model pruned by hf_prune (it carries a `PruningState`) or loaded from a compressed export.
        save_directory: output directory. If it exists and already holds a model (`config.json` or weight files),
            saving is an error unless `overwrite=True`; other content (your README, tokenizer files, Trainer
            checkpoints) is left in place.
        overwrite: replace an existing model in `save_directory`.
        dense: write ordinary dense safetensors (zeros included) without `quantization_config`, for runtimes that
            cannot read the compressed format. The card is still written.
        model_card: write `README.md` from `model_cards/`.
        replace_readme: replace a `README.md` that hf_prune did not write (kept by default).
        eval_results: evaluation results for the card's model-index: `huggingface_hub.EvalResult`s or dicts of
            their arguments (`task_type`, `dataset_type`, `dataset_name`, `metric_type`, `metric_value`, ...).
        repo_id: the Hub repository the card's usage snippet names (default: the directory name).
        tags: extra tags for the card.
        is_main_process: only the main process writes (as in `save_pretrained`).
        save_kwargs: `max_shard_size` (bytes or `"200MB"`; default: transformers' `save_pretrained` default):
            bigger exports are written as `model-0000i-of-0000N.safetensors` shards with the standard
            `model.safetensors.index.json`, each compressed weight in the same shard as its companions. With
            `dense=True`, any argument of transformers' `save_pretrained`.

    The files are written to a hidden temporary directory next to `save_directory`, verified, and then swapped in
    whole: at any moment (a crash or `kill -9` included) `save_directory` holds the complete old export, the complete
    new one, or nothing, never a mix. Hidden temporary directories that an interrupted save of the same target left
    behind are removed by the next save. Files and directories get the usual permissions (umask), as with
    transformers.
    """
    if not is_main_process:
        return Path(save_directory)
    if save_kwargs.pop("safe_serialization", True) is False:
        raise ValueError("hf_prune writes safetensors only; safe_serialization=False is not supported")
    if save_kwargs.pop("push_to_hub", False):
        raise ValueError("Use model.push_to_hub(repo_id) or hf_prune.push_pruned(directory, repo_id) to upload")
    if not dense:
        check_compressed_save_kwargs(save_kwargs)
    target = check_can_write(save_directory, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    try:
        report = _write_export(model, tmp, dense=dense, save_kwargs=save_kwargs)
        user_readme = target / _README
        keep_user_readme = user_readme.is_file() and not _is_our_card(user_readme) and not replace_readme
        if model_card:
            if keep_user_readme:
                logger.warning(
                    "hf_prune: keeping your %s; pass replace_readme=True to write the hf_prune model card", user_readme
                )
            else:
                from .card import build_model_card

                card = build_model_card(
                    model, tmp, report=report, eval_results=eval_results, dense=dense,
                    repo_id=repo_id or target.name, tags=tags,
                )
                card.save(tmp / _README)
        _apply_umask(tmp)
        _move_into_place(tmp, target, keep_readme=keep_user_readme or not model_card)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
    from .shards import ShardWriter, default_max_shard_size

    check_compressed_save_kwargs({"max_shard_size": max_shard_size, **others})
    qconfig = qconfig or export_config_for(model)
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
    )
    writer.add(state_dict)
    del state_dict
    files = writer.close(total_parameters=model_to_save.num_parameters())
    return files, report


def write_model_config(model, directory: Path) -> None:
    """`config.json` (with the `quantization_config` the model carries), `generation_config.json` and remote code,
    as transformers' `save_pretrained` writes them: what a streamed export writes beside its shards."""
    from transformers.dynamic_module_utils import custom_object_save

    model.config.dtype = str(model.dtype).split(".")[1]
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


def _move_into_place(tmp: Path, target: Path, *, keep_readme: bool) -> None:
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)  # atomic on POSIX: the directory appears complete or not at all
        return
    # Non-empty directory: the new directory gets the user's other files too (hard links: no copy of Trainer
    # checkpoints), then the two directories are swapped, so the old export stays whole until the new one is in.
    new_names = sorted(p.name for p in tmp.iterdir())
    replaced = set(_holds_model(target)) | set(new_names)
    if not keep_readme:
        replaced.add(_README)
    for entry in target.iterdir():
        if entry.name not in replaced:
            _link_into(entry, tmp / entry.name)
    if _exchange(tmp, target):  # target now holds the new export, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    aside = target.parent / f"{_temp_prefix(target)}{os.getpid()}-old"
    try:
        os.rename(target, aside)
    except OSError:  # e.g. target is a mount point: fall back to replacing the files in place
        _replace_files(tmp, target, new_names, keep_readme=keep_readme)
        return
    os.rename(tmp, target)
    shutil.rmtree(aside, ignore_errors=True)


def _replace_files(tmp: Path, target: Path, new_names: list[str], *, keep_readme: bool) -> None:
    """In-place replacement where the directory itself cannot be renamed (the only case that is not atomic): the
    old export is taken down first (config.json first, so it stops looking complete), then the new files move in
    with config.json last."""
    for name in ["config.json", *(n for n in _holds_model(target) if n != "config.json")]:
        (target / name).unlink(missing_ok=True)
    if not keep_readme:
        (target / _README).unlink(missing_ok=True)
    for name in [n for n in new_names if n != "config.json"] + ["config.json"]:
        os.replace(tmp / name, target / name)


def _link_into(src: Path, dst: Path) -> None:
    """Hard-links `src` (a file or a whole tree) at `dst`; copies where the filesystem has no hard links."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two directories (Linux `renameat2(RENAME_EXCHANGE)`); `False` where that is unavailable.

    Neither `os` nor any library exposes the exchange, so it is called through ctypes; everywhere else the caller
    falls back to two renames (the target is briefly absent, never mixed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


# --------------------------------------------------------------------------------------- interrupted saves
def _temp_prefix(target: Path) -> str:
    return f".{target.name}.hf_prune-tmp-"


def _remove_stale_temporaries(target: Path) -> None:
    """Deletes what an interrupted save of `target` left beside it: `.NAME.hf_prune-tmp-<pid>-*` directories of
    processes that no longer run (names without a pid come from older hf_prune versions, also stale)."""
    prefix = _temp_prefix(target)
    for path in target.parent.glob(f"{glob.escape(prefix)}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue  # another process is saving to the same target right now
        logger.info("hf_prune: removing %s, left by an interrupted save", path)
        shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _apply_umask(directory: Path) -> None:
    """The modes a plain `open()` would give (safetensors writes its files 0600)."""
    mask = _umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------- per-instance entry points
def _save_pretrained(self, save_directory, *, overwrite: bool = False, dense: bool = False, **kwargs):
    """`save_pretrained` of a pruned model: see [`save_pruned`] (same arguments)."""
    if kwargs.pop("push_to_hub", False):
        repo_id = kwargs.pop("repo_id", Path(save_directory).name)
        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "private", "commit_message", "create_pr", "revision") if k in kwargs}
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
):
    """Uploads the compressed export and the hf_prune model card (the same files `save_pretrained` writes; sharded
    with the standard index when bigger than `max_shard_size`, transformers' default when `None`)."""
    from .hub import push_pruned

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
        return push_pruned(
            path,
            repo_id,
            commit_message=commit_message,
            commit_description=commit_description,
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )


__all__ = [
    "compressed_state_dict",
    "disable_compressed_save",
    "enable_compressed_save",
    "save_pruned",
    "META_SUFFIX",
]
