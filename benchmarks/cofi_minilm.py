"""CoFi on MiniLM-L6 / Rotten Tomatoes: accuracy, size, FLOPs and CPU latency of the exported models vs the teacher.

    flock /tmp/hf_prune_cpu.lock python benchmarks/cofi_minilm.py                 # full protocol
    flock /tmp/hf_prune_cpu.lock python benchmarks/cofi_minilm.py --max-train 3000 --teacher-epochs 1 \
        --cofi-epochs 1 --label shortened                                         # a shortened run, labelled as such
    python benchmarks/cofi_minilm.py --targets 0.9 --cofi-epochs 6 --skip-ablation --label 90_6ep  # one longer run

Runs `integrations/cofi_minilm_sentiment.py` (teacher, CoFi at each target, a no-distillation ablation), then times
the teacher and every exported model on CPU at batch 1 and batch 32 (sequence length 64, median of repeated runs,
fixed thread count) and computes the analytic FLOPs of each. Prints a markdown table and writes
`benchmarks/results/cofi_minilm[_LABEL].json` and `.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForSequenceClassification

from hf_prune import get_pruning_state, save_pruned  # importing hf_prune registers the checkpoint loader
from hf_prune.methods.cofi import describe_structure

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integrations"))
import cofi_minilm_sentiment as recipe  # noqa: E402


def forward_flops(structure: dict, seq_len: int, num_labels: int = 2) -> int:
    """Multiply-adds x 2 of one sequence through the encoder and head (embedding lookups and norms excluded)."""
    d = structure["hidden_size"]
    d_out = structure["original"]["hidden_size"]
    head_dim = structure["original"]["hidden_size"] // structure["original"]["num_attention_heads"]
    total = 0
    for layer in structure["layers"]:
        inner = layer["heads"] * head_dim
        total += 2 * seq_len * (4 * d * inner)  # Q, K, V, O projections
        total += 2 * 2 * seq_len * seq_len * inner  # scores and weighted sum
        total += 2 * seq_len * (2 * d * layer["intermediate_size"])  # FFN
    total += 2 * (d * d_out + d_out * num_labels)  # pooler + classifier on the first token
    return total


def latency_ms(model, batch: int, seq_len: int, repeats: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model.eval()
    ids = torch.randint(1000, 2000, (batch, seq_len))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(**inputs)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="", help="suffix of the result files; use it for any shortened protocol")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--skip-ablation", action="store_true", help="no no-distillation runs (e.g. for a one-target re-run)")
    args, rest = p.parse_known_args(argv)
    rest = list(rest)
    if "--no-distill-ablation" not in rest and not args.skip_ablation:
        rest.append("--no-distill-ablation")
    if "--output" not in rest:
        rest += ["--output", os.path.join("runs", "cofi_minilm" + (f"_{args.label}" if args.label else ""))]
    results = recipe.main(rest)
    seq = recipe.parse_args(rest).max_length
    teacher = AutoModelForSequenceClassification.from_pretrained(results["teacher"]["path"])
    t_struct = describe_structure(teacher)
    t_flops = forward_flops(t_struct, seq)
    rows = [{
        "model": "teacher (MiniLM-L6, dense)", "accuracy": results["teacher"]["eval_accuracy"],
        "params": sum(p.numel() for p in teacher.parameters()), "sparsity": 0.0, "flops_ratio": 1.0,
        "latency_b1_ms": latency_ms(teacher, 1, seq, args.repeats, args.threads),
        "latency_b32_ms": latency_ms(teacher, 32, seq, max(5, args.repeats // 3), args.threads),
        "train_wall_time_s": results["teacher"].get("train_wall_time_s"), "structure": t_struct,
    }]
    exported = []
    for run in results["runs"]:
        model = AutoModelForSequenceClassification.from_pretrained(run["path"])  # the saved, reloaded model
        exported.append(model)
        s = describe_structure(model)
        rows.append({
            "model": run["name"], "accuracy": run["accuracy"], "params": sum(p.numel() for p in model.parameters()),
            "sparsity": run["sparsity"], "flops_ratio": t_flops / forward_flops(s, seq),
            "latency_b1_ms": latency_ms(model, 1, seq, args.repeats, args.threads),
            "latency_b32_ms": latency_ms(model, 32, seq, max(5, args.repeats // 3), args.threads),
            "train_wall_time_s": run["train_wall_time_s"], "structure": s,
        })
    for r in rows:
        r["speedup_b1"] = rows[0]["latency_b1_ms"] / r["latency_b1_ms"]
        r["speedup_b32"] = rows[0]["latency_b32_ms"] / r["latency_b32_ms"]
        r["heads_per_layer"] = [l["heads"] for l in r["structure"]["layers"]]
        r["ffn_per_layer"] = [l["intermediate_size"] for l in r["structure"]["layers"]]
        r["hidden"] = r["structure"]["hidden_size"]
    # Record the measured numbers in each exported model's card (re-saved in place, the export stays compressed).
    for run, row, model in zip(results["runs"], rows[1:], exported):
        get_pruning_state(model).metrics.update(
            teacher_accuracy=round(rows[0]["accuracy"], 4), flops_ratio=round(row["flops_ratio"], 3),
            latency_b1_ms=round(row["latency_b1_ms"], 3), latency_b32_ms=round(row["latency_b32_ms"], 2),
            speedup_b1=round(row["speedup_b1"], 3), speedup_b32=round(row["speedup_b32"], 3),
            latency_threads=args.threads,
        )
        save_pruned(model, run["path"], overwrite=True,
                    eval_results=[recipe.accuracy_eval_result(row["accuracy"], results["protocol"]["seed"])])
    lines = [
        f"CoFi on MiniLM-L6 / Rotten Tomatoes sentences (split seed {results['protocol']['seed']}: "
        f"{'first ' + str(results['protocol']['max_train']) + ' of ' if results['protocol']['max_train'] else ''}"
        f"8,500 train, {results['protocol']['max_test'] or 2068} test). Protocol: {args.label or 'full'}; "
        f"CPU latency at seq {seq}, {args.threads} threads ({platform.processor() or platform.machine()}).",
        "",
        "| model | acc | sparsity | params | FLOPs ratio | b1 ms | b1 speed-up | b32 ms | b32 speed-up | heads/layer | FFN/layer | hidden | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['sparsity']:.3f} | {r['params'] / 1e6:.2f}M | "
            f"{r['flops_ratio']:.2f}x | {r['latency_b1_ms']:.2f} | {r['speedup_b1']:.2f}x | {r['latency_b32_ms']:.1f} | "
            f"{r['speedup_b32']:.2f}x | {r['heads_per_layer']} | {r['ffn_per_layer']} | {r['hidden']} | "
            f"{(r['train_wall_time_s'] or 0):.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", "cofi_minilm" + (f"_{args.label}" if args.label else ""))
    with open(stem + ".json", "w") as fh:
        json.dump({"protocol": results["protocol"], "label": args.label or "full", "threads": args.threads,
                   "command": " ".join(["python", "benchmarks/cofi_minilm.py"] + (argv or sys.argv[1:])),
                   "rows": rows}, fh, indent=2)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n")


if __name__ == "__main__":
    main()
