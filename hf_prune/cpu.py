"""What this CPU runs natively, and the bf16 choice that follows from it.

Two CPU features decide whether hf_prune's fast paths are fast (or correct) on a given machine:
- **native bf16** (AVX-512 BF16 or AMX, seen through oneDNN): without it torch emulates bf16 matrix products, about
  10x slower than fp32 (a 512 x 576 by 576 x 1536 product: 17.8 ms fp32, 169 ms bf16 on an AVX2 EPYC);
- **VNNI** (AVX-512 VNNI or AVX-VNNI): ONNX Runtime's u8 x s8 integer matmul accumulates through a saturating 16-bit
  intermediate without it, which is why the int8 export uses 7-bit weights (`hf_prune.deploy.quantize`).

Every place that would pick bf16 on CPU asks `use_bf16`; every benchmark records `machine_state()`.
This module imports nothing from hf_prune (a lowest layer).
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import time

import torch

logger = logging.getLogger("hf_prune")

_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; empty where there is none (macOS, Windows)."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:  # x86 / ARM
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def native_bf16() -> bool:
    """True where torch runs bf16 matrix products on this CPU natively (oneDNN's own check: AVX-512 BF16 / AMX on
    x86, BF16 on ARM), so bf16 autocast is faster than fp32 rather than ~10x slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cpu_features() -> dict:
    """The CPU facts that decide hf_prune's fast paths, for cards and benchmark records."""
    model, flags = _cpuinfo()
    return {
        "cpu_model": model,
        "arch": platform.machine(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16(),
        "vnni": any(f in flags for f in _VNNI_FLAGS),
        "avx512": "avx512f" in flags,
        "avx2": "avx2" in flags,
    }


def describe_cpu(features: dict | None = None) -> str:
    """One line, e.g. `AMD EPYC (x86_64, torch AVX2, no VNNI, no native bf16)`."""
    f = features or cpu_features()
    return (f"{f['cpu_model']} ({f['arch']}, torch {f['torch_cpu_capability']}, "
            f"{'VNNI' if f['vnni'] else 'no VNNI'}, {'native bf16' if f['native_bf16'] else 'no native bf16'})")


def machine_state() -> dict:
    """The record every benchmark JSON carries beside its figures: CPU features, cores, threads, load, memory."""
    state = dict(cpu_features(), cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                 load_average=[round(x, 2) for x in os.getloadavg()])
    try:
        with open("/proc/meminfo") as fh:
            mem = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in fh)}
        state["mem_available_gb"] = round(int(mem["MemAvailable"].split()[0]) / 2**20, 1)
    except (OSError, KeyError, ValueError):
        pass
    return state


@functools.lru_cache(maxsize=1)
def bf16_slowdown() -> tuple[float, float]:
    """(fp32 ms, bf16 ms) of one 512 x 576 by 576 x 1536 product on this CPU (best of 3), the cost quoted when bf16
    is refused. Measured once per process, ~0.1-1 s."""
    a, b = torch.randn(512, 576), torch.randn(576, 1536)
    times = []
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(x, y)
            best = min(best, time.perf_counter() - start)
        times.append(best * 1e3)
    return times[0], times[1]


_said: set[tuple[str, str]] = set()  # (what, requested): each fallback is logged once per process


def use_bf16(requested: bool | str, what: str, device: torch.device | str | None = None) -> bool:
    """Whether `what` (e.g. "recovery training") should run in bf16.

    `requested` is `"auto"` (bf16 where it is native: the recipes' and benchmarks' default), `True` (the user asked)
    or `False`. On CUDA (`device`, or any visible GPU when `device` is None) bf16 is kept as asked. On a CPU without
    native bf16, bf16 is ~10x slower than fp32, so both fall back to fp32: `"auto"` with one info line, an explicit
    `True` with a warning quoting the measured cost (each once per process).
    """
    if requested not in (True, False, "auto"):
        raise ValueError(f"bf16 must be True, False or 'auto', got {requested!r}")
    if requested is False:
        return False
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type != "cpu"
    if on_gpu or native_bf16():
        return True
    key = (what, str(requested))
    if key in _said:
        return False
    _said.add(key)
    features = describe_cpu()
    if requested == "auto":
        logger.info("hf_prune: %s runs in fp32: this CPU has no native bf16 kernels (%s)", what, features)
        return False
    fp32_ms, bf16_ms = bf16_slowdown()
    logger.warning("hf_prune: bf16 was requested for %s, but this CPU has no native bf16 kernels (%s): a 512x576 by "
                   "576x1536 matmul takes %.1f ms in bf16 vs %.1f ms in fp32 here (%.1fx slower); running in fp32",
                   what, features, bf16_ms, fp32_ms, bf16_ms / max(fp32_ms, 1e-9))
    return False
