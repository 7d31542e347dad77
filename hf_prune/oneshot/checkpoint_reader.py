"""Reading a local safetensors checkpoint tensor by tensor without mapping it (the offloaded runner and the resume
record both read this way)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.shards import INDEX_NAME as INDEX_FILE

# safetensors dtype names -> torch dtypes (the ones transformers checkpoints hold)
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointReader:
    """Tensors of a local safetensors checkpoint by key: one `model.safetensors` or shards with an index.

    Each tensor is read with a positioned read into a fresh tensor rather than through `safe_open`'s memory map:
    mapped pages of a file count in the process's resident set until it ends, so reading a whole checkpoint through
    a map would make the process as big as the checkpoint (the page cache, which `read` goes through, does not).
    """

    def __init__(self, path: Path, files: list[str] | None = None):
        from ..export.checkpoint import weight_files
        from ..export.reading import read_safetensors_header

        index = path / INDEX_FILE
        if files is not None:
            pass  # given by the caller (a file this process wrote)
        elif index.is_file() or (path / "model.safetensors").is_file():
            files = [str(p.relative_to(path)) for p in weight_files(path)]  # each resolved inside `path`
        else:
            raise FileNotFoundError(
                f"offloaded pruning reads safetensors checkpoints: {str(path)!r} has neither model.safetensors nor "
                f"{INDEX_FILE}"
            )
        self.path = path
        self.files = files
        self.weight_map: dict[str, str] = {}
        self._entries: dict[str, tuple[dict, int]] = {}
        for file in files:
            header, data_start = read_safetensors_header(path / file)
            header.pop("__metadata__", None)
            for key, info in header.items():
                self.weight_map[key] = file
                self._entries[key] = (info, data_start)

    def header(self, key: str) -> dict:
        """`key`'s header entry: `{"dtype": "F32", "shape": [...], "data_offsets": [start, end]}`."""
        return dict(self._entries[key][0])

    def dtype(self, key: str) -> torch.dtype:
        """The dtype `key` is stored in, from the header (nothing read)."""
        name = self._entries[key][0]["dtype"]
        if name not in _DTYPES:
            raise ValueError(f"{self.path / self.weight_map[key]}: {key} has dtype {name}, not supported here")
        return _DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        info, data_start = self._entries[key]
        dtype = self.dtype(key)
        start, end = info["data_offsets"]
        tensor = torch.empty(info["shape"], dtype=dtype)
        buffer = tensor.reshape(-1).view(torch.uint8).numpy()
        if buffer.nbytes != end - start:
            raise ValueError(f"{self.path / self.weight_map[key]}: {key} holds {end - start} bytes, expected {buffer.nbytes}")
        with open(self.path / self.weight_map[key], "rb") as fh:
            fh.seek(data_start + start)
            if fh.readinto(buffer) != buffer.nbytes:
                raise ValueError(f"{self.path / self.weight_map[key]} is truncated at {key}")
        return tensor
