"""Where the peak RSS of an offloaded one-shot run comes from: block 0 of a checkpoint of the 1B synthetic LLaMA's
shape (two blocks, the 1B vocabulary), pruned through the real offloaded path (`oneshot(path, ..., offload_dir=...)`)
and stopped once block 0 is written, with the peak resident set of each phase: capture of the first block's inputs,
loading the block, the statistics pass, each layer's solve (ADMM: the factorisation and the iterations apart), the
forward producing the next block's inputs, compressing and writing the block (and, offloaded, the parking of the
statistics of the layers solved later, and their reading back). Every block of the full run goes
through the same phases with the same shapes, so the highest phase peak here is the full run's peak (up to glibc
heap reuse across blocks, which `release_free_memory` returns after each block).

Each phase's peak is exact, not sampled: the kernel's high-water mark (VmHWM) is reset when a phase starts (writing
5 to /proc/self/clear_refs) and read when it ends; nested phases fold into their parent. Figures are MiB above the
RSS after the imports (the import baseline, as `scale_oneshot.py` measures), and over the 1B fp16 checkpoint's bytes.

    OMP_NUM_THREADS=1 python benchmarks/scale_block_memory.py --method admm --out benchmarks/results/block_memory.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import tempfile
import time
from pathlib import Path

from scale_oneshot import SYNTHETIC, synthetic_llama
from scale_oneshot import _status_mb as _status_mib  # MiB, from /proc/self/status

FULL_1B_FP16_MIB = 2040.2  # the 22-block checkpoint's safetensors bytes, the denominator of issue 29's target


class PhasePeaks:
    """Peak RSS per (nested) phase, from the kernel's high-water mark reset at each phase start."""

    def __init__(self):
        self.stack: list[str] = []
        self.peak: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.at_start: dict[str, float] = {}  # RSS when the phase first started
        self._started: dict[str, float] = {}

    def _fold(self) -> None:
        if self.stack:
            name = self.stack[-1]
            self.peak[name] = max(self.peak.get(name, 0.0), _status_mib("VmHWM"))

    def enter(self, name: str) -> None:
        self._fold()
        name = "/".join([*self.stack[-1:], name]) if self.stack else name
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.stack.append(name)
        self.at_start.setdefault(name, _status_mib("VmRSS"))
        self._started[name] = time.perf_counter()

    def exit(self) -> None:
        self._fold()
        name = self.stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._started[name]
        if self.stack:  # the parent includes its children
            parent = self.stack[-1]
            self.peak[parent] = max(self.peak.get(parent, 0.0), self.peak[name])

    def wrap(self, owner, attr: str, label):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self.enter(label(*args, **kwargs) if callable(label) else label)
            try:
                return original(*args, **kwargs)
            finally:
                self.exit()

        setattr(owner, attr, wrapped)


class _Stop(Exception):
    pass


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="admm", choices=["admm", "sparsegpt"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None, help="calibration_batch_size (default: the config's)")
    parser.add_argument("--label", default="", help="what this run measures (recorded)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file; a list of runs, this one appended")
    args = parser.parse_args(argv)

    import accelerate.utils  # noqa: F401  (imported before the baseline, as scale_oneshot.py does)
    import safetensors.torch  # noqa: F401
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    import hf_prune.export.card
    import hf_prune.export.shards  # noqa: F401
    from hf_prune import get_config_class, oneshot
    from hf_prune.assets import cache_dir
    from hf_prune.methods.admm.solver import ADMMSolver
    from hf_prune.oneshot.offload import OffloadedCheckpoint
    from hf_prune.oneshot.solver import LayerStats

    runner = importlib.import_module("hf_prune.oneshot.runner")  # `hf_prune.oneshot` is also a function's name

    shape = {**SYNTHETIC["1b"], "num_hidden_layers": 2}
    path = synthetic_llama(cache_dir() / "synthetic" / "llama-1b-shape-2blocks", **shape)
    calibration = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
    extra = {} if args.batch_size is None else {"calibration_batch_size": args.batch_size}
    config = get_config_class(args.method)(sparsity=0.5, num_calibration_samples=args.samples,
                                           max_seq_length=args.seq_len, **extra)

    phases = PhasePeaks()
    short = lambda entry, *a, **k: "solve:" + entry.name.rsplit(".", 1)[-1]  # noqa: E731
    phases.wrap(runner, "capture_block_inputs", "capture")
    phases.wrap(runner, "collect_stats", "stats")
    phases.wrap(runner, "_solve", short)
    phases.wrap(runner, "advance", "advance")
    phases.wrap(runner, "_park_later_statistics", "park_stats")  # between the statistics pass and the solves
    phases.wrap(LayerStats, "restore", "restore_stats")  # before o_proj, gate_proj and down_proj
    phases.wrap(OffloadedCheckpoint, "load_embeddings", "load_embeddings")
    phases.wrap(OffloadedCheckpoint, "load_block", "load_block")
    phases.wrap(OffloadedCheckpoint, "write_block", "write_block")
    phases.wrap(ADMMSolver, "_factorise", "factorise")
    phases.wrap(ADMMSolver, "_admm", "iterations")
    write_block = OffloadedCheckpoint.write_block

    def stop_after_first(self, index, *a, **k):
        write_block(self, index, *a, **k)
        raise _Stop

    OffloadedCheckpoint.write_block = stop_after_first

    work = Path(tempfile.mkdtemp(prefix="block-memory-"))
    baseline = _status_mib("VmRSS")
    started = time.perf_counter()
    try:
        oneshot(str(path), config, calibration=calibration, offload_dir=work / "out", device="cpu",
                show_progress=False)
    except _Stop:
        pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = time.perf_counter() - started
    above = {k: round(v - baseline, 1) for k, v in phases.peak.items()}
    top = max((k for k in above if "/" not in k), key=above.get)
    result = {
        "label": args.label, "method": args.method, "calibration": [args.samples, args.seq_len],
        "calibration_batch_size": config.calibration_batch_size, "threads": torch.get_num_threads(),
        "baseline_rss_mib": round(baseline, 1), "wall_s": round(wall, 1),
        "peak_phase": top, "peak_above_baseline_mib": above[top],
        "peak_over_1b_fp16": round(above[top] / FULL_1B_FP16_MIB, 3),
        "phase_peak_above_baseline_mib": above,
        "phase_rss_at_start_above_baseline_mib": {k: round(v - baseline, 1) for k, v in phases.at_start.items()},
        "phase_seconds": {k: round(v, 1) for k, v in phases.seconds.items()},
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        runs = json.loads(args.out.read_text()) if args.out.is_file() else []
        args.out.write_text(json.dumps([*runs, result], indent=1) + "\n")


if __name__ == "__main__":
    main()
