"""The one way hf_prune reads files of a checkpoint it did not write in this process (and so may be hostile).

- [`bounded_json`]: JSON with its nesting depth and size checked *before* `json.loads` (a document 200,000 levels
  deep raised a raw `RecursionError`).
- [`contained_file`]: every file named by an index or a manifest resolves inside the export directory, as a regular
  file (not `/etc/passwd`, `../../x`, `/dev/zero`, `.`, a list or a number).
- [`SafetensorsFile`]: one `open` and one `mmap` per file: the header (bounded, validated as strictly as
  safetensors' own parser) and the tensor bytes come from the same mapping, so a file replaced by another process
  while it is read is never seen half old, half new.
- [`short`]: reprs cut to a few hundred characters, for error messages (a 10^7-entry tensor is never printed).

safetensors' Python API does not expose the data offsets (needed to hash each tensor's bytes) nor a way to read the
header and the data through one open, so the header is parsed here, with safetensors' limits.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
from pathlib import Path

import numpy as np
import torch

from .codecs import CorruptCheckpointError

#: safetensors refuses headers above 100 MB (`MAX_HEADER_SIZE` in its Rust parser); so do we.
MAX_HEADER_BYTES = 100_000_000
#: A safetensors header is {key: {"dtype", "shape": [...], "data_offsets": [...]}}: 3 levels.
HEADER_DEPTH = 3
#: config.json, indexes and manifests: transformers configs nest a few levels; 64 is far above any real one.
JSON_DEPTH = 64
MAX_JSON_BYTES = 100_000_000

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def short(value, limit: int = 200) -> str:
    """`repr(value)` cut to `limit` characters (error messages stay small whatever a file holds)."""
    if isinstance(value, (list, tuple)) and len(value) > 16:  # never build the repr of a huge list
        value = [*value[:16], f"... ({len(value)} entries)"]
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} chars)"


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))


def json_depth(data: bytes) -> int:
    """The deepest nesting of `[` / `{` in a JSON document (strings skipped), computed without recursion."""
    brackets = _STRING.sub(b'""', data).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def bounded_json(data: bytes | str, source, *, max_depth: int = JSON_DEPTH, what: str = "JSON"):
    """`json.loads(data)` after checking size and depth; every error is a `CorruptCheckpointError` naming `source`."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > MAX_JSON_BYTES:
        raise CorruptCheckpointError(f"hf_prune: {source}: {what} of {len(data)} bytes is above the {MAX_JSON_BYTES} limit")
    depth = json_depth(data)
    if depth > max_depth:
        raise CorruptCheckpointError(
            f"hf_prune: {source}: {what} is nested {depth} levels deep, more than the {max_depth} a valid file has"
        )
    try:
        return json.loads(data)
    except UnicodeDecodeError as err:
        raise CorruptCheckpointError(f"hf_prune: {source} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise CorruptCheckpointError(
            f"hf_prune: {source} is not valid {what} (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except RecursionError:  # only if the depth check above is wrong; still a clear error
        raise CorruptCheckpointError(f"hf_prune: {source}: {what} is nested too deeply") from None


def read_json_object(path: str | os.PathLike, *, max_depth: int = JSON_DEPTH) -> dict:
    """A JSON object from `path` (config.json, index, manifest): bounded, errors name the file and the line."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read(MAX_JSON_BYTES + 1)
    value = bounded_json(data, path, max_depth=max_depth)
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"hf_prune: {path} must hold a JSON object, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------- containment
def allowed_roots(directory: Path) -> list[Path]:
    """Where the files of `directory` may resolve: itself, and for a Hub cache snapshot
    (`.../snapshots/<rev>/file -> ../../blobs/<hash>`) the repository's `blobs` folder."""
    roots = [directory.resolve()]
    if directory.parent.name == "snapshots":
        roots.append((directory.parent.parent / "blobs").resolve())
    return roots


def contained_file(directory: str | os.PathLike, entry, *, source, key=None) -> Path:
    """The regular file `entry` names inside `directory`; anything else is a `CorruptCheckpointError` naming `source`
    (the index or manifest) and the entry: absolute paths, `..`, symlinks that resolve outside, non-files, non-strings.
    """
    directory = Path(directory)
    where = f" (for {short(key)})" if key is not None else ""

    def refuse(why: str):
        raise CorruptCheckpointError(
            f"hf_prune: {source} names the file {short(entry)}{where}, which {why}; every weight file must be a "
            f"regular file inside {directory}"
        )

    if not isinstance(entry, str) or not entry:
        refuse(f"is not a file name (a {type(entry).__name__})" if not isinstance(entry, str) else "is empty")
    if "\x00" in entry or "\\" in entry:
        refuse("holds a NUL byte or a backslash")
    if os.path.isabs(entry) or Path(entry).is_absolute():
        refuse("is an absolute path")
    if ".." in Path(entry).parts:
        refuse("leaves the directory ('..')")
    path = directory / entry
    try:
        real = path.resolve(strict=True)
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise CorruptCheckpointError(f"hf_prune: {source} names {short(entry)}{where}, which is missing from {directory}") from None
    except (OSError, RuntimeError) as err:  # symlink loops, permissions
        refuse(f"cannot be resolved ({err})")
    if not any(real.is_relative_to(root) for root in allowed_roots(directory)):
        refuse(f"resolves outside it (to {real})")
    if not stat.S_ISREG(mode):
        refuse("is not a regular file")
    return path


# ------------------------------------------------------------------------------------------------ safetensors
class SafetensorsFile:
    """One safetensors file, opened and mapped once; header bounded and validated before anything is allocated.

    Raises `CorruptCheckpointError` naming the file for anything safetensors would refuse (or that would be read out of
    the file): truncation, header too large or too deep, bad dtypes / shapes / offsets, overlapping tensors.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = open(self.path, "rb")
        self._map = None
        try:
            self.size = os.fstat(self._fh.fileno()).st_size
            if not stat.S_ISREG(os.fstat(self._fh.fileno()).st_mode):
                raise CorruptCheckpointError(f"hf_prune: {self.path} is not a regular file")
            if self.size < 8:
                raise CorruptCheckpointError(f"hf_prune: {self.path} is truncated ({self.size} bytes): not a safetensors file")
            self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        path, size = self.path, self.size
        n = int.from_bytes(self._map[:8], "little")
        if n > size - 8:
            raise CorruptCheckpointError(f"hf_prune: {path} is truncated: header says {n} bytes, file has {size - 8}")
        if n > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"hf_prune: {path}: header of {n} bytes is above safetensors' limit")
        header = bounded_json(self._map[8 : 8 + n], path, max_depth=HEADER_DEPTH, what="safetensors header")

        def bad(why: str):
            raise CorruptCheckpointError(f"hf_prune: {path} has a corrupted safetensors header: {why}")

        if not isinstance(header, dict):
            bad("not a tensor table")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            bad("__metadata__ must map strings to strings")
        spans = []
        for key, info in header.items():
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                bad(f"tensor {short(key)} is not {{dtype, shape, data_offsets}}")
            dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in DTYPES:
                bad(f"tensor {short(key)} has unknown dtype {short(dtype)}")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                bad(f"tensor {short(key)} has shape {short(shape)} (a list of non-negative integers is required)")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                    and 0 <= offsets[0] <= offsets[1]):
                bad(f"tensor {short(key)} has data_offsets {short(offsets)} (two increasing integers are required)")
            numel = 1
            for d in shape:
                numel *= d
            if offsets[1] - offsets[0] != numel * DTYPES[dtype].itemsize:
                bad(f"tensor {short(key)} of shape {short(shape)} {dtype} needs {numel * DTYPES[dtype].itemsize} bytes, "
                    f"its data_offsets span {offsets[1] - offsets[0]}")
            spans.append((offsets[0], offsets[1], key))
        end = 0
        for begin, stop, key in sorted(spans):
            if begin != end:
                bad(f"tensor {short(key)} starts at {begin}, not where the previous one ends ({end}): overlapping or "
                    "gapped data")
            end = stop
        if 8 + n + end > size:
            raise CorruptCheckpointError(
                f"hf_prune: {path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}. "
                "Re-download or re-export it."
            )
        self.header: dict[str, dict] = header
        self.metadata: dict[str, str] = metadata
        self.data_start = 8 + n

    # ------------------------------------------------------------------------------------------------- access
    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, key: str) -> str:
        return self.header[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def nbytes(self, key: str) -> int:
        begin, end = self.header[key]["data_offsets"]
        return end - begin

    def raw(self, key: str) -> memoryview:
        """The stored bytes of `key` (a view of the mapping: release it before `close`)."""
        begin, end = self.header[key]["data_offsets"]
        return memoryview(self._map)[self.data_start + begin : self.data_start + end]

    def tensor(self, key: str) -> torch.Tensor:
        """A copy of tensor `key` (safe to use after `close`)."""
        dtype, shape = DTYPES[self.dtype(key)], self.shape(key)
        with self.raw(key) as view:
            if not len(view):
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(view), dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The tensor table of a safetensors file (`__metadata__` included when present) and the offset its data starts
    at, after the checks of [`SafetensorsFile`]."""
    with SafetensorsFile(path) as f:
        header = dict(f.header)
        if f.metadata:
            header["__metadata__"] = dict(f.metadata)
        return header, f.data_start
