"""Scale benchmark, part `oneshot` (run through `benchmarks/scale.py --part oneshot ...` or directly): one-shot pruning in memory vs offloaded (block by block from disk), on synthetic LLaMAs.

Synthetic models are built from a config with random weights and SmolLM2's vocabulary (49152), saved once as fp16
safetensors under `$HF_PRUNE_CACHE/synthetic/` (not in the repository). Each run is its own subprocess; its peak RSS
(VmHWM) is reported above the RSS it had after the imports (the "import baseline"), and over the fp16 model bytes.

    python benchmarks/scale.py --part oneshot                    # the 1B offloaded point + the in-memory comparison
    python benchmarks/scale.py --part oneshot --models 100m --calibration random   # a quick check
    python benchmarks/scale.py --part oneshot --models 1b --method admm sparsegpt --repeats 1   # issue 29's ratio

The 1B in-memory run (fp32: 4.3 GB of weights) does not fit the per-process budget of the shared machine, so the
in-memory / offloaded wall-time comparison runs on the smaller synthetic model, side by side, interleaved.

Calibration (`--calibration articles`, the default): the one-shot benchmark's, 64 windows of 512 tokens of the
calibration articles of `hf_prune.assets.wikipedia_split()` tokenised by SmolLM2's tokenizer (seed 0), for the
models with SmolLM2's vocabulary; `--calibration random` draws token ids (any vocabulary, e.g. the 100m model).
With several `--method`s, each round runs them in turn and the table gives each method's wall over the first's
(`--method admm sparsegpt`: ADMM / SparseGPT).

Offloaded runs are resumable: each writes into `WORKDIR/MODEL-offload-METHOD`, and a benchmark killed during one
leaves its finished blocks beside it (`.MODEL-offload-METHOD.hf_prune-partial`); rerunning the same command continues
that run at its next block (the row then says `resumed at block N`, its `wall_s` is that process's and
`pruning_s_all_sessions` the pruning time over every session). `--restart` discards such a run instead.

Levers and probes: `--set KEY=VALUE` (repeatable) overrides a field of the method's config (e.g.
`--set matmul_precision=bfloat16` for ADMM; such a run writes into its own `WORKDIR/MODEL-offload-METHOD-KEY-VALUE`),
and `--probe-blocks N` times only the first N blocks of the real offloaded run: the benchmark stops the run once its
resume record counts N finished blocks and records a `offload-probe` row with the seconds per block and the
whole-run estimate (seconds per block x blocks). The partial run is kept, so the same command without
`--probe-blocks` finishes it. Used for the ADMM / SparseGPT ratio in the same machine state as a finished run:

    OMP_NUM_THREADS=1 python benchmarks/scale_oneshot.py --part oneshot --models 1b --method admm --probe-blocks 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from hf_prune.cpu import machine_state

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "scale_oneshot.json"

# name -> LlamaConfig fields. "1b": TinyLlama-1.1B's shape with SmolLM2's vocabulary and tied embeddings.
SYNTHETIC = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=49152),
    "300m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=49152),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=8192),
}


def synthetic_llama(path: Path, **shape) -> Path:
    """A LLaMA checkpoint with random weights, in fp16 safetensors, built once (reused when complete)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True)
    model = LlamaForCausalLM._from_config(config, dtype=torch.float16)  # initialised in fp16: no fp32 copy
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    return path


def synthetic_path(name: str) -> Path:
    from hf_prune.assets import cache_dir

    return synthetic_llama(cache_dir() / "synthetic" / f"llama-{name}", **SYNTHETIC[name])


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def article_windows(samples: int, seq_len: int, workdir: Path) -> Path:
    """The one-shot benchmark's calibration token windows, tokenised once and saved under `workdir`."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    from hf_prune.assets import smollm2_path, wikipedia_split
    from hf_prune.oneshot.calibration import calibration_windows

    path = workdir / f"calibration-articles-{samples}x{seq_len}.safetensors"
    if path.is_file() and tuple(load_file(path)["windows"].shape) == (samples, seq_len):
        return path
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    windows = calibration_windows(wikipedia_split()[0], tokenizer, num_samples=samples, seq_len=seq_len, seed=0)
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({"windows": windows.to(torch.int64).contiguous()}, str(path))
    return path


def run_oneshot(path: str, mode: str, method: str, sparsity: float, samples: int, seq_len: int, out: str,
                calibration_source: str = "random", restart: bool = False, overrides: dict | None = None) -> dict:
    """In a fresh process: prune `path` in memory (load, prune, save) or offloaded; wall time and peak RSS.
    `calibration_source`: "random" (token ids drawn with seed 0) or a file of windows (`article_windows`)."""
    import shutil

    import accelerate.utils  # noqa: F401  (imported before the baseline: the offloaded run uses it)
    import safetensors.torch  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import hf_prune.export.card
    import hf_prune.export.shards
    import hf_prune.oneshot.offload  # noqa: F401
    from hf_prune import get_config_class, oneshot

    from hf_prune.oneshot.resume import RECORD, partial_dir

    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    if calibration_source == "random":
        generator = torch.Generator().manual_seed(0)
        calibration = torch.randint(0, vocab, (samples, seq_len), generator=generator)
    else:
        from safetensors.torch import load_file

        calibration = load_file(calibration_source)["windows"]
        if int(calibration.max()) >= vocab:
            raise SystemExit(f"{path}: vocabulary {vocab} is smaller than the calibration articles' token ids (SmolLM2's "
                             "tokenizer); use --calibration random for this model")
    config = get_config_class(method)(sparsity=sparsity, num_calibration_samples=samples, max_seq_length=seq_len,
                                      **(overrides or {}))
    shutil.rmtree(out, ignore_errors=True)  # a finished export of an earlier round; an interrupted run is kept
    record = partial_dir(Path(out).resolve()) / RECORD
    resumed_at = None if restart or not record.is_file() else json.loads(record.read_text()).get("blocks_done")
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    if mode == "offload":
        oneshot(path, config, calibration=calibration, offload_dir=out, device="cpu", show_progress=False,
                restart=restart)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        oneshot(model, config, calibration=calibration, show_progress=False)
        model.save_pretrained(out)
    wall = time.perf_counter() - started
    peak = _status_mb("VmHWM")
    model_bytes = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    out_bytes = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    metrics = json.loads((Path(out) / "config.json").read_text())["quantization_config"]["pruning"]["metrics"]
    return {
        "mode": mode, "method": method, "sparsity": sparsity, "wall_s": round(wall, 1),
        "pruning_s_all_sessions": metrics.get("pruning_time_s"), "resumed_at_block": resumed_at,
        "calibration_source": "random token ids" if calibration_source == "random" else "calibration articles",
        "baseline_rss_mb": round(baseline, 1), "peak_rss_mb": round(peak, 1),
        "peak_above_baseline_mb": round(peak - baseline, 1), "model_fp16_mb": round(model_bytes / 2**20, 1),
        "peak_above_baseline_over_model": round((peak - baseline) * 2**20 / model_bytes, 3),
        "output_mb": round(out_bytes / 2**20, 1), "calibration": [samples, seq_len],
        "threads": torch.get_num_threads(), **({"overrides": overrides} if overrides else {}),
    }


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"run {args} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_subprocess(args: list[str], out: Path, blocks: int, poll_s: float = 2.0) -> dict:
    """Run an offloaded one-shot in a subprocess and stop it once its resume record counts `blocks` finished blocks;
    the record's own clock (`elapsed_s`, the pruning time over every session) gives the seconds per block."""
    from hf_prune.oneshot.resume import RECORD, partial_dir

    record = partial_dir(out.resolve()) / RECORD
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    state = {}
    while proc.poll() is None:
        time.sleep(poll_s)
        try:
            state = json.loads(record.read_text())
        except (OSError, ValueError):  # not written yet, or being replaced
            continue
        if state.get("blocks_done", 0) >= blocks:
            proc.terminate()
            proc.wait()
            break
    if not state.get("blocks_done"):
        raise SystemExit(f"probe {args} ended before its first block: {proc.stderr.read()[-3000:]}")
    per_block = state["elapsed_s"] / state["blocks_done"]
    return {"blocks_done": state["blocks_done"], "num_blocks": state["num_blocks"],
            "elapsed_s": round(state["elapsed_s"], 1), "s_per_block": round(per_block, 1),
            "estimated_whole_run_s": round(per_block * state["num_blocks"], 1)}


def parse_overrides(pairs: list[str]) -> dict:
    """`KEY=VALUE` pairs into config overrides; a value is read as JSON where it parses (numbers, booleans)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE, e.g. --set matmul_precision=bfloat16")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def check_overrides(methods: list[str], overrides: dict, sparsity: float) -> None:
    """Build each method's config with the overrides before any work, so a wrong field or value fails here, by name."""
    from hf_prune import get_config_class

    for method in methods:
        try:
            get_config_class(method)(sparsity=sparsity, **overrides)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--set {overrides} does not suit the {method} config: {error}") from None


def oneshot_part(args) -> list[dict]:
    """The offloaded point on each model; in memory vs offloaded side by side on the models that fit."""
    rows = []
    work = Path(args.workdir)
    source = "random"
    if args.calibration == "articles":
        source = str(article_windows(args.samples, args.seq_len, work))
    overrides = parse_overrides(args.set)
    check_overrides(args.method, overrides, args.sparsity)
    suffix = "".join(f"-{k}-{v}" for k, v in sorted(overrides.items()))

    def out_dir(name: str, mode: str, method: str) -> Path:  # a lever's run has its own (and its own partial run)
        return work / f"{name}-{mode}-{method}{suffix}"

    def run_one(name: str, mode: str, method: str) -> list[str]:  # the subprocess's `--run-one` arguments
        return ["--run-one", str(synthetic_path(name)), mode, method, str(args.sparsity), str(args.samples),
                str(args.seq_len), str(out_dir(name, mode, method)), source, str(int(args.restart)),
                json.dumps(overrides)]

    if args.probe_blocks:
        for name in args.models:
            for method in args.method:
                print(f"oneshot {name} offload {method}{suffix}: probe of the first {args.probe_blocks} blocks ...",
                      flush=True)
                result = _probe_subprocess(run_one(name, "offload", method), out_dir(name, "offload", method),
                                           args.probe_blocks)
                result.update(mode="offload-probe", method=method, model=name, sparsity=args.sparsity,
                              calibration=[args.samples, args.seq_len], threads_env=os.environ.get("OMP_NUM_THREADS"),
                              load_average=os.getloadavg(), **({"overrides": overrides} if overrides else {}))
                print("   ", result, flush=True)
                rows.append(result)
        return rows
    for name in args.models:
        modes = ["offload"] if name in args.offload_only else ["memory", "offload"]
        for repeat in range(args.repeats if len(modes) > 1 or len(args.method) > 1 else 1):
            for method in args.method:
                for mode in modes:  # interleaved, so that load on the shared machine hits both alike
                    print(f"oneshot {name} {mode} {method} (round {repeat + 1}) ...", flush=True)
                    result = _subprocess(run_one(name, mode, method))
                    result.update(model=name, round=repeat + 1)
                    print("   ", result, flush=True)
                    rows.append(result)
    return rows


#: issue 29's targets: offloaded peak RSS above the import baseline over the fp16 checkpoint; ADMM / SparseGPT wall
PEAK_TARGET, ADMM_RATIO_TARGET = 0.4, 1.3


def whole_run_s(row: dict) -> float:
    """The run's wall time; for a resumed run (whose process saw only the last blocks) its pruning time over every
    session, the closest whole-run figure recorded."""
    return row["wall_s"] if row.get("resumed_at_block") is None else row.get("pruning_s_all_sessions") or row["wall_s"]


def oneshot_table(rows: list[dict]) -> str:
    lines = ["| model | mode | method | calibration | wall s | peak RSS above import baseline MB | ÷ fp16 model bytes "
             "| output MB |", "|---|---|---|---|---|---|---|---|"]
    probes = [r for r in rows if r["mode"] == "offload-probe"]
    rows = [r for r in rows if r["mode"] != "offload-probe"]
    for r in rows:
        resumed = "" if r.get("resumed_at_block") is None else (
            f" (resumed at block {r['resumed_at_block']}; {r['pruning_s_all_sessions']} s pruning, all sessions)")
        over = " (over the 0.4x target)" if r["mode"] == "offload" and r["peak_above_baseline_over_model"] > PEAK_TARGET else ""
        lines.append(f"| {r['model']} ({r['model_fp16_mb']:.0f} MB fp16) | {r['mode']} | {r['method']} "
                     f"{r['sparsity']:g} | {'x'.join(map(str, r['calibration']))} {r.get('calibration_source', 'random token ids')} "
                     f"| {r['wall_s']:.1f}{resumed} | {r['peak_above_baseline_mb']:.0f} | "
                     f"{r['peak_above_baseline_over_model']:.3f}{over} | {r['output_mb']:.0f} |")
    for r in probes:
        lever = ", ".join(f"{k}={v}" for k, v in r.get("overrides", {}).items()) or "defaults"
        lines.append(f"\n{r['model']} offloaded {r['method']} ({lever}), first {r['blocks_done']} of {r['num_blocks']} "
                     f"blocks: {r['s_per_block']} s a block, whole run about {r['estimated_whole_run_s']} s "
                     f"(load average {r['load_average'][0]:.2f})")
    by = {}
    for r in rows:
        if r.get("overrides"):
            continue  # a lever's run is not the method's default row of the ratio
        by.setdefault(r["model"], {}).setdefault(r["mode"], {}).setdefault(r["method"], []).append(whole_run_s(r))
    for model, modes in by.items():
        memory, offload = modes.get("memory", {}), modes.get("offload", {})
        for method in sorted(set(memory) & set(offload)):
            ratio = min(offload[method]) / min(memory[method])
            lines.append(f"\n{model} {method}: offloaded / in-memory wall (best of {len(memory[method])}): {ratio:.2f}x")
        for mode, methods in modes.items():
            if "admm" in methods and "sparsegpt" in methods:
                ratio = min(methods["admm"]) / min(methods["sparsegpt"])
                lines.append(f"\n{model} {mode}: ADMM / SparseGPT whole-run wall (best of {len(methods['admm'])} / "
                             f"{len(methods['sparsegpt'])}): {ratio:.2f}x (target <= {ADMM_RATIO_TARGET}x)")
    return "\n".join(lines)


PARTS = {"oneshot": (oneshot_part, oneshot_table)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--models", nargs="+", default=["300m", "1b"], choices=list(SYNTHETIC))
    parser.add_argument("--offload-only", nargs="*", default=["1b"], help="models run offloaded only (too big in memory)")
    parser.add_argument("--method", nargs="+", default=["wanda"],
                        help="one or more methods, run in turn each round (admm sparsegpt: their wall ratio)")
    parser.add_argument("--calibration", choices=["articles", "random"], default="articles",
                        help="articles: the one-shot benchmark's windows of the calibration articles (SmolLM2's "
                             "vocabulary); random: token ids drawn with seed 0")
    parser.add_argument("--restart", action="store_true",
                        help="discard interrupted offloaded runs in --workdir instead of continuing them")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", default=str(HERE / "results" / ".scale_work"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the method's config (repeatable), e.g. matmul_precision=bfloat16")
    parser.add_argument("--probe-blocks", type=int, default=0,
                        help="offloaded runs only: time the first N blocks, then stop (the partial run is kept)")
    parser.add_argument("--run-one", nargs=10, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        path, mode, method, sparsity, samples, seq_len, out, source, restart, overrides = args.run_one
        print(json.dumps(run_oneshot(path, mode, method, float(sparsity), int(samples), int(seq_len), out, source,
                                     bool(int(restart)), json.loads(overrides))))
        return
    parts = list(PARTS) if args.part == "all" else [args.part]
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["machine"] = f"{os.cpu_count()} CPU cores (shared with other jobs), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'default')}"
    report["machine_state"] = machine_state()
    for part in parts:
        run, table = PARTS[part]
        rows = run(args)
        for row in rows:
            row["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        # a re-run replaces the rows of the same model, mode and method and keeps the others
        def key(r):
            return r["model"], r["mode"], r["method"], json.dumps(r.get("overrides", {}), sort_keys=True)

        fresh = {key(r) for r in rows}
        report[part] = [r for r in report.get(part, []) if key(r) not in fresh] + rows
        print(table(report[part]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
