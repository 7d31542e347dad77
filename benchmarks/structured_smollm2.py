"""Structured one-shot pruning of SmolLM2-135M (`StructuredConfig`, issue 30): held-out perplexity before training.

Shapes (issue 30): **B** is the CoFi shape of issue 18 (28 layers / 2 KV groups / FFN 864 / hidden 528, 49.65 % of
the non-embedding parameters removed); **A** removes about 30 % (`target_sparsity=0.3`, the documented split: 2 of
3 KV groups per layer and the FFN width that lands on 30 %). Rows per shape: importance only (`reconstruct=False`,
the units Minitron's activation importance picks, sliced) and importance + least-squares reconstruction of
`o_proj` / `down_proj`. Calibration: windows of the Wikipedia calibration articles (`hf_prune.assets.wikipedia_split`);
evaluation: the held-out articles, 8 windows x 512 tokens (and, for the distilled rows, also the 32 x 512 of the
CoFi benchmark, whose structured baseline scored 116.99 after 262k tokens). `--distill-steps N` adds, per shape, the
reconstructed model after logit distillation from the dense model (`hf_prune.distill`: KL at temperature 1, the
CoFi benchmark's budget by default: windows of 256 tokens, 2 x 4 per step, lr 1e-4 cosine; 128 steps = 262k tokens of
the calibration articles).

Rows are resumable: each finished row is written to the JSON at once, and a rerun with the same settings skips it.

    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --shapes B --calibration-windows 32
    python benchmarks/structured_smollm2.py --shapes B --threads 2 --distill-steps 128
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import StructuredConfig, distill, get_pruning_state, oneshot
from hf_prune.cpu import machine_state
from hf_prune.assets import smollm2_path, wikipedia_split
from hf_prune.evaluation import perplexity
from hf_prune.methods.structured.flops import flops_per_token
from hf_prune.oneshot.calibration import tokenize_texts

SHAPES = {
    "A": {"target_sparsity": 0.3},
    "B": {"target_layers": 28, "target_kv_heads": 2, "target_intermediate_size": 864, "target_hidden_size": 528},
}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _row_stats(model, context: int) -> dict:
    emb = model.get_input_embeddings().weight.numel()  # SmolLM2 ties its LM head to the embedding
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "non_embedding_params": params - emb, "flops_per_token": flops_per_token(model, context)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="B", help="comma-separated: A, B")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="structured_smollm2", help="results/NAME.json and .md")
    p.add_argument("--distill-steps", type=int, default=0, help="add a distilled row per shape (128: 262k tokens)")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-seq-len", type=int, default=256)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {"calibration_windows": args.calibration_windows, "seq_len": args.seq_len,
                "eval_windows": args.eval_windows, "damping": args.damping}
    out_json = os.path.join(RESULTS, f"{args.name}.json")
    data = json.load(open(out_json)) if os.path.exists(out_json) else {}
    if data.get("settings") != settings:
        data = {"settings": settings, "rows": {}}

    def save() -> None:
        os.makedirs(RESULTS, exist_ok=True)
        with open(out_json, "w") as fh:
            json.dump(data, fh, indent=2)
        with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as fh:
            fh.write(table(data))

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration, held_out = wikipedia_split()
    held_out_ids = tokenize_texts(held_out, tokenizer)  # tokenised once: the 8 x 512 rows and the distilled 32 x 512
    eval_ids = held_out_ids[: args.eval_windows * args.seq_len]
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def ppl(model) -> float:
        return perplexity(model, input_ids=eval_ids, seq_len=args.seq_len, show_progress=False)

    if "dense" not in data["rows"]:
        data["rows"]["dense"] = {"shape": "dense", "perplexity": ppl(dense), **_row_stats(dense, args.seq_len)}
        save()
    for shape in args.shapes.split(","):
        for reconstruct in (False, True):
            name = f"{shape} {'importance + reconstruction' if reconstruct else 'importance only'}"
            if name in data["rows"]:
                continue
            config = StructuredConfig(**SHAPES[shape], reconstruct=reconstruct, damping=args.damping,
                                      num_calibration_samples=args.calibration_windows, max_seq_length=args.seq_len)
            started = time.perf_counter()
            small = oneshot(dense, config, calibration=calibration, tokenizer=tokenizer, show_progress=False)
            wall = time.perf_counter() - started
            m = get_pruning_state(small).metrics
            errors = m["reconstruction_error"].values()
            data["rows"][name] = {
                "shape": shape, "reconstruct": reconstruct, "perplexity": ppl(small), "pruning_wall_s": round(wall, 1),
                "sparsity": m["sparsity"], "target": m["target_architecture"], **_row_stats(small, args.seq_len),
                "mean_error_importance_only": sum(e["importance_only"] for e in errors) / max(1, len(errors)),
                "mean_error_reconstructed": (sum(e["reconstructed"] for e in errors) / len(errors)
                                             if reconstruct and errors else None),
            }
            print(name, json.dumps(data["rows"][name]), flush=True)
            save()
        name = f"{shape} importance + reconstruction + distillation ({args.distill_steps} steps, lr {args.distill_lr:g})"
        if args.distill_steps and name not in data["rows"]:
            config = StructuredConfig(**SHAPES[shape], damping=args.damping,
                                      num_calibration_samples=args.calibration_windows, max_seq_length=args.seq_len)
            small = oneshot(dense, config, calibration=calibration, tokenizer=tokenizer, show_progress=False)
            started = time.perf_counter()
            small = distill(small, dense, calibration, tokenizer, steps=args.distill_steps, seq_len=args.distill_seq_len,
                            batch_size=2, grad_accum=4, learning_rate=args.distill_lr,
                            data_name="wikipedia_split() calibration articles")
            wall = time.perf_counter() - started
            m = get_pruning_state(small).metrics
            eval32 = held_out_ids[: 32 * 512]
            data["rows"][name] = {
                "shape": shape, "reconstruct": True, "perplexity": ppl(small), "distill_wall_s": round(wall, 1),
                "perplexity_32x512": perplexity(small, input_ids=eval32, seq_len=512, show_progress=False),
                "distillation_tokens": m.get("distillation_tokens"), "distillation_train_loss":
                m.get("distillation_train_loss"), "sparsity": m["sparsity"], "target": m["target_architecture"],
                "machine_state": machine_state(), **_row_stats(small, args.seq_len),
            }
            print(name, json.dumps(data["rows"][name]), flush=True)
            save()
    print(table(data))


def table(data: dict) -> str:
    lines = ["| Row | Perplexity | Params | Non-emb. params | Removed (non-emb.) | FLOPs/token | Mean rel. calib. error | "
             "Pruning wall |", "|---|---|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        err = r.get("mean_error_reconstructed") or r.get("mean_error_importance_only")
        lines.append(
            f"| {name} | {r['perplexity']:.2f} | {r['params'] / 1e6:.2f}M | {r['non_embedding_params'] / 1e6:.2f}M | "
            f"{r.get('sparsity', 0.0):.4f} | {r['flops_per_token'] / 1e6:.1f}M | "
            f"{'' if err is None else f'{err:.4f}'} | {_wall(r)} |"
        )
    s = data["settings"]
    lines.append(f"\nSettings: {s['calibration_windows']} calibration windows x {s['seq_len']} tokens, held-out "
                 f"perplexity on {s['eval_windows']} windows x {s['seq_len']}, damping {s['damping']}; before any "
                 "training. FLOPs/token at a context of seq_len.")
    return "\n".join(lines) + "\n"


def _wall(row: dict) -> str:
    if "distill_wall_s" in row:
        return f"{row['distill_wall_s']:.0f} s distillation; 32 x 512 ppl {row['perplexity_32x512']:.2f}"
    return f"{row['pruning_wall_s']:.0f} s" if "pruning_wall_s" in row else ""


if __name__ == "__main__":
    main()
