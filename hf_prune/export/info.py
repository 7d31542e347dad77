"""Reading an export without building the model: `describe_export` (for `hf-prune info DIR`), verification, and a
dense state dict from compressed files (e.g. to resume a Trainer run from a compressed checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .codecs import META_SUFFIX, CorruptCheckpointError
from .formats import decompress_state_dict, split_key
from .integrity import verify_checksums
from .summary import format_results, format_sparsity, natural_sorted, recorded_results


def _format_version(path: Path) -> int:
    """The export format version `config.json` beside `path` declares (0: not an hf_prune export)."""
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if not config_file.is_file():
        return 0
    qc = _read_json(config_file).get("quantization_config") or {}
    if qc.get("quant_method") != "hf_prune":
        return 0
    from .quantizer import check_export_config

    return check_export_config(qc).format_version


def _read_json(path: Path) -> dict:
    """A JSON object from `path`; errors name the file and the line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CorruptCheckpointError(f"hf_prune: {path} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(
            f"hf_prune: {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"hf_prune: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CorruptCheckpointError(f"hf_prune: {index} is not a valid safetensors index: {err}") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"No safetensors weights in {str(directory)!r} (hf_prune reads safetensors only)")
    return found


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Raises `CorruptCheckpointError` naming `path` when its header is unreadable or the file is truncated."""
    read_safetensors_header(path)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at, after checking the file is whole.

    Raises `CorruptCheckpointError` naming `path` when the header is unreadable or the file is truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    # The safetensors layout is: 8-byte little-endian header length, JSON header, data. safetensors' own error for a
    # truncated file does not name the file, so check the sizes here.
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"hf_prune: {path} is truncated ({size} bytes): not a safetensors file")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise CorruptCheckpointError(f"hf_prune: {path} is truncated: header says {n} bytes, file has {size - 8}")
        try:
            header = json.loads(fh.read(n))
            assert isinstance(header, dict) and all(
                k == "__metadata__" or (isinstance(v, dict) and len(v.get("data_offsets", ())) == 2)
                for k, v in header.items()
            )
        except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as err:
            detail = f": {err}" if not isinstance(err, AssertionError) else ": not a tensor table"
            raise CorruptCheckpointError(f"hf_prune: {path} has a corrupted safetensors header{detail}") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CorruptCheckpointError(
            f"hf_prune: {path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}. "
            "Re-download or re-export it."
        )
    return header, 8 + n


def check_compressed_headers(files: list[str | os.PathLike]) -> None:
    """Cheap structural check of compressed groups (reads only the small meta tensors): every compressed weight has
    values, one index tensor and meta, and the index has the shape its meta implies."""
    from .codecs import _nm_storage, _combinations, codec_for_suffix

    for file in files:
        check_safetensors_file(file)
    groups: dict[str, dict[str, tuple]] = {}
    handles = {}
    for file in files:
        try:
            f = safe_open(str(file), framework="pt")
        except SafetensorError as err:
            raise CorruptCheckpointError(f"hf_prune: cannot read {file}: {err}") from None
        handles[str(file)] = f
        for key in f.keys():
            base, suffix = split_key(key)
            groups.setdefault(base, {})[suffix] = (str(file), key)
    for base, group in groups.items():
        if set(group) == {""}:
            continue
        def fail(msg):
            raise CorruptCheckpointError(f"hf_prune: corrupted compressed weight {base!r}: {msg}")
        if "" not in group:
            fail("the values tensor is missing")
        if META_SUFFIX not in group:
            fail(f"the {META_SUFFIX} tensor is missing")
        index = [s for s in group if s not in ("", META_SUFFIX)]
        if len(index) != 1:
            fail(f"expected exactly one index tensor, found {sorted(index) or 'none'}")
        codec = codec_for_suffix(index[0])
        file, key = group[META_SUFFIX]
        meta = handles[file].get_tensor(key).tolist()
        file, key = group[index[0]]
        index_shape = tuple(handles[file].get_slice(key).get_shape())
        if codec.name == "bitmask" and len(meta) == 2:
            expected = (meta[0], -(-meta[1] // 8))
        elif codec.name == "block" and len(meta) == 4 and meta[2] > 0 and meta[3] > 0:
            expected = (meta[0] // meta[2], -(-(meta[1] // meta[3]) // 8))
        elif codec.name == "nm" and len(meta) == 5 and 0 < meta[2] < meta[3] <= 16:
            rows, cols, n, m, dim = meta
            r, c = (rows, cols) if dim == 1 else (cols, rows)
            per = _nm_storage(len(_combinations(n, m)))[1]
            expected = (r, -(-(c // m) // per))
        else:
            fail(f"meta {meta} is invalid for codec {codec.name!r}")
        if index_shape != expected:
            fail(f"{codec.name} index has shape {index_shape}, expected {expected} for meta {meta}")


def load_compressed_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Dense state dict from an export directory or a single (compressed or dense) safetensors file."""
    path = Path(path)
    files = _weight_files(path) if path.is_dir() else [path]
    check_compressed_headers(files)
    verify_checksums(files, required=_format_version(path) >= 2)
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return decompress_state_dict(tensors)


def describe_export(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """What `hf-prune info DIR` prints: method, config, layout, sparsity per layer (recorded and measured), sizes, and
    whether every compressed tensor decodes consistently (`verified`, with `errors`)."""
    directory = Path(directory)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json: not a model export")
    config = _read_json(config_file)
    qc = config.get("quantization_config") or {}
    ours = isinstance(qc, dict) and qc.get("quant_method") == "hf_prune"
    pruning = qc.get("pruning") or {}
    files = _weight_files(directory)
    desc = {
        "path": str(directory),
        "architecture": (config.get("architectures") or [None])[0],
        "compressed": ours,
        "format": qc.get("format") if ours else "dense",
        "format_version": qc.get("format_version"),
        "layout": qc.get("layout"),
        "method": (pruning.get("config") or {}).get("method"),
        "pruning_config": pruning.get("config"),
        "base_model": pruning.get("base_model"),
        "command": pruning.get("command"),
        "metrics": pruning.get("metrics") or {},
        "recorded_results": recorded_results(directory, pruning.get("metrics") or {}),
        "module_sparsity": natural_sorted(pruning.get("module_sparsity") or {}),
        "files": {p.name: p.stat().st_size for p in files if p.exists()},
        "has_model_card": (directory / "README.md").is_file(),
        "codecs": {},
        "measured_sparsity": {},
        "file_bytes": sum(p.stat().st_size for p in files if p.exists()),
        "dense_bytes": None,
        "verified": None,
        "checksums_verified": None,
        "errors": [],
    }
    try:
        if ours:  # what from_pretrained would refuse (format version, unknown format), info refuses too
            from .quantizer import check_export_config

            try:
                check_export_config(qc)
            except ValueError as err:
                raise CorruptCheckpointError(f"{config_file}: {err}") from None
        check_compressed_headers(files)
        if verify:
            checked = verify_checksums(files, required=ours and qc.get("format_version", 1) >= 2)
            desc["checksums_verified"] = len(checked)
    except (CorruptCheckpointError, FileNotFoundError) as err:
        desc["verified"] = False
        desc["errors"].append(str(err))
        return desc
    dense_bytes = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            keys = list(f.keys())
            groups: dict[str, list[str]] = {}
            for key in keys:
                groups.setdefault(split_key(key)[0], []).append(key)
            for base, members in groups.items():
                if len(members) == 1 and members[0] == base:
                    sl = f.get_slice(base)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    dense_bytes += numel * _dtype_size(sl.get_dtype())
                    continue
                meta = f.get_tensor(base + META_SUFFIX).tolist()
                values = f.get_slice(base)
                dense_bytes += meta[0] * meta[1] * _dtype_size(values.get_dtype())
                codec = next(split_key(k)[1] for k in members if split_key(k)[1] not in ("", META_SUFFIX))
                desc["codecs"][base] = codec.removeprefix("_hf_prune_")
                if verify:
                    try:
                        dense = decompress_state_dict({k: f.get_tensor(k) for k in members})[base]
                        desc["measured_sparsity"][base.removesuffix(".weight")] = float((dense == 0).float().mean())
                    except CorruptCheckpointError as err:
                        desc["errors"].append(str(err))
    desc["dense_bytes"] = dense_bytes
    desc["measured_sparsity"] = natural_sorted(desc["measured_sparsity"])
    if verify:
        desc["verified"] = not desc["errors"]
    return desc


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _dtype_size(dtype: str) -> int:
    return _DTYPE_SIZES.get(dtype, 1)


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
