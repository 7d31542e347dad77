"""Reading an export without building the model: `describe_export` (for `hf-prune info DIR`), verification, and a
dense state dict from compressed files (e.g. to resume a Trainer run from a compressed checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import changes_reported, check_files, check_groups, declared_shapes, locate_export, open_files
from .codecs import META_SUFFIX, CorruptCheckpointError
from .formats import decompress_state_dict, split_key
from .reading import DTYPES, SafetensorsFile, read_json_object, read_safetensors_header
from .summary import format_results, format_sparsity, natural_sorted, recorded_results


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raises `CorruptCheckpointError` naming `path` when its header is unreadable or the file is truncated."""
    read_safetensors_header(path)


def check_compressed_headers(files: list[str | os.PathLike], shapes: dict | None = None) -> None:
    """Structural check of every compressed group of `files` without decoding (see `checkpoint.check_groups`)."""
    opened = open_files([Path(f) for f in files])
    try:
        check_groups(opened, shapes)
    finally:
        for f in opened:
            f.close()


def load_compressed_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dense state dict from an export directory or a single (compressed or dense) safetensors file.

    Runs the checks `from_pretrained` runs (`checkpoint.py`), then reads every tensor from the same open file it
    verified, so a save over the directory meanwhile gives one export or an error saying it changed."""
    export = locate_export(path)
    with changes_reported(export.directory, export.export_id):
        opened = open_files(export.files)
        try:
            check_files(export, opened, shapes=declared_shapes(export))
            tensors = {key: f.tensor(key) for f in opened for key in f.keys()}
        finally:
            for f in opened:
                f.close()
    return decompress_state_dict(tensors)


def _typed(mapping, key: str, kind, default=None):
    """`mapping[key]` when it has type `kind` (a field of the wrong type is reported by the schema check, and
    shown as missing)."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, kind) else default


def describe_export(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """What `hf-prune info DIR` prints: method, config, layout, sparsity per layer (recorded and measured), sizes, and
    whether every compressed tensor decodes consistently (`verified`, with `errors`). What `from_pretrained` would
    refuse (config schema, files, manifest, checksums, compressed groups) is `verified: False` with the error."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json: not a model export")
    config = read_json_object(config_file)
    qc = _typed(config, "quantization_config", dict, {})
    ours = qc.get("quant_method") == "hf_prune"
    pruning = _typed(qc, "pruning", dict, {})
    metrics = _typed(pruning, "metrics", dict, {})
    architectures = _typed(config, "architectures", list, [None]) or [None]
    desc = {
        "path": str(directory),
        "architecture": architectures[0] if isinstance(architectures[0], str) else None,
        "compressed": ours,
        "format": _typed(qc, "format", str, "sparse") if ours else "dense",
        "format_version": _typed(qc, "format_version", int),
        "layout": _typed(qc, "layout", str),
        "method": _typed(_typed(pruning, "config", dict, {}), "method", str),
        "pruning_config": _typed(pruning, "config", dict),
        "base_model": _typed(pruning, "base_model", str),
        "command": _typed(pruning, "command", str),
        "metrics": metrics,
        "recorded_results": {},
        "module_sparsity": {},
        "files": {},
        "has_model_card": (directory / "README.md").is_file(),
        "codecs": {},
        "measured_sparsity": {},
        "file_bytes": 0,
        "dense_bytes": None,
        "verified": None,
        "checksums_verified": None,
        "errors": [],
    }
    opened = []
    try:
        export = locate_export(directory)  # config schema, index, containment, manifest
        desc["recorded_results"] = recorded_results(directory, metrics)
        desc["module_sparsity"] = natural_sorted(_typed(pruning, "module_sparsity", dict, {}))
        desc["files"] = {p.name: p.stat().st_size for p in export.files}
        desc["file_bytes"] = sum(desc["files"].values())
        with changes_reported(export.directory, export.export_id):
            opened = open_files(export.files)
            checked = check_files(export, opened, verify=verify, shapes=declared_shapes(export))
        if verify:
            desc["checksums_verified"] = checked
        _measure(opened, desc, verify)
    except (CorruptCheckpointError, FileNotFoundError) as err:
        desc["verified"] = False
        desc["errors"].append(str(err))
        return desc
    finally:
        for f in opened:
            f.close()
    desc["measured_sparsity"] = natural_sorted(desc["measured_sparsity"])
    if verify:
        desc["verified"] = not desc["errors"]
    return desc


def _measure(opened: list[SafetensorsFile], desc: dict, verify: bool) -> None:
    """Dense sizes, codecs and (with `verify`) measured sparsity, decoding one weight at a time from the open files
    (every group was checked by `check_groups` first, so each decode is bounded)."""
    dense_bytes = 0
    for f in opened:
        groups: dict[str, list[str]] = {}
        for key in f.keys():
            groups.setdefault(split_key(key)[0], []).append(key)
        for base, members in groups.items():
            if len(members) == 1 and members[0] == base:
                numel = 1
                for d in f.shape(base):
                    numel *= d
                dense_bytes += numel * DTYPES[f.dtype(base)].itemsize
                continue
            meta = f.tensor(base + META_SUFFIX).tolist()
            dense_bytes += meta[0] * meta[1] * DTYPES[f.dtype(base)].itemsize
            codec = next(split_key(k)[1] for k in members if split_key(k)[1] not in ("", META_SUFFIX))
            desc["codecs"][base] = codec.removeprefix("_hf_prune_")
            if verify:
                try:
                    dense = decompress_state_dict({k: f.tensor(k) for k in members})[base]
                    desc["measured_sparsity"][base.removesuffix(".weight")] = float((dense == 0).float().mean())
                except CorruptCheckpointError as err:
                    desc["errors"].append(str(err))
    desc["dense_bytes"] = dense_bytes


def format_description(desc: dict, *, per_module: bool = False) -> str:
    """Human-readable text of a `describe_export` result: sparsity one row per block (one line per module with
    `per_module=True`), then the recorded results."""
    lines = [f"Export: {desc['path']}", f"Architecture: {desc['architecture']}"]
    if desc["compressed"]:
        lines.append(f"Format: hf_prune {desc['format']} v{desc['format_version']}, layout {desc['layout']}")
    else:
        lines.append("Format: dense safetensors (loads without hf_prune)")
    if desc["method"]:
        lines.append(f"Method: {desc['method']}  config: {json.dumps(desc['pruning_config'], sort_keys=True)}")
    if desc["base_model"]:
        lines.append(f"Base model: {desc['base_model']}")
    size = desc["file_bytes"]
    dense = desc["dense_bytes"]
    ratio = f" ({size / dense:.3f}x of {dense / 1e6:.2f} MB dense)" if dense else ""
    lines.append(f"Weights on disk: {size / 1e6:.2f} MB in {len(desc['files'])} file(s){ratio}")
    lines += format_sparsity(desc, per_module=per_module)
    lines += format_results(desc.get("recorded_results") or {})
    if desc["verified"] is None:
        lines.append("Files verified: not checked")
    else:
        how = ""
        if desc["verified"]:
            n = desc.get("checksums_verified")
            how = f" ({n} tensor checksums match)" if n else " (structure only: this checkpoint has no checksums)"
        lines.append(f"Files verified: {'yes' if desc['verified'] else 'NO'}{how}")
        lines += [f"  error: {e}" for e in desc["errors"]]
    return "\n".join(lines)
