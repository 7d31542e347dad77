"""One masked-LoRA training step's memory against plain LoRA, on an hf_prune SmolLM2-135M checkpoint.

Each mode runs in a fresh subprocess: load the checkpoint, wrap it (hf_prune.get_sparse_peft_model, or plain
peft.get_peft_model), run `--steps` AdamW steps on random token windows; reports the peak RSS growth over the RSS
before the first step, and the seconds per step. JSON to benchmarks/results/recover_memory.json.

    python benchmarks/recover_memory.py CHECKPOINT --seq-len 256 --batch-size 2 --rank 16
    python benchmarks/recover_memory.py CHECKPOINT --bf16 --batch-size 4 --out benchmarks/results/recover_memory_bf16.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from hf_prune.cpu import machine_state
from oneshot_smollm2 import _rss_mb  # benchmarks/ is sys.path[0] when run as a script

HERE = Path(__file__).resolve().parent


def run_one(mode: str, checkpoint: str, seq_len: int, batch_size: int, rank: int, steps: int, bf16: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_prune
    from hf_prune.cpu import use_bf16

    bf16 = use_bf16(bf16, "the recovery memory benchmark's steps", "cpu")  # fp32 where bf16 is emulated (~10x slower)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    peft_model = hf_prune.get_sparse_peft_model(model, config) if mode == "masked" else get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))
    before = _rss_mb()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "rss_before_step_mb": round(before, 1), "peak_rss_mb": round(peak, 1),
            "step_peak_growth_mb": round(peak - before, 1), "s_per_step": [round(x, 2) for x in times],
            "precision": "bf16" if bf16 else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="steps under bf16 autocast (the recovery recipe's setting)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "recover_memory.json")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = [args.checkpoint, args.seq_len, args.batch_size, args.rank, args.steps, args.bf16]
    if args.run_one:
        print(json.dumps(run_one(args.run_one, *shape)))
        return
    rows = []
    for mode in ("plain", "masked"):
        proc = subprocess.run([sys.executable, __file__, *map(str, shape[:1]), "--seq-len", str(args.seq_len),
                               "--batch-size", str(args.batch_size), "--rank", str(args.rank), "--steps",
                               str(args.steps), "--run-one", mode] + (["--bf16"] if args.bf16 else []),
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    args.out.write_text(json.dumps({"setup": vars(args) | {"out": str(args.out)}, "runs": rows,
                                    "machine_state": machine_state()}, indent=2) + "\n")
    print("| mode | RSS before step MB | peak RSS MB | step peak growth MB | s/step |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['rss_before_step_mb']} | {r['peak_rss_mb']} | {r['step_peak_growth_mb']} | "
              f"{r['s_per_step']} |")


if __name__ == "__main__":
    main()
