"""Per-tensor checksums: corruption that keeps a checkpoint's structure (flipped bits in a bitmask with the same
popcount, in an N:M index, in kept values, in a dense norm) is found before anything is loaded.

Format version 2 stores, in every safetensors file's metadata, `hf_prune_checksums`: a JSON object
`{tensor key: xxh3_64 hex digest of the tensor's bytes}` for the tensors the file holds (each shard its own, as
`shards.ShardWriter` writes them; older exports repeat the whole export's object in every shard, which verifies too). The loader (`HfPruneQuantizer.preprocess_model`),
`load_compressed_state_dict` and `hf-prune info` all verify them (`checkpoint.check_files`). Version-1 checkpoints
have no checksums and are still read (structure checks only). Format version 3 adds an export id (config.json, every
file's metadata, the manifest) and `hf_prune_manifest.json`, the complete tensor list with checksums over every file,
so a lost shard or tensor, or files of two exports (a save over a directory being read), are named.

safetensors has no checksum of its own, so this small layer is ours. xxh3_64 (the `xxhash` package, already a
dependency of `datasets`) hashes at memory speed, so the check costs little next to reading the file; it detects
accidental corruption, it is not a signature.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch
import xxhash

from .codecs import CorruptCheckpointError
from .reading import SafetensorsFile, bounded_json, contained_file, read_json_object, short

CHECKSUM_KEY = "hf_prune_checksums"
ALGORITHM = "xxh3_64"
#: Format version 3: every safetensors file's metadata carries the export id of config.json (`export_id`).
EXPORT_ID_META = "hf_prune_export_id"
#: Format version 3: the complete tensor list of the export, with the checksums, covering every file.
MANIFEST_NAME = "hf_prune_manifest.json"


def tensor_digest(tensor: torch.Tensor) -> str:
    """xxh3_64 hex digest of the bytes safetensors writes for `tensor` (row-major, little-endian)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return xxhash.xxh3_64_hexdigest(b"")
    return xxhash.xxh3_64_hexdigest(flat.view(torch.uint8).numpy().data)


def checksums(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    return {key: tensor_digest(tensor) for key, tensor in state_dict.items()}


def checksum_metadata(state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata entry that format version 2 requires."""
    return {CHECKSUM_KEY: json.dumps(checksums(state_dict), sort_keys=True, separators=(",", ":"))}


def new_export_id() -> str:
    """A fresh export id (format version 3): config.json, every shard and the manifest carry it."""
    return uuid.uuid4().hex


class ExportChangedError(CorruptCheckpointError):
    """The files read belong to two different exports: another process saved over the directory while it was read
    (or files of two exports were mixed by hand)."""


def _changed(path, found, expected) -> ExportChangedError:
    return ExportChangedError(
        f"hf_prune: the export changed while it was read: {path} has export id {short(found)}, config.json has "
        f"{short(expected)} (another process saved over it, or files of two exports were mixed). Load it again."
    )


def check_export_id(f: SafetensorsFile, expected: str | None) -> None:
    """Raises `ExportChangedError` when `f` carries another export id than `expected` (None: not checked), and
    `CorruptCheckpointError` when it carries none (it was rewritten by another tool)."""
    if expected is None:
        return
    found = f.metadata.get(EXPORT_ID_META)
    if found is None:
        raise CorruptCheckpointError(
            f"hf_prune: {f.path} has no {EXPORT_ID_META!r} in its metadata, which format version 3 requires: the file "
            "was replaced or rewritten by another tool. Re-export it."
        )
    if found != expected:
        raise _changed(f.path, found, expected)


def file_checksums(f: SafetensorsFile, *, required: bool) -> dict[str, str] | None:
    """The `{key: digest}` record of `f` (None when it has none and none is required), validated."""
    if CHECKSUM_KEY not in f.metadata:
        if required:
            raise CorruptCheckpointError(
                f"hf_prune: {f.path} has no {CHECKSUM_KEY!r} in its metadata, which format version >= 2 requires: the "
                "file was replaced or rewritten by another tool. Re-export it."
            )
        return None
    expected = bounded_json(f.metadata[CHECKSUM_KEY], f"{f.path} ({CHECKSUM_KEY})", max_depth=1)
    if not isinstance(expected, dict) or not all(isinstance(v, str) for v in expected.values()):
        raise CorruptCheckpointError(f"hf_prune: {f.path} has an unreadable {CHECKSUM_KEY!r} metadata entry")
    return expected


def verify_file(f: SafetensorsFile, *, required: bool, export_id: str | None = None) -> dict[str, str]:
    """Checks the export id of `f`, then hashes every tensor of `f` against its checksum record, from the file's
    one mapping. Returns the record (empty when the file has none and none is required)."""
    expected = file_checksums(f, required=required)
    check_export_id(f, export_id)
    if expected is None:
        return {}
    mismatched, missing = [], []
    for key in f.keys():
        want = expected.get(key)
        if want is None:
            missing.append(key)
            continue
        with f.raw(key) as view:
            if xxhash.xxh3_64_hexdigest(view) != want:
                mismatched.append(key)
    if mismatched:
        raise CorruptCheckpointError(
            f"hf_prune: {f.path} is corrupted: the bytes of {len(mismatched)} tensor(s) do not match their "
            f"{ALGORITHM} checksums: {_names(mismatched)}. Re-download or re-export the checkpoint."
        )
    if missing:
        raise CorruptCheckpointError(
            f"hf_prune: {f.path} holds tensor(s) with no checksum: {_names(missing)}: the file was modified after export"
        )
    return expected


def _names(keys) -> str:
    keys = sorted(keys)
    return ", ".join(short(k, 120).strip("'") for k in keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")


def verify_checksums(files: list[str | os.PathLike], *, required: bool) -> list[str]:
    """Hashes every tensor of `files` against the checksums in their metadata.

    Args:
        files: the export's safetensors files (all shards).
        required: the checkpoint's format version has checksums (>= 2): a file without them is corrupt.

    Returns:
        The keys that were verified (empty for a version-1 checkpoint without checksums).

    Raises:
        `CorruptCheckpointError` naming the file and the tensors whose bytes do not match, a tensor without an
        entry, or an entry whose tensor is in no file (a tensor lost from the checkpoint).
    """
    expected_all: dict[str, str] = {}
    verified: list[str] = []
    for file in files:
        with SafetensorsFile(file) as f:
            record = verify_file(f, required=required)
            expected_all.update(record)
            if record:
                verified += f.keys()
    lost = sorted(set(expected_all) - set(verified)) if expected_all else []
    if lost:
        raise CorruptCheckpointError(f"hf_prune: tensor(s) listed in the checksums are in none of the files: {_names(lost)}")
    return verified


# ------------------------------------------------------------------------------------------------ the manifest
def write_manifest(directory: str | os.PathLike, files: list[str | os.PathLike], export_id: str) -> Path:
    """Writes `hf_prune_manifest.json`: the export id and every file's `{tensor key: digest}` (format version 3),
    taken from the files' own checksum records, so that a lost shard or tensor is named on load."""
    record = {}
    for file in files:
        with SafetensorsFile(file) as f:
            check_export_id(f, export_id)
            record[Path(file).name] = file_checksums(f, required=True)
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps({"export_id": export_id, "algorithm": ALGORITHM, "files": record}, indent=1,
                               sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(directory: Path, export_id: str) -> dict[str, dict[str, str]]:
    """`{file name: {key: digest}}` from the manifest of `directory`, checked (types, containment, export id).

    transformers downloads only the files the index names: in a Hub cache snapshot the manifest is fetched for the
    same revision."""
    if not (directory / MANIFEST_NAME).exists() and directory.parent.name == "snapshots":
        _fetch_into_snapshot(directory)
    path = contained_file(directory, MANIFEST_NAME, source=directory)
    data = read_json_object(path, max_depth=3)
    files = data.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and all(isinstance(d, str) for d in v.values()) for v in files.values()
    ):
        raise CorruptCheckpointError(f"hf_prune: {path}: 'files' must map file names to {{tensor key: digest}}")
    if data.get("export_id") != export_id:
        raise _changed(path, data.get("export_id"), export_id)
    return files


def _fetch_into_snapshot(snapshot: Path) -> None:
    """Downloads the manifest into a Hub cache snapshot (`<cache>/models--org--name/snapshots/<commit>`)."""
    repo_dir = snapshot.parent.parent
    kind, _, name = repo_dir.name.partition("--")
    if kind not in ("models", "datasets", "spaces") or not name:
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        hf_hub_download(name.replace("--", "/"), MANIFEST_NAME, revision=snapshot.name, cache_dir=repo_dir.parent,
                        repo_type=kind[:-1])
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return  # reported as missing by the caller


def check_manifest(manifest: dict[str, dict[str, str]], found: dict[str, dict[str, str]], directory: Path) -> None:
    """Every file and tensor the manifest lists was found, with the same digest; nothing else was."""
    source = Path(directory) / MANIFEST_NAME
    missing_files = sorted(set(manifest) - set(found))
    if missing_files:
        lost = [k for name in missing_files for k in manifest[name]]
        raise CorruptCheckpointError(
            f"hf_prune: {source} lists file(s) that are not part of the checkpoint read: {_names(missing_files)}, "
            f"holding {len(lost)} tensor(s): {_names(lost)}. The export is incomplete: re-download or re-export it."
        )
    extra = sorted(set(found) - set(manifest))
    if extra:
        raise CorruptCheckpointError(f"hf_prune: file(s) {_names(extra)} are not listed in {source}")
    for name, record in manifest.items():
        lost = set(record) - set(found[name])
        if lost:
            raise CorruptCheckpointError(
                f"hf_prune: {Path(directory) / name} lacks tensor(s) that {source} lists: {_names(lost)}. The export "
                "is incomplete: re-download or re-export it."
            )
        changed = [k for k in found[name] if record.get(k) != found[name][k]]
        if changed:
            raise CorruptCheckpointError(
                f"hf_prune: {Path(directory) / name} holds tensor(s) that {source} does not list with these "
                f"checksums: {_names(changed)}"
            )
