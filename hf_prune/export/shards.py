"""Writing compressed safetensors shards and the standard `model.safetensors.index.json`.

transformers' writer splits a state dict tensor by tensor (`huggingface_hub.split_torch_state_dict_into_shards`), so
a compressed weight's values could land in one file and its `_hf_prune_*` companions in the next. [`ShardWriter`]
uses the same greedy rule and the same file names, but on whole groups (a weight with its companions), and gives
each file the per-tensor checksums of the tensors it holds (`integrity.py`). Single file: `model.safetensors`;
several: `model-00001-of-0000N.safetensors` plus the index transformers reads (`{"metadata": {"total_size": ...,
"total_parameters": ...}, "weight_map": {key: file}}`).

Streaming use (a pruning run that writes blocks as they finish; memory holds at most one shard of pending tensors):

```python
from hf_prune.export.formats import compress_tensors
from hf_prune.export.shards import ShardWriter

writer = ShardWriter(directory, max_shard_size="2GB")
for block_tensors in finished_blocks:                 # {key: tensor} of one block, dense names
    compressed, report = compress_tensors(block_tensors, layout="2:4")
    writer.add(compressed)
writer.add(other_tensors)                              # embeddings, norms, ...
files = writer.close(total_parameters=n_params)        # renames to model-0000i-of-0000N, writes the index
hf_prune.export.save.write_model_config(model, directory, export_id=writer.export_id)  # config.json
```
(checksums and the index cover what was added; `verify_checksums(files, required=True)` reads it all back.)
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
from huggingface_hub.serialization._base import (
    parse_size_to_int,  # the parser transformers' sharding uses
)
from safetensors.torch import save_file

from ..output_dir import link_or_copy
from .formats import split_key
from .integrity import EXPORT_ID_META, checksum_metadata, new_export_id, write_manifest
from .reading import read_safetensors_header

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def default_max_shard_size() -> int | str:
    """transformers' default `max_shard_size` of `save_pretrained` (read from its signature, so it follows it)."""
    from transformers import PreTrainedModel

    return inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default


def shard_size_bytes(max_shard_size: int | str | None) -> int:
    """`max_shard_size` as bytes (`"200MB"` -> 200_000_000, as in transformers); `None` -> the default."""
    value = default_max_shard_size() if max_shard_size is None else max_shard_size
    try:
        size = parse_size_to_int(value) if isinstance(value, str) else int(value)
    except (ValueError, TypeError):
        size = 0
    if isinstance(value, bool) or size <= 0:
        raise ValueError(
            f"max_shard_size must be a positive number of bytes or a size like '200MB' or '5GB', got {max_shard_size!r}"
        )
    return size


def tensor_groups(tensors: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Keys grouped by the parameter they rebuild (`P.weight` with its `P.weight_hf_prune_*` companions), in order."""
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(split_key(key)[0], []).append(key)
    return groups


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def write_shard(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Writes one safetensors file with the checksums of its tensors in the metadata; returns its tensor bytes."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**(metadata or {}), "format": "pt", **checksum_metadata(tensors)})
    return sum(_nbytes(t) for t in tensors.values())


class ShardWriter:
    """Writes tensors into shards of at most `max_shard_size` bytes, each compressed group whole in one shard.

    Args:
        directory: where the files go (created if missing).
        max_shard_size: bytes or a size string (`"200MB"`); default: transformers' `save_pretrained` default. A
            group bigger than this gets a shard of its own (as in transformers).
        metadata: extra safetensors metadata for every file (string values).
        export_id: the export id (format version 3) written in every file and the manifest; a fresh one by default.
            config.json must carry the same (`write_model_config(model, directory, export_id=writer.export_id)`).

    Call [`add`] with `{key: tensor}` dicts (compressed or dense; a group may not be split across two calls), then
    [`close`]. Until `close`, files carry provisional names (`model-00001.safetensors`, ...).
    """

    def __init__(self, directory: str | os.PathLike, *, max_shard_size: int | str | None = None,
                 metadata: dict[str, str] | None = None, export_id: str | None = None):
        self.directory = Path(directory)
        self.max_bytes = shard_size_bytes(max_shard_size)
        self.export_id = export_id or new_export_id()
        self.metadata = {**(metadata or {}), EXPORT_ID_META: self.export_id}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self._sizes: list[int] = []  # tensor bytes of each written shard
        self._bases: set[str] = set()
        self.total_size = 0
        self.closed = False
        self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Queues `tensors`; writes a shard whenever the next group would not fit in the current one."""
        if self.closed:
            raise RuntimeError("ShardWriter.add after close()")
        for base, keys in tensor_groups(tensors).items():
            if base in self._bases:
                raise ValueError(
                    f"ShardWriter: {base!r} was already added (add each weight once, with all its companions)"
                )
            self._bases.add(base)
            group = {k: tensors[k] for k in keys}
            size = sum(_nbytes(t) for t in group.values())
            if size > self.max_bytes:  # alone in its own shard, the current one stays open (transformers' rule)
                self._write(group)
                continue
            if self._pending and self._pending_bytes + size > self.max_bytes:
                self.flush()
            self._pending.update(group)
            self._pending_bytes += size

    def flush(self) -> None:
        """Writes the pending tensors as one shard now (e.g. to free memory between blocks)."""
        if self._pending:
            self._write(self._pending)
            self._pending, self._pending_bytes = {}, 0

    def _write(self, group: dict[str, torch.Tensor]) -> None:
        path = self.directory / f"model-{len(self._written) + 1:05d}.safetensors"
        nbytes = write_shard(path, group, self.metadata)
        self.total_size += nbytes
        self._written.append((path, list(group)))
        self._sizes.append(nbytes)

    def written(self) -> list[dict]:
        """The shards written so far (provisional file names, their keys and tensor bytes), JSON-able: what a writer
        of the same export in another process [`adopt`]s (a resumed run)."""
        return [{"file": path.name, "keys": list(keys), "bytes": nbytes}
                for (path, keys), nbytes in zip(self._written, self._sizes)]

    def adopt(self, shards: list[dict], source: str | os.PathLike) -> None:
        """Takes over shards that a writer of the same export (same `export_id`) wrote in `source` ([`written`]'s
        entries), as if this writer had written them, before anything else is added: hard links (copies where the
        filesystem has none) when `source` is another directory."""
        if self._written or self._pending:
            raise RuntimeError("ShardWriter.adopt must come before any add()")
        source = Path(source)
        for shard in shards:
            path = self.directory / f"model-{len(self._written) + 1:05d}.safetensors"
            if source.resolve() != self.directory.resolve() or shard["file"] != path.name:
                path.unlink(missing_ok=True)
                link_or_copy(source / shard["file"], path)
            for base in tensor_groups(dict.fromkeys(shard["keys"])):
                self._bases.add(base)
            self._written.append((path, list(shard["keys"])))
            self._sizes.append(int(shard["bytes"]))
            self.total_size += int(shard["bytes"])

    def close(self, *, total_parameters: int | None = None) -> list[Path]:
        """Writes what is pending, gives the files their final names, writes the index (when sharded) and the
        manifest (`hf_prune_manifest.json`: every file's tensors and checksums)."""
        self.flush()
        self.closed = True
        if not self._written:
            raise ValueError("ShardWriter.close: no tensors were added")
        n = len(self._written)
        if n == 1:
            final = self.directory / WEIGHTS_NAME
            os.replace(self._written[0][0], final)
            write_manifest(self.directory, [final], self.export_id)
            return [final]
        files, weight_map = [], {}
        for i, (path, keys) in enumerate(self._written, 1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({k: final.name for k in keys})
        write_index(self.directory, weight_map, total_size=self.total_size, total_parameters=total_parameters)
        write_manifest(self.directory, files, self.export_id)
        return files


def write_index(directory: str | os.PathLike, weight_map: dict[str, str], *, total_size: int,
                total_parameters: int | None = None) -> Path:
    """Writes `model.safetensors.index.json` in transformers' format (sorted keys, 2-space indent)."""
    metadata = {"total_size": int(total_size)}
    if total_parameters is not None:
        metadata["total_parameters"] = int(total_parameters)
    path = Path(directory) / INDEX_NAME
    path.write_text(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n",
                    encoding="utf-8")
    return path


def index_from_files(directory: str | os.PathLike, files: list[str | os.PathLike] | None = None, *,
                     total_parameters: int | None = None) -> Path:
    """(Re)writes the index and the manifest from the shards on disk (all `model-*-of-*.safetensors` by default):
    merges shards written by separate writers or processes into one checkpoint (give the writers the same
    `export_id`). Refuses a key held by two files, a group split across files, or shards of different exports."""
    directory = Path(directory)
    paths = [Path(f) for f in files] if files is not None else sorted(directory.glob("model-*-of-*.safetensors"))
    weight_map: dict[str, str] = {}
    group_file: dict[str, str] = {}
    total = 0
    ids = set()
    for path in paths:
        header, _ = read_safetensors_header(path)
        ids.add((header.get("__metadata__") or {}).get(EXPORT_ID_META))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if key in weight_map:
                raise ValueError(f"{key!r} is in both {weight_map[key]} and {path.name}")
            base = split_key(key)[0]
            if group_file.setdefault(base, path.name) != path.name:
                raise ValueError(f"compressed weight {base!r} is split across {group_file[base]} and {path.name}")
            weight_map[key] = path.name
            total += info["data_offsets"][1] - info["data_offsets"][0]
    if len(ids) != 1 or None in ids:
        raise ValueError(f"the shards carry different export ids ({sorted(map(str, ids))}): give every ShardWriter of one "
                         "export the same export_id")
    index = write_index(directory, weight_map, total_size=total, total_parameters=total_parameters)
    write_manifest(directory, paths, ids.pop())
    return index
