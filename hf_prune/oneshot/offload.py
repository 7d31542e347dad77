"""Offloaded one-shot pruning: a checkpoint bigger than memory, pruned block by block, written as it goes.

The model is built on the meta device (`accelerate.init_empty_weights`); the block-sequential runner asks this
module to load one block's weights from the checkpoint's safetensors files (memory-mapped, `safe_open`) just before
the block is calibrated, and, once the block is pruned and has produced the next block's inputs, to compress it into
its own shard of the output checkpoint and put it back on the meta device. The calibration hidden states live in a
file of the progress directory between the passes and are read a batch at a time (`SpilledHidden`). So only the
block being pruned, one block of statistics and one calibration batch are resident (plus the block's outputs while
they are computed). The embeddings are loaded only while the first
block's inputs are captured. At the end the non-block tensors, `config.json`, the shard index and the model card are
written, the whole directory is verified (checksums) and swapped into place atomically, as `save_pruned` does.

The pruned blocks' shards are written into the run's progress directory (`resume.py`), recorded after each block,
and hard-linked into the export at the end, so that an interrupted run continues at the next block when rerun.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from ..export.save import _holds_model, _is_our_card, export_keeps
from ..output_dir import OutputBuild
from .blocks import Blocks, find_blocks
from .checkpoint_reader import CheckpointReader
from .resume import RECORD_VERSION, RunRecord, checkpoint_fingerprint, hidden_file, partial_dir, run_fingerprint

logger = logging.getLogger(__name__)

def empty_model_from_checkpoint(path: Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's model class built on the meta device (buffers such as rotary frequencies stay real)."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(
            f"{str(path)!r} is a quantized or hf_prune-compressed checkpoint ({config.quantization_config!r}); "
            "offloaded pruning reads a dense checkpoint"
        )
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        raise ValueError(f"{str(path)!r}: config.json names no transformers architecture ({architectures!r})")
    with init_empty_weights(include_buffers=False):
        model = model_cls._from_config(config, dtype=dtype)
    model.tie_weights()  # not done on the meta device by `_from_config`: tied embeddings would look like two tensors
    model.name_or_path = str(path)
    model.config._name_or_path = str(path)
    return model


class OffloadedCheckpoint:
    """Loads blocks of a checkpoint on demand and writes the pruned ones straight into a compressed export."""

    def __init__(
        self, path, output, *, overwrite: bool, dtype: torch.dtype, device: torch.device, layout: str,
        max_shard_size: int | str | None = None, tokenizer=None, restart: bool = False,
    ):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory (offloaded pruning reads a local checkpoint)")
        self.output = OutputBuild(output, overwrite=overwrite, conflicts=_holds_model, sources=[path],
                                   what="offload_dir")
        self.target = self.output.target  # symlinks resolved
        self.progress = RunRecord(partial_dir(self.target))  # finished blocks of this or an interrupted run
        self.restart = restart
        self.dtype = dtype
        self.tokenizer = tokenizer  # saved into the export with the weights (same atomic write)
        self.reader = CheckpointReader(path)
        map_large_allocations()  # this run is bounded by memory: no heap of freed batches between phases
        self.model = empty_model_from_checkpoint(path, dtype)
        self.blocks: Blocks = find_blocks(self.model)
        self.device = torch.device(device)
        self.layout = layout
        self.max_shard_size = max_shard_size
        self.report_entries: dict[str, dict] = {}
        self.record: dict = {}
        self._tmp: Path | None = None
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        # what an in-memory save writes: parameters and persistent buffers, tied duplicates once
        self.keys = list(remove_tied_weights_from_state_dict(self.model.state_dict(), self.model))
        self.keys_set = set(self.keys)
        params = {n for n, _ in self.model.named_parameters(remove_duplicate=False)}
        missing = [k for k in self.keys if k in params and k not in self.reader.weight_map]
        if missing:
            raise ValueError(
                f"the checkpoint {str(path)!r} lacks {len(missing)} parameter(s) of {type(self.model).__name__}: "
                f"{', '.join(missing[:5])}"
            )

    # ------------------------------------------------------------------------------------------ loading
    def _load(self, module: nn.Module, prefix: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        params = dict(module.named_parameters(remove_duplicate=False))
        for name, param in params.items():
            value = self.reader.get(prefix + name).to(dtype=param.dtype)
            set_module_tensor_to_device(module, name, self.device, value=value)
        for name, buffer in module.named_buffers():
            if prefix + name in self.reader.weight_map:  # persistent buffers saved with the checkpoint
                set_module_tensor_to_device(module, name, self.device, value=self.reader.get(prefix + name))

    @staticmethod
    def _release(module: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(module.named_parameters(remove_duplicate=False)):
            set_module_tensor_to_device(module, name, "meta")

    def _outside_blocks(self) -> list[tuple[str, nn.Module]]:
        """Modules with parameters outside the blocks (embeddings, final norm), except the LM head: the forward
        up to the first block never reaches it (and a tied one holds the input embedding's weight)."""
        block_list = self.blocks.layers
        output = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        found = []
        for name, module in self.model.named_modules():
            if module is block_list or module is output:
                continue
            if any(name.startswith(n + ".") for n, _ in found) or name == self.blocks.prefix or name.startswith(
                self.blocks.prefix + "."
            ):
                continue
            if list(module.parameters(recurse=False)):
                found.append((name, module))
        return found

    def load_embeddings(self) -> None:
        """What the forward needs before the first block (embeddings, positions), for capturing its inputs."""
        for name, module in self._outside_blocks():
            self._load(module, f"{name}." if name else "")

    def release_embeddings(self) -> None:
        for _, module in self._outside_blocks():
            self._release(module)
        self.model.tie_weights()  # replacing the embedding's parameter untied it from the LM head
        release_free_memory()

    def load_block(self, index: int) -> nn.Module:
        from .checks import check_finite_parameters

        block = self.blocks.layers[index]
        self._load(block, f"{self.blocks.prefix}.{index}.")
        check_finite_parameters(block, f"{self.blocks.prefix}.{index}")
        return block

    # ------------------------------------------------------------------------------------------ writing
    def start(self, module_names: list[str], *, config, windows: torch.Tensor | None,
              masks: dict[str, torch.Tensor] | None) -> int:
        """Opens this run's progress (see `resume.py`): a fresh record, or an interrupted run's with the same
        fingerprint, whose finished blocks are kept. Returns the number of blocks already finished."""
        from ..export.quantizer import HfPruneExportConfig
        from ..export.shards import ShardWriter
        from ..version import __version__

        self._names = {f"{name}.weight" for name in module_names}  # the weights to try compressing
        # config.json's dtype: the one the pruned weights are written in (the checkpoint's)
        stored = [self.reader.dtype(f"{name}.weight") for name in module_names if f"{name}.weight" in self.reader.weight_map]
        self.saved_dtype = stored[0] if stored else self.dtype
        format_name = HfPruneExportConfig().format
        self._metadata = {"hf_prune_format": format_name, "hf_prune_version": __version__}
        fingerprint = run_fingerprint(
            checkpoint=checkpoint_fingerprint(self.reader.path, self.reader.files), config=config, windows=windows,
            masks=masks, dtype=self.dtype, export_format=format_name, max_shard_size=self.max_shard_size,
        )
        record = self.progress.open(fingerprint, restart=self.restart, target=self.output.requested)
        directory = self.progress.directory
        if record is None:
            self._writer = ShardWriter(directory, max_shard_size=self.max_shard_size, metadata=self._metadata)
            record = {"version": RECORD_VERSION, "fingerprint": fingerprint, "num_blocks": len(self.blocks.layers),
                      "blocks_done": 0, "export_id": self._writer.export_id, "shards": [], "hidden": None,
                      "zeros": {}, "report": {}, "elapsed_s": 0.0, "hf_prune_version": __version__,
                      "device": str(self.device)}
            self.progress.save(record)
        else:
            self._writer = ShardWriter(directory, max_shard_size=self.max_shard_size, metadata=self._metadata,
                                       export_id=record["export_id"])
            self._writer.adopt(record["shards"], directory)
            self.report_entries.update(record["report"])
            for what, then, now in (("hf_prune", record.get("hf_prune_version"), __version__),
                                    ("device", record.get("device"), str(self.device))):
                if then != now:
                    logger.warning("The interrupted run's finished blocks were computed with %s %s, the rest will be "
                                   "with %s", what, then, now)
            done, total = record["blocks_done"], record["num_blocks"]
            logger.warning(
                "Resuming the interrupted offloaded run into %s at block %d of %d (blocks 0-%d were finished earlier "
                "and are kept in %s)", self.output.requested, done, total, done - 1, directory,
            )
        self.record = record
        self._session_started = time.perf_counter()
        return record["blocks_done"]

    @property
    def elapsed(self) -> float:
        """Seconds of pruning over every session of this run (earlier interrupted ones included)."""
        return self.record.get("elapsed_s", 0.0) + time.perf_counter() - self._session_started

    def _as_saved(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` on the CPU in the dtype the checkpoint stores `key` in: the export keeps the checkpoint's dtypes
        whatever `dtype` the run computes in (an fp16 checkpoint pruned in float32 is written in fp16)."""
        dtype = self.reader.dtype(key) if key in self.reader.weight_map else tensor.dtype
        return tensor.detach().to("cpu", dtype=dtype)

    def write_block(self, index: int, zeros: dict[str, int],
                    next_hidden: list[torch.Tensor] | None = None) -> dict[str, int]:
        """Compresses the pruned block, in the checkpoint's dtypes, into its own shard, frees its weights and
        records it as finished (with the hidden states entering the next block, `next_hidden`), so that an
        interrupted run resumes after it. Returns the zero count of each layer in `zeros` as written."""
        from ..export.formats import compress_tensors

        block = self.blocks.layers[index]
        prefix = f"{self.blocks.prefix}.{index}."
        state_dict = {prefix + k: self._as_saved(prefix + k, v) for k, v in block.state_dict().items()
                      if prefix + k in self.keys_set}
        # the zeros of what is written (a kept weight too small for the checkpoint's dtype is a zero there too)
        zeros = {name: int((state_dict[f"{name}.weight"] == 0).sum()) if f"{name}.weight" in state_dict else count
                 for name, count in zeros.items()}
        # one weight at a time: this run is bounded by memory, and concurrent encodes hold their temporaries at once
        # (measured: a 150M model's peak 0.96x the fp16 checkpoint with 2 threads encoding, < 0.75x serially)
        compressed, report = compress_tensors(state_dict, self.layout, names=self._names & set(state_dict),
                                              parallel=False)
        del state_dict
        self.report_entries.update(report.entries)
        self._writer.add(compressed)
        self._writer.flush()  # one shard per block: nothing of this block stays in memory
        del compressed
        self._release(block)
        release_free_memory()
        previous = self.record["hidden"]
        if isinstance(next_hidden, SpilledHidden):  # the outputs are in its file already: made the next inputs
            spilled = next_hidden.name
            hidden = next_hidden.commit(hidden_file(index + 1))
            if spilled not in (hidden, previous):  # block 0's inputs, never recorded
                self.progress.remove(spilled)
        else:
            hidden = None if next_hidden is None else self.progress.save_hidden(next_hidden, index + 1)
        self.record["zeros"].update(zeros)
        self.record["report"].update(report.entries)
        self.record.update(blocks_done=index + 1, shards=self._writer.written(), hidden=hidden,
                           elapsed_s=round(self.elapsed, 3))
        self._session_started = time.perf_counter()
        self.progress.save(self.record)
        if previous != hidden:
            self.progress.remove(previous)
        return zeros

    def spill_hidden(self, hidden: list[torch.Tensor], block: int) -> SpilledHidden:
        """Moves the hidden states entering `block` into a file of the progress directory, read back a batch at a
        time (`SpilledHidden`): the solves, where a block's memory peaks, then run without them."""
        name = self.progress.save_hidden(hidden, block)  # resuming: the recorded file, rewritten with its own bytes
        return SpilledHidden(self.progress.directory, name, hidden)

    def restore_hidden(self, captured: list[torch.Tensor]) -> list[torch.Tensor]:
        """The hidden states entering the first block still to prune, saved by the interrupted run."""
        return self.progress.load_hidden(self.record["hidden"], captured)

    def finish(self, model_card: bool = True) -> Path:
        """Writes the tensors outside the blocks, the index, config and card; verifies; moves into place."""
        from ..export.card import build_model_card
        from ..export.formats import CompressionReport
        from ..export.integrity import verify_checksums
        from ..export.save import export_config_for, write_model_config

        from ..export.shards import ShardWriter

        self._tmp = self.output.begin()
        with self.output.guarded():  # a full disk: OutputWriteError, the target left as it was
            writer = ShardWriter(self._tmp, max_shard_size=self.max_shard_size, metadata=self._metadata,
                                 export_id=self._writer.export_id)
            writer.adopt(self._writer.written(), self.progress.directory)  # the finished blocks: hard links
            prefix = self.blocks.prefix + "."
            rest = {k: self.reader.get(k) for k in self.keys if not k.startswith(prefix) and k in self.reader.weight_map}
            writer.add(rest)
            del rest
            files = writer.close(total_parameters=self.model.num_parameters())
            qconfig = export_config_for(self.model)
            self.model.config.quantization_config = qconfig
            write_model_config(self.model, self._tmp, export_id=writer.export_id, dtype=self.saved_dtype)
            verify_checksums(files, required=True)
            readme = self.target / "README.md"
            keep_readme = (readme.is_file() and not _is_our_card(readme)) or not model_card
            if not keep_readme:
                report = CompressionReport()
                report.entries.update(self.report_entries)
                card = build_model_card(self.model, self._tmp, report=report, repo_id=self.output.requested.name)
                card.save(self._tmp / "README.md")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(self._tmp)
            self.output.keep = export_keeps(keep_readme=keep_readme)
            self.output.commit()
        self.progress.discard()  # the export is in place: the finished blocks' record has done its job
        self.close()
        return self.output.requested

    def close(self) -> None:
        """Removes an unfinished export build; the progress of the run stays for a rerun to resume."""
        self.output.abort()
        self.progress.close()
        self._tmp = None


class SpilledHidden:
    """The calibration hidden states of an offloaded run, as the list the runner's passes use, kept in a
    safetensors file of the run's progress directory and read one batch at a time (a positioned read, exact bytes):
    only the batch being run is resident (at 1B: 32 MiB instead of 256). A batch assigned (the block's output, in
    `advance`) is written at once into its place in the next file, laid out like this one (a block's output has
    its input's shape and dtype); `commit` makes that file the current one, under its final name."""

    _NEXT = "hidden-next.safetensors.tmp"

    def __init__(self, directory: Path, name: str, like: list[torch.Tensor]):
        self.directory = directory
        self.devices = [t.device for t in like]
        self._next = None  # the file the assigned batches go to, opened at the first
        self._assigned: set[int] = set()
        self.name = name
        self._reader = CheckpointReader(directory, files=[name])

    def __len__(self) -> int:
        return len(self.devices)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index in self._assigned:
            self._next.flush()
            return CheckpointReader(self.directory, files=[self._NEXT]).get(f"batch.{index}").to(self.devices[index])
        return self._reader.get(f"batch.{index}").to(self.devices[index])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        key = f"batch.{index}"
        layout = self._reader.header(key)
        if list(value.shape) != layout["shape"] or value.dtype != self._reader.dtype(key):
            raise RuntimeError(f"hf_prune offloaded run: a block's output {index} is {value.dtype} "
                               f"{tuple(value.shape)}, its input {layout['dtype']} {tuple(layout['shape'])}")
        if self._next is None:
            self._next = open(self.directory / self._NEXT, "wb")  # noqa: SIM115 - closed by commit
            self._data_start = _write_safetensors_layout(self._next, self._reader, len(self))
        self._next.seek(self._data_start + layout["data_offsets"][0])
        self._next.write(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._assigned.add(index)

    def commit(self, name: str) -> str:
        """The assigned batches (all of them) become the current file, `name` in the directory (atomically)."""
        import os

        if self._next is None or len(self._assigned) != len(self):
            raise RuntimeError("hf_prune offloaded run: committing hidden states before every batch was computed")
        self._next.flush()
        os.fsync(self._next.fileno())
        self._next.close()
        self._next = None
        os.replace(self.directory / self._NEXT, self.directory / name)
        self._assigned.clear()
        self.name = name
        self._reader = CheckpointReader(self.directory, files=[name])
        return name


def _write_safetensors_layout(fh, reader: CheckpointReader, count: int) -> int:
    """Writes the header of a safetensors file with `reader`'s `batch.*` layout and sizes the file for its data;
    returns the offset the data starts at."""
    import json
    import struct

    header = {f"batch.{i}": reader.header(f"batch.{i}") for i in range(count)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    fh.write(struct.pack("<Q", len(raw)) + raw)
    fh.truncate(8 + len(raw) + max(entry["data_offsets"][1] for entry in header.values()))
    return 8 + len(raw)


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serves every allocation of `threshold` bytes or more (a calibration batch, a block's temporaries) by its own
    memory map, returned to the system when freed, instead of glibc's dynamic rule that moves this limit up to
    32 MiB once such a block is freed and then keeps those blocks in a heap that fragments between phases.
    Measured on one block of the 1B benchmark model: 40-170 MiB less resident per phase, no slower. Process-wide
    and kept after the run (glibc has no way back to the dynamic rule); a no-op without glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # glibc's malloc.h
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(m_mmap_threshold, threshold)
    except (OSError, AttributeError):
        pass


def release_free_memory() -> None:
    """Returns freed heap memory to the system (glibc keeps freed blocks of a few MB for reuse, so that each
    block's temporaries would otherwise pile up in the resident set); a no-op where `malloc_trim` is missing."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
