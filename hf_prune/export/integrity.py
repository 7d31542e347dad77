"""Per-tensor checksums: corruption that keeps a checkpoint's structure (flipped bits in a bitmask with the same
popcount, in an N:M index, in kept values, in a dense norm) is found before anything is loaded.

Format version 2 stores, in every safetensors file's metadata, `hf_prune_checksums`: a JSON object
`{tensor key: xxh3_64 hex digest of the tensor's bytes}` for the tensors the file holds (each shard its own, as
`shards.ShardWriter` writes them; older exports repeat the whole export's object in every shard, which verifies too). The loader (`HfPruneQuantizer.preprocess_model`),
`load_compressed_state_dict` and `hf-prune info` all call [`verify_checksums`]. Version-1 checkpoints have no
checksums and are still read (structure checks only).

safetensors has no checksum of its own, so this small layer is ours. xxh3_64 (the `xxhash` package, already a
dependency of `datasets`) hashes at memory speed, so the check costs little next to reading the file; it detects
accidental corruption, it is not a signature.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import torch
import xxhash

from .codecs import CorruptCheckpointError

CHECKSUM_KEY = "hf_prune_checksums"
ALGORITHM = "xxh3_64"


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
        path = Path(file)
        header, data_start = _read_header(path)
        meta = header.pop("__metadata__", None) or {}
        if CHECKSUM_KEY not in meta:
            if required:
                raise CorruptCheckpointError(
                    f"hf_prune: {path} has no {CHECKSUM_KEY!r} in its metadata, which format version 2 requires: the "
                    "file was replaced or rewritten by another tool. Re-export it."
                )
            continue
        try:
            expected = json.loads(meta[CHECKSUM_KEY])
            assert isinstance(expected, dict)
        except (json.JSONDecodeError, AssertionError):
            raise CorruptCheckpointError(f"hf_prune: {path} has an unreadable {CHECKSUM_KEY!r} metadata entry") from None
        expected_all.update(expected)
        mismatched, missing = [], []
        # mmap: hashing reads the pages (which the loader then finds in the page cache) without copying the file.
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data, memoryview(data) as whole:
            for key, info in header.items():
                want = expected.get(key)
                if want is None:
                    missing.append(key)
                    continue
                start, end = info["data_offsets"]
                with whole[data_start + start : data_start + end] as view:
                    if xxhash.xxh3_64_hexdigest(view) != want:
                        mismatched.append(key)
                verified.append(key)
        if mismatched:
            raise CorruptCheckpointError(
                f"hf_prune: {path} is corrupted: the bytes of {len(mismatched)} tensor(s) do not match their "
                f"{ALGORITHM} checksums: {', '.join(sorted(mismatched)[:5])}" + (" ..." if len(mismatched) > 5 else "")
                + ". Re-download or re-export the checkpoint."
            )
        if missing:
            raise CorruptCheckpointError(
                f"hf_prune: {path} holds tensor(s) with no checksum: {', '.join(sorted(missing)[:5])}: the file was "
                "modified after export"
            )
    lost = sorted(set(expected_all) - set(verified)) if expected_all else []
    if lost:
        raise CorruptCheckpointError(
            f"hf_prune: tensor(s) listed in the checksums are in none of the files: {', '.join(lost[:5])}"
            + (" ..." if len(lost) > 5 else "")
        )
    return verified


def _read_header(path: Path) -> tuple[dict, int]:
    from .info import read_safetensors_header

    return read_safetensors_header(path)
