"""Decoding compressed weights on worker threads while `from_pretrained` goes on (the loader's own threads read the
files ahead; its main thread converts one weight at a time).

[`ParallelDecoder.submit`] checks a group's meta and stored shapes, allocates the zero dense output and returns it at
once; a worker fills it in place (numpy releases the GIL in the decode loops), so the loader sets it as the
parameter and moves on to the next weight. [`ParallelDecoder.join`] waits for every fill and raises the first
error; the quantizer calls it in `postprocess_model`, before anyone reads a weight. Only for weights that stay on
the CPU in their stored dtype (a cast, another device or a disk offload reads the tensor at once: decoded in line).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .codecs import decode, empty_dense, group_codec


class FilePages:
    """Drops from this process's memory the pages of a decoded group's tensors that are views of a mapped
    `.safetensors` file (`madvise(MADV_DONTNEED)`; Linux only).

    transformers loads safetensors tensors as views of the file's mapping and keeps the mapping alive as long as
    any dense weight (embeddings, norms) still views it; every page of compressed data it read would then count in
    the resident set until the end, on top of the decoded weights (0.45x the model at 50 %). A file-backed page
    that is dropped is read again from the page cache if anything touches it, so no data is ever lost; anonymous
    memory (a copy) is never touched, nor a page shared with a neighbouring tensor (only whole pages inside a
    tensor's bytes)."""

    def __init__(self):
        self._ranges: list[tuple[int, int]] | None = None
        self._madvise = None
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._madvise = ctypes.CDLL(None, use_errno=True).madvise
                self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError):
                self._madvise = None

    def _file_ranges(self) -> list[tuple[int, int]]:
        if self._ranges is None:  # the loader maps its files before it hands out any tensor: read once
            self._ranges = []
            try:
                with open("/proc/self/maps") as fh:
                    for line in fh:
                        parts = line.split(None, 5)
                        if len(parts) == 6 and parts[5].rstrip().endswith(".safetensors"):
                            start, end = (int(x, 16) for x in parts[0].split("-"))
                            self._ranges.append((start, end))
            except OSError:
                pass
        return self._ranges

    def release(self, tensors) -> None:
        if self._madvise is None:
            return
        page = mmap.PAGESIZE
        for t in tensors:
            if t.device.type != "cpu" or not t.is_contiguous():
                continue
            begin = t.data_ptr()
            end = begin + t.numel() * t.element_size()
            first, last = -(-begin // page) * page, end // page * page
            if last <= first or not any(a <= begin and end <= b for a, b in self._file_ranges()):
                continue
            self._madvise(first, last - first, mmap.MADV_DONTNEED)


class ParallelDecoder:
    """Decodes groups on `workers` threads, at most `2 * workers` in flight (what is queued holds the compressed
    tensors, so the queue is bounded); with 0 workers, only [`decode`] in line. Both release the groups' file pages
    ([`FilePages`])."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pages = FilePages()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_prune-decode-load") if workers else None
        self._pending: deque[Future] = deque()
        self._done: list[Future] = []

    def submit(self, name: str, group: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense tensor of `group` (zeros until [`join`]: the fill runs on a worker; needs workers)."""
        codec, meta = group_codec(name, group)
        values, index = group[""], group[codec.suffix]
        rows, cols = codec.check_stored(meta, tuple(values.shape), index.dtype, tuple(index.shape), name)
        out = empty_dense(rows, cols, values.dtype)
        while len(self._pending) >= 2 * self.workers:
            self._settle(self._pending.popleft())
        self._pending.append(self._pool.submit(self._fill, codec, values, index, meta, name, out))
        return out

    def _fill(self, codec, values, index, meta, name, out) -> None:
        codec.decode(values, index, meta, name, out)
        self.pages.release((values, index))

    def decode(self, name: str, group: dict[str, torch.Tensor]) -> torch.Tensor:
        """In-line decode (a weight that is cast or leaves the CPU), releasing its file pages too."""
        dense = decode(name, group)
        self.pages.release(group.values())
        return dense

    def _settle(self, future: Future) -> None:
        future.result()  # raises the worker's error (a corrupt group) here, in the loading thread

    def join(self) -> None:
        """Waits for every submitted decode; raises the first error. The decoder cannot be used afterwards."""
        try:
            while self._pending:
                self._settle(self._pending.popleft())
        finally:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
