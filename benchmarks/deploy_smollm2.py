"""SmolLM2-135M dense vs ADMM 2:4 exported to ONNX Runtime: greedy generation tokens/s with the KV cache.

    python benchmarks/deploy_smollm2.py                 # prune once, export both, check, 3 timing rounds
    python benchmarks/deploy_smollm2.py --rounds 5      # more rounds: continues the recorded ones

Wall time on the 2 shared cores at load average ~10 (2026-12-03): pruning 28 min (once, one thread; ~4 min on an
idle machine), exports 2 x 105 s, the greedy check ~3 min, then ~7 min per round (the 2-thread eager cells, at
under 1 token/s on an oversubscribed machine, are most of it).

What it shows, measured: a 2:4 (or unstructured) sparse model stores its zeros as ordinary fp32 weights in the ONNX
graph and ONNX Runtime's CPU kernels multiply them like any other, so sparsity alone brings no speed-up (ratio ~1);
structured pruning (CoFi: `benchmarks/cofi_minilm.py`) or int8 is what makes a model faster on CPU.

Steps, each skipped when its output is already there (so an interrupted run continues):
1. prune: the README's one-shot recipe (`integrations/oneshot_smollm2.py --pattern 2:4`, ADMM, 64 calibration
   windows) into `WORK/smollm2-admm-24` (compressed export with its card and perplexities);
2. export: `hf_prune.export_onnx` of the dense asset and of the pruned checkpoint, with the KV cache, default checks;
3. check: for every prompt, `OnnxModel.generate` (greedy, ONNX Runtime) returns exactly the tokens of PyTorch's
   `model.generate(do_sample=False)`, for both models;
4. time: the same prompts, one at a time (batch 1), exactly `--new-tokens` new tokens (end-of-sequence ignored),
   in ONNX Runtime and eager PyTorch at each thread count; every round times every cell, dense and sparse back to
   back in alternating order; each finished round is written to the JSON, and the table keeps the best round.

Prints a markdown table and writes `benchmarks/results/deploy_smollm2[_LABEL].{json,md}`. The machine is shared:
the JSON records the load average around every round; read the sparse/dense ratios (measured side by side), not
the absolute tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_WORK = HERE / "results" / ".deploy_work"
RUNTIMES = ("onnxruntime", "eager")
MODELS = ("dense", "admm-2:4")
PROMPTS = [
    "The history of the Roman Empire",
    "Photosynthesis is the process by which plants",
    "Write a short story about a robot who learns to paint.",
    "The three most important rules of cooking are",
    "In mathematics, a prime number is",
    "Paris is the capital of France. Its most famous landmark",
]
PROTOCOL_KEYS = ("new_tokens", "prompts", "threads", "runtimes", "dense", "sparse")


def machine_state() -> dict:
    """What else the shared machine was doing (load average, cores, available memory) and its CPU features."""
    from hf_prune.cpu import machine_state as cpu_state

    state = cpu_state()
    return dict(state, loadavg=state["load_average"], time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def prune(output: Path, num_samples: int) -> None:
    """The README's one-shot recipe at 2:4, in its own process (its perplexities go into the checkpoint's card)."""
    cmd = [sys.executable, str(ROOT / "integrations" / "oneshot_smollm2.py"), "--pattern", "2:4",
           "--num-samples", str(num_samples), "--output", str(output)]
    print("pruning:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def export(source: str, out: Path) -> dict:
    """`hf_prune.export_onnx` with the KV cache and the default checks; an existing export is reused."""
    from hf_prune.deploy import export_onnx

    report_file = out / "hf_prune_export.json"
    if (out / "model.onnx").is_file() and report_file.is_file():
        return json.loads(report_file.read_text())
    started = time.perf_counter()
    report = export_onnx(source, out, task="text-generation", overwrite=True)
    record = {"source": str(source), "wall_s": round(time.perf_counter() - started, 1),
              "verification": report.verification, "logit_tolerance": report.logit_tolerance,
              "onnx_mb": round(sum(f.stat().st_size for f in out.glob("model.onnx*")) / 2**20, 1)}
    report_file.write_text(json.dumps(record, indent=2))
    return record


def linear_sparsity(model) -> float:
    """Fraction of exact zeros in the Linear weights of the transformer blocks (what 2:4 prunes)."""
    import torch

    zeros = total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
    return zeros / total


def greedy_torch(model, ids, new_tokens: int, fixed: bool):
    """PyTorch greedy `generate`; `fixed`: exactly `new_tokens` tokens (no end-of-sequence stop)."""
    import copy

    import torch

    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.max_new_tokens = False, new_tokens
    # None in the config alone falls back to the model's eos id; the explicit keyword switches the stop off
    stop = {"eos_token_id": None} if fixed else {}
    if fixed:
        config.eos_token_id = None
    with torch.no_grad():
        return model.generate(torch.as_tensor(ids), attention_mask=torch.ones_like(torch.as_tensor(ids)),
                              generation_config=config, **stop).numpy()


def time_cell(run, prompts, new_tokens: int) -> float:
    """Tokens/s of generating `new_tokens` for every prompt in turn (prefill included, as a user sees it)."""
    started = time.perf_counter()
    for ids in prompts:
        out = run(ids)
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
    return len(prompts) * new_tokens / (time.perf_counter() - started)


def load_record(path: Path, protocol: dict, fresh: bool) -> dict:
    if path.is_file() and not fresh:
        record = json.loads(path.read_text())
        if {k: record["protocol"].get(k) for k in PROTOCOL_KEYS} != {k: protocol[k] for k in PROTOCOL_KEYS}:
            sys.exit(f"{path} holds rounds of another protocol ({ {k: record['protocol'].get(k) for k in PROTOCOL_KEYS} });"
                     " pass --fresh to start over, or another --label")
        return record
    return {"protocol": protocol, "rounds": []}


def summarise(record: dict) -> dict:
    """Best tokens/s per (cell, model) over the rounds, and the sparse/dense ratio of the bests and per round."""
    best, ratios = {}, {}
    for rnd in record["rounds"]:
        for cell, by_model in rnd["tokens_per_s"].items():
            for model, tps in by_model.items():
                best.setdefault(cell, {})[model] = max(tps, best.get(cell, {}).get(model, 0.0))
            ratios.setdefault(cell, []).append(by_model[MODELS[1]] / by_model[MODELS[0]])
    return {cell: {"best_tokens_per_s": best[cell], "ratio_of_best": best[cell][MODELS[1]] / best[cell][MODELS[0]],
                   "ratio_per_round": [round(r, 3) for r in ratios[cell]]} for cell in best}


def table(record: dict) -> str:
    proto, summary = record["protocol"], record["summary"]
    cells = list(summary)
    loads = [rnd["machine_before"]["loadavg"][0] for rnd in record["rounds"]]
    title = (f"{record.get('title', 'SmolLM2-135M-Instruct fp32, dense vs ADMM 2:4')} "
             f"({record['sparse']['linear_sparsity']:.3f} of the block Linear weights zero), each exported with "
             f"`hf_prune.export_onnx` (KV cache). Greedy generation, batch 1, {len(proto['prompts'])} prompts x "
             f"{proto['new_tokens']} new tokens; tokens/s, best of {len(record['rounds'])} interleaved rounds; "
             f"{platform.processor() or platform.machine()}, {record['rounds'][0]['machine_before']['cpus']} cores "
             f"**shared** with other jobs (1-min load average {min(loads):.1f}-{max(loads):.1f} at the rounds' "
             "starts).")
    lines = [
        title,
        "",
        "| model | perplexity | ONNX MB | " + " | ".join(c.replace("_", " ") + " tok/s" for c in cells) + " |",
        "|---|---|---|" + "---|" * len(cells),
    ]
    for name, key in ((MODELS[0], "dense"), (MODELS[1], "sparse")):
        info = record[key]
        ppl = info.get("perplexity")
        lines.append(f"| {name} | {ppl:.2f} | {info['export']['onnx_mb']:.0f} | " if ppl else
                     f"| {name} | - | {info['export']['onnx_mb']:.0f} | ")
        lines[-1] += " | ".join(f"{summary[c]['best_tokens_per_s'][name]:.1f}" for c in cells) + " |"
    lines.append("| **2:4 / dense** | | | " + " | ".join(
        f"**{summary[c]['ratio_of_best']:.2f}x** ({min(summary[c]['ratio_per_round']):.2f}-"
        f"{max(summary[c]['ratio_per_round']):.2f})" for c in cells) + " |")
    same = all(all(v["equal"] for v in record[k]["greedy_check"]) for k in ("dense", "sparse"))
    note = ("Ratio of the best rounds (range of the per-round ratios in parentheses). ORT greedy tokens equal "
            f"PyTorch `generate` for every prompt, both models: **{'yes' if same else 'NO'}**.")
    lines += ["", note]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="pruned checkpoint and ONNX exports (reused)")
    p.add_argument("--dense", default=None, help="dense checkpoint (default: the shipped SmolLM2 asset)")
    p.add_argument("--sparse", default=None, help="sparse checkpoint (default: WORK/smollm2-admm-24, pruned if absent)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration windows for the pruning step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} fixed prompts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds in all (recorded ones count)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    p.add_argument("--label", default="", help="suffix of the result files")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    p.add_argument("--fresh", action="store_true", help="drop the recorded rounds of this label")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be 1..{len(PROMPTS)}")
    if args.new_tokens < 1 or args.rounds < 1 or min(args.threads) < 1:
        p.error("--new-tokens, --rounds and --threads must be >= 1")

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune import (
        describe_export,  # importing hf_prune registers the compressed checkpoint loader
    )
    from hf_prune.assets import smollm2_path
    from hf_prune_ort import OnnxModel

    started = time.perf_counter()
    dense_dir = args.dense or smollm2_path()
    sparse_dir = Path(args.sparse) if args.sparse else args.work / "smollm2-admm-24"
    if not (sparse_dir / "config.json").is_file():
        if args.sparse:
            p.error(f"--sparse {sparse_dir} is not a model directory")
        prune(sparse_dir, args.num_samples)
    exports = {"dense": export(dense_dir, args.work / "onnx-dense"),
               "sparse": export(str(sparse_dir), args.work / "onnx-admm-24")}

    stem = args.results_dir / ("deploy_smollm2" + (f"_{args.label}" if args.label else ""))
    protocol = {"new_tokens": args.new_tokens, "prompts": PROMPTS[:args.prompts], "threads": args.threads,
                "runtimes": args.runtimes, "dense": str(dense_dir), "sparse": str(sparse_dir), "batch_size": 1}
    record = load_record(stem.with_suffix(".json"), protocol, args.fresh)
    if args.dense or args.sparse:
        record["title"] = f"dense {dense_dir} vs sparse {sparse_dir}"
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    prompts = [np.asarray(tokenizer(t)["input_ids"], dtype=np.int64)[None] for t in protocol["prompts"]]
    torch_models = {MODELS[0]: AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval(),
                    MODELS[1]: AutoModelForCausalLM.from_pretrained(sparse_dir, dtype=torch.float32).eval()}
    onnx_dirs = {MODELS[0]: args.work / "onnx-dense", MODELS[1]: args.work / "onnx-admm-24"}
    metrics = describe_export(sparse_dir, verify=False).get("metrics", {}) if args.sparse is None else {}
    for key, name in (("dense", MODELS[0]), ("sparse", MODELS[1])):
        ppl = metrics.get("perplexity_before" if key == "dense" else "perplexity_after")
        previous = record.get(key, {}).get("greedy_check")
        record[key] = {"path": str(dense_dir if key == "dense" else sparse_dir), "export": exports[key],
                       "linear_sparsity": linear_sparsity(torch_models[name]), "perplexity": ppl,
                       "greedy_check": previous}

    # 3. ORT greedy == PyTorch generate (with the end-of-sequence stop, as a user calls it), untimed, once.
    torch.set_num_threads(max(args.threads))
    for key, name in (("dense", MODELS[0]), ("sparse", MODELS[1])):
        if record[key]["greedy_check"]:
            continue
        onnx = OnnxModel.from_pretrained(onnx_dirs[name], threads=max(args.threads))
        checks = []
        for text, ids in zip(protocol["prompts"], prompts):
            expected = greedy_torch(torch_models[name], ids, args.new_tokens, fixed=False)
            got = onnx.generate(ids, max_new_tokens=args.new_tokens)
            checks.append({"prompt": text, "equal": got.tolist() == expected.tolist(),
                           "new_tokens": int(got.shape[1] - ids.shape[1]),
                           "text": tokenizer.decode(got[0, ids.shape[1]:], skip_special_tokens=True)})
        record[key]["greedy_check"] = checks
        print(f"{name}: ORT greedy tokens equal PyTorch generate on {sum(c['equal'] for c in checks)}/{len(checks)}"
              " prompts", flush=True)
        del onnx
    _write(stem, record, summarised=False)

    # 4. interleaved timing rounds; sessions (one per model and thread count) are opened once, and not at all when
    # every round is already recorded (a re-run only rebuilds the table).
    runners, cells = {}, []
    if len(record["rounds"]) < args.rounds:
        sessions = {}
        if "onnxruntime" in args.runtimes:
            for name in MODELS:
                for t in args.threads:
                    sessions[name, t] = OnnxModel.from_pretrained(onnx_dirs[name], threads=t)
                    sessions[name, t].generate(prompts[0], max_new_tokens=2, eos_token_id=[])  # warm-up
        for runtime in args.runtimes:
            for t in args.threads:
                cell = f"{'ort' if runtime == 'onnxruntime' else 'eager'}_{t}t"
                for name in MODELS:
                    if runtime == "onnxruntime":
                        runners[cell, name] = (t, lambda ids, s=sessions[name, t]: s.generate(
                            ids, max_new_tokens=args.new_tokens, eos_token_id=[]))
                    else:
                        runners[cell, name] = (t, lambda ids, m=torch_models[name]: greedy_torch(
                            m, ids, args.new_tokens, fixed=True))
        cells = list(dict.fromkeys(cell for cell, _ in runners))
        for t in args.threads:  # eager warm-up
            torch.set_num_threads(t)
            for name in MODELS:
                greedy_torch(torch_models[name], prompts[0], 2, fixed=True)
    while len(record["rounds"]) < args.rounds:
        index = len(record["rounds"])
        order = MODELS if index % 2 == 0 else MODELS[::-1]
        rnd = {"machine_before": machine_state(), "order": list(order), "tokens_per_s": {}}
        for cell in cells:
            for name in order:
                threads, run = runners[cell, name]
                torch.set_num_threads(threads)
                rnd["tokens_per_s"].setdefault(cell, {})[name] = time_cell(run, prompts, args.new_tokens)
        rnd["machine_after"] = machine_state()
        record["rounds"].append(rnd)
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{c} {rnd['tokens_per_s'][c][MODELS[0]]:.1f}/{rnd['tokens_per_s'][c][MODELS[1]]:.1f}" for c in cells)
            + f" tok/s (dense/2:4), load {rnd['machine_before']['loadavg'][0]}", flush=True)
        _write(stem, record, summarised=False)
    record["summary"] = summarise(record)
    record["versions"] = {"torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                          "python": platform.python_version()}
    record["machine"] = ("2-core VM shared by several engineers' jobs (tests, training, benchmarks) during the run; "
                         "see machine_before/after of each round")
    record["command"] = " ".join(["python", "benchmarks/deploy_smollm2.py"] + (argv if argv is not None
                                                                                 else sys.argv[1:]))
    record["wall_s_this_invocation"] = round(time.perf_counter() - started, 1)
    _write(stem, record, summarised=True)
    text = table(record)
    print(text)
    return record


def _write(stem: Path, record: dict, summarised: bool) -> None:
    """The JSON (after every round, so a killed run resumes) and, once summarised, the markdown table."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, stem.with_suffix(".json"))
    if summarised:
        stem.with_suffix(".md").write_text(table(record) + "\n")


if __name__ == "__main__":
    main()
