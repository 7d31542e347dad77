"""Resuming an interrupted offloaded one-shot run: finished blocks are kept, the run continues at the next one.

An offloaded run (`oneshot(path, config, offload_dir=out)`) keeps its progress in a hidden directory beside the
output, `.<out name>.hf_prune-partial/` (inside `out` when its parent is not writable): each finished block's
compressed shard, the calibration hidden states entering the next block, and `resume.json`, rewritten atomically
after every block, which records what the finished blocks depend on (a fingerprint of the checkpoint, the pruning
config, the calibration token windows, the dtype and the export format) and what the final export needs from them
(shard files and keys, zero counts, the compression report). The same call again reads the record, checks the
fingerprint and continues at the next block; the final export hard-links the kept shards, so a resumed run writes
exactly the bytes an uninterrupted one writes. The directory goes once the export is in place.

The hidden states are saved rather than recomputed: recomputing them means running every finished (pruned) block
again, decoded from its shard, and a forward on another thread count may differ in the last bits, while the saved
tensors make the resumed run bit-equal to an uninterrupted one; they cost one file of `samples x seq_len x hidden`
floats (64 x 512 x 2048 in fp32: 268 MB), only the latest boundary kept. The run itself reads its block inputs from
that file a batch at a time and writes the block's outputs into the next one as they are computed
(`offload.SpilledHidden`), so they are not resident while the block's layers are solved. The other block inputs (attention mask,
rotary embeddings) are the same for every block and are captured again from the embeddings.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .checkpoint_reader import CheckpointReader

logger = logging.getLogger(__name__)

RECORD = "resume.json"
LOCK = "resume.lock"
RECORD_VERSION = 2  # 2: finished blocks in the checkpoint's dtypes (1: in the compute dtype)


class ResumeMismatchError(ValueError):
    """The offload directory holds an interrupted run made with other settings; nothing was changed."""


def partial_dir(target: Path) -> Path:
    """Where an offloaded run into `target` keeps its progress: beside it, or inside it when the parent is not
    writable (or `target` is a mount point), as the save protocol builds its output."""
    parent = target.parent
    if os.access(parent, os.W_OK | os.X_OK) and not (target.is_dir() and os.path.ismount(target)):
        return parent / f".{target.name}.hf_prune-partial"
    return target / ".hf_prune-partial"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def checkpoint_fingerprint(path: Path, files: list[str]) -> dict:
    """`config.json` and, per weight file, its size, modification time and tensor table (not the whole content:
    hashing a 140 GB checkpoint would take minutes on every start)."""
    from ..export.reading import read_safetensors_header

    out = {"config.json": _sha256((path / "config.json").read_bytes())}
    for file in sorted(files):
        stat = (path / file).stat()
        header, _ = read_safetensors_header(path / file)
        out[file] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                     "tensors": _sha256(json.dumps(header, sort_keys=True).encode())}
    return out


def tensors_fingerprint(tensors: dict[str, torch.Tensor] | None) -> str | None:
    if not tensors:
        return None
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_fingerprint(*, checkpoint: dict, config, windows: torch.Tensor | None, masks: dict | None,
                    dtype: torch.dtype, export_format: str, max_shard_size) -> dict:
    settings = config.to_dict()
    settings.pop("hf_prune_version", None)
    return {
        "checkpoint": checkpoint,
        "config": settings,
        "calibration": tensors_fingerprint(None if windows is None else {"windows": windows}),
        "masks": tensors_fingerprint(masks),
        "dtype": str(dtype).removeprefix("torch."),
        "format": export_format,
        "max_shard_size": None if max_shard_size is None else str(max_shard_size),
    }


def describe_mismatch(recorded: dict, current: dict) -> list[str]:
    """What differs between two fingerprints, in words (the recorded value, then the current one)."""
    found = []
    for key in current:
        old, new = recorded.get(key), current[key]
        if old == new:
            continue
        if key == "config":
            fields = sorted(set(old or {}) | set(new))
            changed = [f"{f}={(old or {}).get(f)!r} -> {new.get(f)!r}" for f in fields if (old or {}).get(f) != new.get(f)]
            found.append("the pruning config (" + ", ".join(changed) + ")")
        elif key == "checkpoint":
            files = sorted(set(old or {}) | set(new))
            changed = [f for f in files if (old or {}).get(f) != new.get(f)]
            found.append("the model checkpoint (" + ", ".join(changed) + " changed since)")
        elif key == "calibration":
            found.append("the calibration token windows (other text, tokenizer or seed)")
        else:
            found.append(f"{key} ({old!r} -> {new!r})")
    return found


def hidden_file(block: int) -> str:
    """The file holding the hidden states entering `block`."""
    return f"hidden-{block:05d}.safetensors"


class RunRecord:
    """The progress of one offloaded run in its partial directory; holds the directory's lock while open."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.data: dict | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------------------ opening
    def open(self, fingerprint: dict, *, restart: bool, target: Path) -> dict | None:
        """Locks the directory and returns the recorded progress if it matches `fingerprint` (None: a fresh run).
        A record made with other settings raises `ResumeMismatchError` (nothing touched) unless `restart`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        record = self._read()
        if record is not None and restart:
            logger.warning("Discarding the interrupted run in %s (restart=True): %s of %s blocks were finished",
                           self.directory, record.get("blocks_done"), record.get("num_blocks"))
            record = None
        elif record is not None and record.get("fingerprint") != fingerprint:
            differs = describe_mismatch(record.get("fingerprint") or {}, fingerprint)
            self.close()
            raise ResumeMismatchError(
                f"offload_dir {str(target)!r} has an interrupted run ({record.get('blocks_done')} of "
                f"{record.get('num_blocks')} blocks finished, kept in {str(self.directory)!r}) made with other "
                f"settings: {'; '.join(differs) or 'its record'} differ(s). Nothing was changed. To continue it, rerun "
                "with the settings it was started with; to discard it and start over, pass restart=True (CLI: "
                "--restart); or choose another offload_dir"
            )
        if record is not None and not self._files_present(record):
            logger.warning("The interrupted run in %s lacks some of its files; starting over", self.directory)
            record = None
        self._remove_unrecorded(record)
        self.data = record
        return record

    def _lock(self) -> None:
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"another process is running an offloaded one-shot run into the same output (its progress, "
                f"{str(self.directory)!r}, is locked); wait for it to end or choose another offload_dir"
            ) from None
        self._lock_fd = fd

    def _read(self) -> dict | None:
        path = self.directory / RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("%s is unreadable; starting over", path)
            return None
        if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
            logger.warning("%s was written by another hf_prune version; starting over", path)
            return None
        return record

    def _files_present(self, record: dict) -> bool:
        names = [s["file"] for s in record["shards"]] + ([record["hidden"]] if record.get("hidden") else [])
        return all((self.directory / n).is_file() for n in names)

    def _remove_unrecorded(self, record: dict | None) -> None:
        """Files a run killed between writing them and recording them left (or everything, starting over)."""
        keep = {LOCK} | ({RECORD, record.get("hidden")} | {s["file"] for s in record["shards"]} if record else set())
        for entry in self.directory.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    # ------------------------------------------------------------------------------------------ progress
    def save(self, record: dict) -> None:
        """Replaces the record atomically (written, flushed to disk, renamed over the old one)."""
        tmp = self.directory / (RECORD + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(record, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / RECORD)
        self.data = record

    def save_hidden(self, hidden: list[torch.Tensor], block: int) -> str:
        """Writes the hidden states entering `block` (atomically); returns the file name."""
        from safetensors.torch import save_file

        name = hidden_file(block)
        tmp = self.directory / (name + ".tmp")
        save_file({f"batch.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}, str(tmp))
        os.replace(tmp, self.directory / name)
        return name

    def load_hidden(self, name: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The saved hidden states, checked against the shapes and dtypes the captured inputs have."""
        reader = CheckpointReader(self.directory, files=[name])
        out = []
        for i, ref in enumerate(like):
            key = f"batch.{i}"
            if key not in reader.weight_map:
                raise ValueError(f"{self.directory / name} lacks {key}: the saved hidden states do not match this run")
            tensor = reader.get(key)
            if tensor.shape != ref.shape or tensor.dtype != ref.dtype:
                raise ValueError(
                    f"{self.directory / name}: {key} is {tensor.dtype} {tuple(tensor.shape)}, this run's block inputs "
                    f"are {ref.dtype} {tuple(ref.shape)}"
                )
            out.append(tensor.to(ref.device))
        return out

    def remove(self, name: str | None) -> None:
        if name:
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """Removes the directory (the export is in place)."""
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)
