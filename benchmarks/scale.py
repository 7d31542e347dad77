"""Scale benchmark (issue 16), one part per `--part`:

- `io`: SmolLM2-135M in fp16, dense and magnitude-pruned at 50 %, 2:4 and 70 % (hf_prune's compressed format), each
  as one file and sharded (`--shard-size`): `from_pretrained` and `save_pretrained` wall and CPU seconds and the peak
  RSS of the load. Every measurement runs in a fresh subprocess (so peak RSS is the load's own), dense and compressed
  interleaved round by round (`--repeats` rounds), each checkpoint read once into the page cache before its timed
  process. Ratios against the dense checkpoint of the same sharding, two ways: best over best (as before), and paired
  (per round, over the dense time of the same round; median, min and max over rounds), which the targets use; the
  dense times of every round and the load average are in the report.

    nice -n 10 python benchmarks/scale.py --part io
    python benchmarks/scale.py --part io --quick --repeats 2 --results-dir /tmp/scale-quick   # the tiny check

- `oneshot`: one-shot pruning in memory vs offloaded on synthetic LLaMAs (`benchmarks/scale_oneshot.py`; the flags
  after `--part oneshot` are that script's, e.g. `--models 1b --method magnitude`).

Prints a table and writes `benchmarks/results/scale_<part>.json` with the machine state (cores, load average, threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the benchmarks' shared statistics, also when this file is imported by a test
    sys.path.insert(0, str(HERE))
from paired_stats import paired_ratios  # noqa: E402

RESULTS = HERE / "results"
SETTINGS = {"50%": (0.5, "unstructured"), "2:4": (0.5, "2:4"), "70%": (0.7, "unstructured")}
TARGETS = {"load": 2.0, "save": 3.0, "load_rss": 1.3, "decode_gb_s": 1.0}


# ------------------------------------------------------------------------------------------- machine state
def machine_state() -> dict:
    import torch

    from hf_prune.cpu import machine_state as cpu_state

    return {**cpu_state(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "nice": os.nice(0), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux `clear_refs`). `getrusage`'s `ru_maxrss` would
    not do: a child inherits the parent's peak across fork and exec."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


# ------------------------------------------------------------------------------------------------ io worker
#: Load levers the benchmark can switch off one at a time (`--levers`), to report each one's effect.
LEVERS = {
    "populate": "decoded weights >= 1 MB take zero pages the kernel maps at once (MAP_POPULATE), not one fault per page",
    "parallel": "weights decode on worker threads while from_pretrained converts the next (ParallelDecoder)",
    "release": "the file pages of each decoded group are dropped from the resident set (FilePages, MADV_DONTNEED)",
}


def switch_off(levers: list[str]) -> None:
    """Turns the named load levers off in this process (for the lever rows of the table)."""
    from hf_prune.export import codecs, decoding, quantizer

    if "populate" in levers:
        codecs._POPULATE_BYTES = 1 << 62
    if "parallel" in levers:
        quantizer.HfPruneQuantizer._parallel_decoder = staticmethod(lambda device_map: decoding.ParallelDecoder(0))
    if "release" in levers:
        decoding.FilePages.release = lambda self, tensors: None


def io_worker(op: str, directory: str, shard_size: str | None, out: str | None, levers_off: list[str] = ()) -> dict:
    """One measurement in this fresh process: `load` times `from_pretrained`; `save` loads, then times two saves."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import hf_prune  # noqa: F401  (registers the compressed loader)

    switch_off(levers_off)

    hf_logging.disable_progress_bar()
    _reset_peak_rss()
    before = _rss_bytes()
    peak_before = _peak_rss_bytes()
    wall, cpu = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16)
    result = {"load_s": time.perf_counter() - wall, "load_cpu_s": time.process_time() - cpu,
              "rss_before": before, "peak_rss_before": peak_before,
              "load_peak_rss": _peak_rss_bytes()}
    # transformers leaves dense weights memory-mapped and unread; reading one byte per page of every parameter makes
    # them resident, so `resident_s` is the time until the weights are in memory (decoded ones already are).
    for param in model.parameters():
        flat = param.detach().reshape(-1).view(torch.uint8).numpy()
        int(flat[::4096].sum())
    result["resident_s"] = time.perf_counter() - wall
    result["resident_cpu_s"] = time.process_time() - cpu
    result["resident_peak_rss"] = _peak_rss_bytes()
    if op == "save":
        kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
        times = []
        for i in range(2):  # the first save also pays one-time costs (card template, lazy imports)
            target = Path(out) / f"save{i}"
            wall, cpu = time.perf_counter(), time.process_time()
            model.save_pretrained(target, **kwargs)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
            shutil.rmtree(target)
        result["save_s"], result["save_cpu_s"] = min(times)
    return result


def warm_page_cache(directory: Path) -> float:
    """Reads every file of the checkpoint once, so the timed process finds it in the page cache; returns the seconds.

    Fair to every case alike: the timed load then measures the library's work on bytes already in memory (what a
    second load, or a load right after a download or a save, sees), not whether the OS kept or dropped this file's
    pages since the last round. A slow read here (seconds instead of tens of milliseconds) shows that the pages had
    been dropped."""
    start = time.perf_counter()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - start


def _run_worker(op: str, directory: Path, shard_size: str | None, work: Path, levers_off: list[str] = ()) -> dict:
    warm_s = warm_page_cache(directory)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", op, str(directory), "--out", str(work),
           "--levers-off", ",".join(levers_off)]
    if shard_size:
        cmd += ["--worker-shard-size", shard_size]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise RuntimeError(f"{op} worker failed on {directory}:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "page_cache_warm_s": warm_s}


# ------------------------------------------------------------------------------------------------- io part
def tiny_source(work: Path) -> Path:
    """`--quick`'s source checkpoint: a tiny fp16 LLaMA built from its config (seeded; about 3 MB), so the whole io
    part can be checked end to end in minutes without SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.half().save_pretrained(work / "tiny-source")
    return work / "tiny-source"


def prepare_checkpoints(work: Path, shard_size: str, source: Path | None = None) -> list[dict]:
    """Dense and pruned checkpoints of SmolLM2 (or of `source`), single-file and sharded; each pruned one checked to
    reload bit-equal."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune import MagnitudeConfig, oneshot
    from hf_prune.assets import smollm2_path

    path = smollm2_path() if source is None else source
    cases = []

    def add(setting, model, compressed):
        for sharded in (False, True):
            out = work / f"{setting.replace('%', 'pct').replace(':', '_')}{'-sharded' if sharded else ''}"
            kwargs = {"max_shard_size": shard_size} if sharded else {}
            model.save_pretrained(out, **kwargs)
            files = sorted(out.glob("*.safetensors"))
            loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
            reference = model.state_dict()
            equal = all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
            desc = hf_prune.describe_export(out, verify=False) if compressed else {"codecs": {}}
            cases.append({"setting": setting, "sharded": sharded, "dir": str(out), "files": len(files),
                          "file_bytes": sum(p.stat().st_size for p in files), "bit_equal": equal,
                          "codecs": sorted(set(desc["codecs"].values())),
                          "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())})
            del loaded

    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
    add("dense", dense, compressed=False)
    del dense
    for setting, (sparsity, pattern) in SETTINGS.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
        oneshot(model, MagnitudeConfig(sparsity=sparsity, pattern=pattern), show_progress=False)
        add(setting, model, compressed=True)
        del model
    return cases


#: The ratio the targets are checked on (`meets`): per interleaved round, the setting's time over the dense time of the
#: same round and sharding; the median over rounds. The best-over-best ratio (`*_ratio`) stays beside it.
TARGET_RATIO = "paired median: per round, time / the dense time of the same round and sharding; median over rounds"
PAIRED_KEYS = ("load_s", "load_cpu_s", "resident_s", "resident_cpu_s", "save_s", "save_cpu_s")


def summarize_io(cases: list[dict], runs: dict[int, list], lever_runs: dict[tuple[int, str], list]) -> tuple[list, list]:
    """Rows and lever rows of the io part from the raw round timings (no model involved, so it is unit-tested).

    `runs[i]` holds `(op, result)` of case `i` in round order; `lever_runs[(i, lever)]` the lever loads in round
    order. Best-over-best ratios (`*_ratio`, as before) and paired ratios per round (`paired`, see `TARGET_RATIO`)."""
    rows = []
    for i, case in enumerate(cases):
        loads = [r for op, r in runs[i] if op == "load"]
        saves = [r for op, r in runs[i] if op == "save"]
        rows.append({
            **{k: v for k, v in case.items() if k != "dir"},
            "load_s": min(r["load_s"] for r in loads), "load_cpu_s": min(r["load_cpu_s"] for r in loads),
            "resident_s": min(r["resident_s"] for r in loads),
            "resident_cpu_s": min(r["resident_cpu_s"] for r in loads),
            "resident_peak_rss_above_start": min(r["resident_peak_rss"] - r["rss_before"] for r in loads),
            "save_s": min(r["save_s"] for r in saves), "save_cpu_s": min(r["save_cpu_s"] for r in saves),
            "load_peak_rss_above_start": min(r["load_peak_rss"] - r["rss_before"] for r in loads),
            "rounds": {"load": loads, "save": saves},
            "all_runs": runs[i],
        })
    for row in rows:
        dense = next(r for r in rows if r["setting"] == "dense" and r["sharded"] == row["sharded"])
        row["paired"] = {}
        for key in PAIRED_KEYS:
            row[key.replace("_s", "_ratio")] = row[key] / dense[key]
            op = "save" if key.startswith("save") else "load"
            row["paired"][key] = paired_ratios([r[key] for r in row["rounds"][op]], [r[key] for r in dense["rounds"][op]])
        row["load_rss_over_model"] = row["load_peak_rss_above_start"] / row["model_bytes"]
        row["meets"] = {"load": row["paired"]["resident_s"]["median"] <= TARGETS["load"],
                        "save": row["paired"]["save_s"]["median"] <= TARGETS["save"],
                        "load_rss": row["load_rss_over_model"] <= TARGETS["load_rss"]}
    for row in rows:
        del row["rounds"]  # `all_runs` keeps them (as before)
    levers = []
    dense = next(r for r in rows if r["setting"] == "dense" and not r["sharded"])
    dense_loads = [r for op, r in dense["all_runs"] if op == "load"]
    for (i, lever), loads in lever_runs.items():
        row = next(r for r in rows if r["setting"] == cases[i]["setting"] and not r["sharded"])
        best = min(r["resident_s"] for r in loads)
        rss = min(r["load_peak_rss"] - r["rss_before"] for r in loads) / row["model_bytes"]
        paired = paired_ratios([r["resident_s"] for r in loads], [r["resident_s"] for r in dense_loads])
        levers.append({"setting": cases[i]["setting"], "lever_off": lever, "what": LEVERS[lever],
                       "resident_s": best, "resident_ratio": best / dense["resident_s"],
                       "resident_ratio_paired": paired,
                       "resident_cpu_s": min(r["resident_cpu_s"] for r in loads), "load_rss_over_model": rss,
                       "all_on_resident_ratio": row["resident_ratio"],
                       "all_on_resident_ratio_paired": row["paired"]["resident_s"]["median"],
                       "all_on_rss": row["load_rss_over_model"]})
    return rows, levers


def dense_rounds(rows: list[dict], load_averages: list) -> list[dict]:
    """The dense baseline's times in every round (one file and sharded) beside the load average at the round's start,
    so a baseline that flips between processes shows in the report instead of hiding in a best-of."""
    out = []
    for n, load_average in enumerate(load_averages):
        entry = {"round": n, "load_average": load_average}
        for row in rows:
            if row["setting"] == "dense":
                loads = [r for op, r in row["all_runs"] if op == "load"]
                saves = [r for op, r in row["all_runs"] if op == "save"]
                entry["sharded" if row["sharded"] else "single"] = {
                    "load_s": loads[n]["load_s"], "load_cpu_s": loads[n]["load_cpu_s"],
                    "resident_s": loads[n]["resident_s"], "save_s": saves[n]["save_s"],
                    "page_cache_warm_s": loads[n].get("page_cache_warm_s")}
        out.append(entry)
    return out


def run_io(args) -> dict:
    state_before = machine_state()
    start = time.time()
    work = Path(tempfile.mkdtemp(prefix="hf_prune-scale-io-"))
    try:
        source = tiny_source(work) if args.quick else None
        cases = prepare_checkpoints(work, args.shard_size, source)
        runs = {i: [] for i in range(len(cases))}
        lever_cases = [(i, lever) for i, c in enumerate(cases) if c["setting"] != "dense" and not c["sharded"]
                       for lever in LEVERS]
        lever_runs = {k: [] for k in lever_cases}
        load_averages = []
        for _ in range(args.repeats):  # interleaved: every case once per round, loads then saves, then lever loads
            load_averages.append(list(os.getloadavg()))
            for op in ("load", "save"):
                for i, case in enumerate(cases):
                    runs[i].append((op, _run_worker(op, Path(case["dir"]), args.shard_size if case["sharded"] else None,
                                                    work / "saves")))
            for i, lever in lever_cases:
                lever_runs[(i, lever)].append(_run_worker("load", Path(cases[i]["dir"]), None, work / "saves", [lever]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows, levers = summarize_io(cases, runs, lever_runs)
    return {"part": "io", "model": "tiny synthetic LLaMA (--quick)" if args.quick else "SmolLM2-135M-Instruct",
            "dtype": "float16", "method": "magnitude", "repeats": args.repeats, "shard_size": args.shard_size,
            "targets": TARGETS, "target_ratio": TARGET_RATIO, "rows": rows, "levers": levers,
            "dense_rounds": dense_rounds(rows, load_averages),
            "wall_s": time.time() - start, "machine_before": state_before, "machine_after": machine_state()}


def _paired(p: dict) -> str:
    return f"**{p['median']:.2f}x** ({p['min']:.2f}-{p['max']:.2f})"


def format_io(result: dict) -> str:
    """The io part's markdown (printed, and written beside the JSON)."""
    lines = [f"{result['model']} fp16, {result['repeats']} interleaved rounds of fresh processes (each checkpoint's "
             "files read once before its timed process, so every load starts from the page cache); sharded = "
             f"max_shard_size {result['shard_size']}.",
             "Best: the best of the rounds, over the best dense (as before). Paired: per round, the time over the dense "
             "time of the same round and sharding; median (min-max) over rounds. "
             f"Targets (load until resident <= {TARGETS['load']}x, save <= {TARGETS['save']}x, "
             f"peak RSS <= {TARGETS['load_rss']}x model) are checked on the {result.get('target_ratio', 'best')}.", "",
             "| setting | shards | file MB | load s (best x) | load CPU s (best x) | load + resident s (best x) "
             "| load + resident: paired x | save s (best x) | save: paired x | save CPU s (best x) "
             "| load peak RSS MB (x model bytes) | bit-equal | meets load / save / RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        meets = " / ".join("yes" if r["meets"][k] else "NO" for k in ("load", "save", "load_rss"))
        lines.append(
            f"| {r['setting']} | {r['files']} | {r['file_bytes'] / 1e6:.1f} | {r['load_s']:.2f} ({r['load_ratio']:.2f}x) "
            f"| {r['load_cpu_s']:.2f} ({r['load_cpu_ratio']:.2f}x) | {r['resident_s']:.2f} ({r['resident_ratio']:.2f}x) "
            f"| {_paired(r['paired']['resident_s'])} | {r['save_s']:.2f} ({r['save_ratio']:.2f}x) "
            f"| {_paired(r['paired']['save_s'])} | {r['save_cpu_s']:.2f} ({r['save_cpu_ratio']:.2f}x) "
            f"| {r['load_peak_rss_above_start'] / 1e6:.0f} ({r['load_rss_over_model']:.2f}x) "
            f"| {'yes' if r['bit_equal'] else 'NO'} | {meets} |")
    lines += ["", "The dense baseline in every round (s; one file / sharded; load average at the round's start; "
              "page cache: seconds to read the files before the timed process):",
              "| round | load average | load | load CPU | load + resident | save | page cache read |", "|---|---|---|---|---|---|---|"]
    for d in result.get("dense_rounds", []):
        one, sh = d["single"], d["sharded"]
        cells = [f"{one[k]:.3f} / {sh[k]:.3f}" for k in ("load_s", "load_cpu_s", "resident_s", "save_s")]
        warm = (f"{one['page_cache_warm_s']:.3f} / {sh['page_cache_warm_s']:.3f}"
                if one.get("page_cache_warm_s") is not None else "-")
        lines.append(f"| {d['round']} | {', '.join(f'{x:.2f}' for x in d['load_average'])} | {' | '.join(cells)} | {warm} |")
    lines += ["", "Each lever switched off alone (single file, load until resident; peak RSS x model):",
              "| setting | lever off | load + resident s (best x) | paired x | CPU s | peak RSS (x model) "
              "| all levers on: best x, paired x, RSS |", "|---|---|---|---|---|---|---|"]
    for r in result.get("levers", []):
        lines.append(f"| {r['setting']} | {r['lever_off']} | {r['resident_s']:.2f} ({r['resident_ratio']:.2f}x) "
                     f"| {_paired(r['resident_ratio_paired'])} | {r['resident_cpu_s']:.2f} | {r['load_rss_over_model']:.2f}x "
                     f"| {r['all_on_resident_ratio']:.2f}x, {r['all_on_resident_ratio_paired']:.2f}x, {r['all_on_rss']:.2f}x |")
    m0, m1 = result["machine_before"], result["machine_after"]
    lines += ["", f"machine: {m0['cpus']} CPUs ({m0['cpu_model']}), load average {m0['load_average']} before, "
              f"{m1['load_average']} after; torch threads {m0['torch_threads']}; OMP_NUM_THREADS {m0['OMP_NUM_THREADS']}; "
              f"nice {m0['nice']}; wall {result['wall_s']:.0f} s"]
    return "\n".join(lines)


def print_io(result: dict) -> None:
    print(format_io(result))


# ----------------------------------------------------------------------------------------------- decode part
SYNTHETIC_1B = dict(hidden=2048, intermediate=5632, layers=22, kv_heads=4, head_dim=64)  # scale_oneshot's "1b" shape


def _pruned(weight, sparsity: float, pattern: str):
    """`weight` magnitude-pruned like `MagnitudeConfig` does (per-matrix threshold, or 2 of every 4 kept)."""
    import torch

    if pattern == "2:4":
        groups = weight.reshape(weight.shape[0], -1, 4)
        keep = groups.abs().float().topk(2, dim=-1).indices
        return torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(weight.shape)
    k = int(weight.numel() * sparsity)
    threshold = weight.abs().float().reshape(-1).kthvalue(k).values
    return torch.where(weight.abs().float() > threshold, weight, torch.zeros_like(weight))


def _weight_sets(model: str, setting: str) -> list[tuple[str, dict, int]]:
    """`[(name, encoded group, times decoded)]`: SmolLM2-135M's real pruned weights, or the Linear weights of the
    1B synthetic LLaMA (one random fp16 weight per distinct shape, decoded once per layer: 22 x 7 weights)."""
    import torch

    from hf_prune.export.formats import compress_tensors

    sparsity, pattern = SETTINGS[setting]
    if model == "smollm2-135m":
        from transformers import AutoModelForCausalLM

        from hf_prune.assets import smollm2_path

        dense = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float16)
        weights = {k: v for k, v in dense.state_dict().items() if k.endswith("proj.weight")}
        repeat = 1
    else:
        h, i, kv = SYNTHETIC_1B["hidden"], SYNTHETIC_1B["intermediate"], SYNTHETIC_1B["kv_heads"] * SYNTHETIC_1B["head_dim"]
        gen = torch.Generator().manual_seed(0)
        shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (i, h),
                  "up_proj": (i, h), "down_proj": (h, i)}
        weights = {f"{n}.weight": (torch.randn(*shape, generator=gen) * 0.02).half() for n, shape in shapes.items()}
        repeat = SYNTHETIC_1B["layers"]
    layout = "2:4" if pattern == "2:4" else "unstructured"
    compressed, _ = compress_tensors({k: _pruned(v, sparsity, pattern) for k, v in weights.items()}, layout)
    from hf_prune.export.shards import tensor_groups

    sets = []
    for base, keys in tensor_groups(compressed).items():
        sets.append((base, {k[len(base):]: compressed[k] for k in keys}, repeat))
    return sets


def decode_worker(model: str, setting: str, repeats: int, levers_off: list[str]) -> dict:
    """Decode throughput on one core in this fresh process: every weight decoded into fresh memory, best of
    `repeats` passes (CPU and wall seconds). The outputs of a pass stay alive until it ends, as a load keeps them
    (so their pages are fresh ones, as in a load, not the freed pages of the previous weight)."""
    import torch

    torch.set_num_threads(1)  # one core: the library splits nothing and starts no decode threads
    from hf_prune.export.codecs import decode

    switch_off(levers_off)
    sets = _weight_sets(model, setting)
    dense_bytes = sum(g[""].element_size() * math.prod(g["_hf_prune_meta"][:2].tolist()) * r for _, g, r in sets)
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        kept = [decode(name, group) for name, group, times in sets for _ in range(times)]  # kept, as a load keeps them
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
        del kept
    return {"weights": sum(r for _, _, r in sets), "decoded_bytes": dense_bytes, "wall_s": best[0], "cpu_s": best[1],
            "gb_per_s_wall": dense_bytes / best[0] / 1e9, "gb_per_s_cpu": dense_bytes / best[1] / 1e9}


def run_decode(args) -> dict:
    state_before = machine_state()
    start = time.time()
    rows = []
    for model in ("smollm2-135m", "synthetic-1b"):
        for setting in SETTINGS:
            for off in ([], ["populate"]):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--decode-worker", model, setting,
                       "--repeats", str(args.repeats), "--levers-off", ",".join(off)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                      env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
                if proc.returncode != 0:
                    raise RuntimeError(f"decode worker failed ({model} {setting}):\n{proc.stderr[-3000:]}")
                rows.append({"model": model, "setting": setting, "levers_off": off,
                             **json.loads(proc.stdout.strip().splitlines()[-1])})
    return {"part": "decode", "dtype": "float16", "repeats": args.repeats, "target_gb_per_s": TARGETS["decode_gb_s"],
            "rows": rows, "wall_s": time.time() - start, "machine_before": state_before, "machine_after": machine_state()}


def print_decode(result: dict) -> None:
    print(f"Decode throughput on one core (torch.set_num_threads(1)), fp16, best of {result['repeats']} passes in a "
          "fresh process; GB of decoded (dense) weights per second")
    print("| model | setting | weights | decoded GB | levers off | CPU s | GB/s (CPU) | GB/s (wall) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['model']} | {r['setting']} | {r['weights']} | {r['decoded_bytes'] / 1e9:.2f} "
              f"| {', '.join(r['levers_off']) or '-'} | {r['cpu_s']:.3f} | {r['gb_per_s_cpu']:.2f} | {r['gb_per_s_wall']:.2f} |")
    m0, m1 = result["machine_before"], result["machine_after"]
    print(f"\nmachine: {m0['cpus']} CPUs ({m0['cpu_model']}), load average {m0['load_average']} before, "
          f"{m1['load_average']} after; nice {m0['nice']}; wall {result['wall_s']:.0f} s")


# ------------------------------------------------------------------------------------------------------ main
PARTS = {"io": (run_io, print_io), "decode": (run_decode, print_decode)}  # `oneshot` has its own flags and results file: benchmarks/scale_oneshot.py


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=[*PARTS, "oneshot", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", default=None,
                        help="max_shard_size of the sharded checkpoints (default 100MB; 1MB with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="io part on a tiny synthetic LLaMA (a check of the benchmark itself, minutes); writes "
                             "scale_io_quick.{json,md}")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and markdown go")
    parser.add_argument("--worker", nargs=2, metavar=("OP", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-shard-size", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--decode-worker", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--levers-off", default="", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--part", "oneshot"] or "--part=oneshot" in argv[:1]:  # that part's flags are its script's
        import scale_oneshot

        return scale_oneshot.main(["--part", "oneshot", *argv[1 if argv[0].startswith("--part=") else 2:]])
    args = parser.parse_args(argv)
    if args.quick and args.part != "io":
        parser.error(f"--quick is for --part io only (got --part {args.part})")
    if args.shard_size is None:
        args.shard_size = "1MB" if args.quick else "100MB"
    levers_off = [x for x in args.levers_off.split(",") if x]
    if args.worker:
        print(json.dumps(io_worker(args.worker[0], args.worker[1], args.worker_shard_size, args.out, levers_off)))
        return None
    if args.decode_worker:
        print(json.dumps(decode_worker(*args.decode_worker, args.repeats, levers_off)))
        return None
    results = {}
    for name, (run, show) in PARTS.items():
        if args.part not in (name, "all"):
            continue
        results[name] = run(args)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"scale_{name}{'_quick' if args.quick else ''}"
        path = args.results_dir / f"{stem}.json"
        path.write_text(json.dumps(results[name], indent=2) + "\n")
        show(results[name])
        print(f"JSON: {path}")
        if name == "io":
            command = "python benchmarks/scale.py " + " ".join(argv)
            (args.results_dir / f"{stem}.md").write_text(
                f"# {command}\n\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n{format_io(results[name])}\n")
            print(f"markdown: {args.results_dir / f'{stem}.md'}")
    if args.part == "all" and not args.quick:
        import scale_oneshot

        scale_oneshot.main(["--part", "oneshot"])
    return results


if __name__ == "__main__":
    main()
