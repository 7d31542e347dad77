"""Decoding compressed weights on worker threads while `from_pretrained` goes on (the loader's own threads read the
files ahead; its main thread converts one weight at a time).

[`ParallelDecoder.submit`] checks a group's meta and stored shapes, allocates the zero dense output and returns it at
once; a worker fills it in place (numpy releases the GIL in the decode loops), so the loader sets it as the
parameter and moves on to the next weight. [`ParallelDecoder.join`] waits for every fill and raises the first
error; the quantizer calls it in `postprocess_model`, before anyone reads a weight. Only for weights that stay on
the CPU in their stored dtype (a cast, another device or a disk offload reads the tensor at once: decoded in line).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .codecs import empty_dense, group_codec


class ParallelDecoder:
    """Decodes groups on `workers` threads, at most `2 * workers` in flight (what is queued holds the compressed
    tensors, so the queue is bounded)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hf_prune-decode-load")
        self._pending: deque[Future] = deque()
        self._done: list[Future] = []

    def submit(self, name: str, group: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense tensor of `group` (zeros until [`join`]: the fill runs on a worker)."""
        codec, meta = group_codec(name, group)
        values, index = group[""], group[codec.suffix]
        rows, cols = codec.check_stored(meta, tuple(values.shape), index.dtype, tuple(index.shape), name)
        out = empty_dense(rows, cols, values.dtype)
        while len(self._pending) >= 2 * self.workers:
            self._settle(self._pending.popleft())
        self._pending.append(self._pool.submit(codec.decode, values, index, meta, name, out))
        return out

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
            self._pool.shutdown(wait=True)
