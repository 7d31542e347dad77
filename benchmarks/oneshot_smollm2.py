"""One-shot pruning benchmark on SmolLM2-135M: every method at 50/60/70 % unstructured and 2:4.

Protocol: calibration = 64 windows of 512 tokens from the calibration articles of `hf_prune.assets.wikipedia_split()`
(seed 0, the same windows for every method); perplexity on non-overlapping 512-token windows of the held-out
articles (at least 16k tokens). Each run is a fresh subprocess, so its wall time and peak RSS are its own.
Prints a markdown table and writes JSON (resumable: runs already in the JSON are skipped).

    python benchmarks/oneshot_smollm2.py                      # the full grid
    python benchmarks/oneshot_smollm2.py --methods admm sparsegpt --settings 0.6 2:4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

from hf_prune.cpu import machine_state
from subprocess_rows import run_in_subprocess  # noqa: E402  (a sibling in benchmarks/, on the path when run as a script)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "oneshot_smollm2.json"
METHODS = ["magnitude", "wanda", "sparsegpt", "admm", "admm_bf16", "admm_bf16_10it"]
# benchmark names for a method with non-default options: name -> (method, config fields); the last one is the
# ADMM / SparseGPT wall-ratio lever of issue 29 (half the iterations), whose quality this benchmark measures
VARIANTS = {"admm_bf16": ("admm", {"matmul_precision": "bfloat16"}),
            "admm_bf16_10it": ("admm", {"matmul_precision": "bfloat16", "iterations": 10, "mask_iterations": 8})}
SETTINGS = ["0.5", "0.6", "0.7", "2:4"]
RUN_ORDER = ["0.6", "0.7", "2:4", "0.5"]  # the settings the targets hinge on first, so partial results are useful
CPU_LOCK = "/tmp/hf_prune_cpu.lock"  # one heavy job at a time on a shared machine keeps timings honest


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def prepare(workdir: Path, calib_samples: int, seq_len: int, eval_windows: int) -> dict:
    """Tokenises the calibration and evaluation sets once; every run reads the same tensors."""
    import torch
    from transformers import AutoTokenizer

    from hf_prune.assets import smollm2_path, wikipedia_split
    from hf_prune.oneshot.calibration import calibration_windows, tokenize_texts

    model_path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    calib_texts, eval_texts = wikipedia_split()
    calib = calibration_windows(calib_texts, tokenizer, num_samples=calib_samples, seq_len=seq_len, seed=0)
    eval_ids = tokenize_texts(eval_texts, tokenizer)
    n_windows = min(eval_windows, eval_ids.numel() // seq_len)
    eval_ids = eval_ids[: n_windows * seq_len]
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save({"calibration": calib, "evaluation": eval_ids}, workdir / "data.pt")
    return {"model_path": model_path, "calibration_windows": list(calib.shape), "eval_tokens": int(eval_ids.numel())}


def run_one(method: str, setting: str, workdir: Path, model_path: str, seq_len: int, device: str = "cpu") -> dict:
    """Runs in a subprocess: load, prune, measure wall time + peak RSS (and peak GPU memory), then perplexity."""
    import torch
    from transformers import AutoModelForCausalLM

    from hf_prune import get_config_class, oneshot
    from hf_prune.evaluation import perplexity

    data = torch.load(workdir / "data.pt")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    result = {"method": method, "setting": setting, "model_fp32_mb": round(model_mb, 1), "device": device,
              "threads": torch.get_num_threads()}
    if method != "dense":
        kwargs = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
        base, options = VARIANTS.get(method, (method, {}))
        config = get_config_class(base)(
            **kwargs, **options, num_calibration_samples=data["calibration"].shape[0], max_seq_length=seq_len
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        rss_loaded = _rss_mb()
        started, cpu_started = time.perf_counter(), _cpu_seconds()
        oneshot(model, config, calibration=data["calibration"], show_progress=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["prune_time_s"] = round(time.perf_counter() - started, 1)
        # CPU seconds (all threads) are what the comparison rests on when other work shares the machine.
        result["prune_cpu_s"] = round(_cpu_seconds() - cpu_started, 1)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result.update(
            peak_rss_mb=round(peak, 1),
            rss_after_load_mb=round(rss_loaded, 1),
            peak_over_model=round(peak / model_mb, 2),
        )
        linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        zeros = sum(int((m.weight == 0).sum()) for m in linear)
        result["achieved_sparsity"] = round(zeros / sum(m.weight.numel() for m in linear), 4)
    result["perplexity"] = round(
        perplexity(model, input_ids=data["evaluation"], seq_len=seq_len, batch_size=4, show_progress=False), 3
    )
    return result


def table(results: list[dict]) -> str:
    dense = next((r for r in results if r["method"] == "dense"), None)
    lines = []
    if dense:
        lines.append(f"Dense perplexity: **{dense['perplexity']:.2f}**\n")
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in results)]
    header = "| method | " + " | ".join(f"{s if ':' in s else str(int(float(s) * 100)) + ' %'} ppl" for s in settings)
    lines.append(header + " | " + " | ".join(f"{s} wall s / CPU s / peak RSS" for s in settings) + " |")
    lines.append("|" + "---|" * (1 + 2 * len(settings)))
    for method in METHODS:
        rows = {r["setting"]: r for r in results if r["method"] == method}
        if not rows:
            continue
        ppl = [f"{rows[s]['perplexity']:.2f}" if s in rows else "–" for s in settings]
        cost = [
            f"{rows[s]['prune_time_s']:.0f} / {rows[s].get('prune_cpu_s', float('nan')):.0f} / "
            f"{rows[s]['peak_over_model']:.2f}×" if s in rows else "–"
            for s in settings
        ]
        lines.append(f"| {method} | " + " | ".join(ppl) + " | " + " | ".join(cost) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--settings", nargs="+", default=SETTINGS)
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32, help="512-token evaluation windows (32 = 16,384 tokens)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=HERE / "results" / ".oneshot_work")
    parser.add_argument("--device", default="cpu", help="where to prune and evaluate (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--plot", action="store_true",
                        help="at the end, draw perplexity vs sparsity from --out (benchmarks/plots.py; needs matplotlib)")
    parser.add_argument("--run-one", nargs=2, metavar=("METHOD", "SETTING"), help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run_one:
        print(json.dumps(run_one(*args.run_one, args.workdir, args.model_path, args.seq_len, args.device)))
        return

    report = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    meta = prepare(args.workdir, args.calibration_samples, args.seq_len, args.eval_windows)
    report["protocol"] = {
        **{k: v for k, v in meta.items() if k != "model_path"},
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "calibration": "wikipedia_split() calibration articles, random non-overlapping 512-token windows, seed 0",
        "evaluation": "wikipedia_split() held-out articles, non-overlapping 512-token windows",
        "machine": f"{os.cpu_count()} CPU cores, torch threads = {os.environ.get('OMP_NUM_THREADS', 'default')}"
        + (f", device {args.device}" if args.device != "cpu" else ""),
    }
    report["machine_state"] = machine_state()
    done = {(r["method"], r["setting"]) for r in report["runs"]}
    settings = sorted(args.settings, key=lambda s: RUN_ORDER.index(s) if s in RUN_ORDER else len(RUN_ORDER))
    grid = [("dense", "-")] + [(m, s) for s in settings for m in reversed(args.methods)]
    for method, setting in grid:
        if (method, setting) in done:
            continue
        print(f"running {method} {setting} ...", flush=True)
        lock = ["flock", CPU_LOCK] if shutil.which("flock") else []
        report["runs"].append(run_in_subprocess(
            lock + [sys.executable, __file__, "--run-one", method, setting, "--workdir", str(args.workdir),
                    "--model-path", meta["model_path"], "--seq-len", str(args.seq_len), "--device", args.device],
            f"run {method} {setting}", stderr_tail=3000))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["runs"]))
    if args.plot:
        from plots import plot_after_run

        print(f"plot: {plot_after_run('oneshot', args.out)}")


if __name__ == "__main__":
    main()
