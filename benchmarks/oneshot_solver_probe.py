"""Solver time side by side: ADMM vs SparseGPT on one SmolLM2 block's real calibration statistics, in one process.

The whole-run benchmark (`oneshot_smollm2.py`) times each method in its own subprocess, so load from other jobs on a
shared machine hits the methods differently; here every solver runs on the same statistics, interleaved, best of
`--repeats`. Also prints each solver's reconstruction error summed over the block's layers,
Σ_layers ‖X(W' − W)ᵀ‖² / ‖XWᵀ‖² (lower is better).

    OMP_NUM_THREADS=1 python benchmarks/oneshot_solver_probe.py --settings 0.5 0.6 0.7 2:4
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from hf_prune.cpu import machine_state

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "sparsegpt": ("sparsegpt", {}),
    "admm": ("admm", {}),
    "admm_bf16": ("admm", {"matmul_precision": "bfloat16"}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["0.5", "2:4"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "oneshot_solver_probe.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune import get_config_class
    from hf_prune.assets import smollm2_path, wikipedia_split
    from hf_prune.oneshot.blocks import (
        capture_block_inputs,
        find_blocks,
        linear_weight_view,
    )
    from hf_prune.oneshot.calibration import calibration_windows
    from hf_prune.oneshot.passes import advance, collect_stats
    from hf_prune.oneshot.plan import plan_layers
    from hf_prune.oneshot.solver import LayerTask, build_solver

    torch.set_grad_enabled(False)
    path = smollm2_path()
    calib = calibration_windows(wikipedia_split()[0], AutoTokenizer.from_pretrained(path),
                                num_samples=args.calibration_samples, seq_len=512, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.model.layers = model.model.layers[: args.block + 1]  # the blocks after it are not needed
    model.config.num_hidden_layers = args.block + 1
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, list(calib.split(8)))
    for i in range(args.block):  # dense blocks before it: the statistics of an unpruned prefix
        advance(blocks.layers[i], inputs)
    block = blocks.layers[args.block]

    def config(variant: str, setting: str):
        method, options = VARIANTS[variant]
        kwargs = {"pattern": setting} if ":" in setting else {"sparsity": float(setting)}
        return get_config_class(method)(**kwargs, **options)

    rows = []
    for setting in args.settings:
        plan = plan_layers(blocks, config("admm", setting), None)[args.block]
        stats = collect_stats(block, plan, inputs, True)
        best = {v: float("inf") for v in args.variants}
        errors = {}
        for _ in range(args.repeats):
            for variant in args.variants:  # interleaved
                solver = build_solver(config(variant, setting))
                started, error = time.perf_counter(), 0.0
                for entry in plan:
                    weight = linear_weight_view(entry.module).detach().float()
                    s = stats[entry.name]
                    pruned = solver.solve(LayerTask(entry.name, weight, entry.sparsity, solver.config.n_m, s))
                    diff = pruned - weight
                    error += float(((diff @ s.gram) * diff).sum() / ((weight @ s.gram) * weight).sum())
                solver.release()
                best[variant] = min(best[variant], time.perf_counter() - started)
                errors[variant] = error
        for variant in args.variants:
            rows.append({"setting": setting, "variant": variant, "solve_s": round(best[variant], 2),
                         "reconstruction_error": round(errors[variant], 5),
                         "over_sparsegpt": round(best[variant] / best["sparsegpt"], 2) if "sparsegpt" in best else None})
            print(rows[-1], flush=True)
    report = {"block": args.block, "calibration_windows": [args.calibration_samples, 512],
              "threads": torch.get_num_threads(), "machine": f"{os.cpu_count()} CPU cores (shared)",
              "machine_state": machine_state(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| setting | solver | solve s | ÷ SparseGPT | reconstruction error |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['variant']} | {r['solve_s']:.2f} | {r['over_sparsegpt']} | {r['reconstruction_error']:.4f} |")


if __name__ == "__main__":
    main()
