"""Tensors set aside in an anonymous temporary file while not needed: the memory-bounded (offloaded) run's way to
keep a block's large statistics out of the resident set between their accumulation and their layer's solve."""

from __future__ import annotations

import tempfile

import torch


class ParkedTensor:
    """The exact bytes of a tensor in an anonymous temporary file (deleted when closed or garbage-collected);
    `restore` reads them back once, into a fresh tensor of the same shape, dtype and device. The caller drops its
    own reference to the tensor to free its memory."""

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype, self.device = tensor.shape, tensor.dtype, tensor.device
        self.nbytes = tensor.numel() * tensor.element_size()
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by restore, or when garbage-collected
        self._file.write(_bytes(tensor.detach().to("cpu").contiguous()))
        self._file.flush()

    def restore(self) -> torch.Tensor:
        if self._file is None:
            raise RuntimeError("hf_prune: a parked tensor is restored once")
        tensor = torch.empty(self.shape, dtype=self.dtype)
        self._file.seek(0)
        read = self._file.readinto(_bytes(tensor))
        self._file.close()
        self._file = None
        if read != self.nbytes:
            raise OSError(f"hf_prune: read back {read} of the {self.nbytes} bytes of a parked tensor")
        return tensor.to(self.device)


def _bytes(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor's storage (no copy)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
