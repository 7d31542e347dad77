"""CoFi on MiniLM-L6 / Rotten Tomatoes: accuracy, size, FLOPs and CPU latency of the exported models vs the teacher.

    flock /tmp/hf_prune_cpu.lock python benchmarks/cofi_minilm.py                 # full protocol
    flock /tmp/hf_prune_cpu.lock python benchmarks/cofi_minilm.py --max-train 3000 --teacher-epochs 1 \
        --cofi-epochs 1 --label shortened                                         # a shortened run, labelled as such

Runs `integrations/cofi_minilm_sentiment.py` (teacher, CoFi at each target with the recipe's per-target length, a
no-distillation ablation, and at 90 % the variants keeping 1 and 2 attention sublayers), then times the teacher, every
exported (saved and reloaded) model and a `floor` model (the teacher with no sublayer left: the fixed cost of a
forward) on CPU at batch 1 and batch 32 (sequence length 64) in three runtimes (eager PyTorch, `torch.compile`, and
ONNX Runtime on each model's ONNX export, checked to give the same logits), at 1 and 2 intra-op threads, in
interleaved rounds, and computes the analytic FLOPs of each. Prints markdown tables and writes
`benchmarks/results/cofi_minilm[_LABEL].json` and `.md`. Extra arguments go to the recipe (e.g. `--targets 0.9`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForSequenceClassification

import numpy as np

from hf_prune import get_pruning_state, save_pruned  # importing hf_prune registers the checkpoint loader
from hf_prune.deploy import export_onnx as hf_prune_export_onnx
from hf_prune.cpu import machine_state
from hf_prune.methods.cofi import describe_structure
from hf_prune.methods.cofi.structure import apply_structure

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


FLOOR = "floor"  # the latency-only row: the teacher with every encoder sublayer removed


def floor_model(teacher):
    """The teacher with every attention and FFN sublayer removed: embeddings, pooler and classifier only.

    No CoFi export can be faster than this in a given runtime (it is what any of them computes besides its kept
    sublayers), so its latency is the fixed cost of a forward, which the FLOPs count does not see.
    """
    floor = copy.deepcopy(teacher)
    structure = describe_structure(teacher)
    structure["layers"] = [{"heads": 0, "intermediate_size": 0, "attention_removed": True, "ffn_removed": True}
                           for _ in structure["layers"]]
    apply_structure(floor, structure)
    floor.load_state_dict(teacher.state_dict(), strict=False)  # what is left has the teacher's shapes
    return floor.eval()


RUNTIMES = ("eager", "compiled", "onnxruntime")
ATTENTION_LAYER_VARIANTS = (1, 2)  # the recipe's `-attnN` runs at 90 %: the accuracy / batch-1 latency trade-off


def _ffn_cell(row: dict) -> str:
    """Per-layer FFN widths; where the export padded a layer with zero neurons, the kept count in parentheses."""
    kept = row.get("ffn_kept_per_layer") or row["ffn_per_layer"]
    return "[" + ", ".join(f"{w}" + (f" ({k})" if k != w else "") for w, k in zip(row["ffn_per_layer"], kept)) + "]"


def _median_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def export_onnx(model, directory: str, int8: bool = False) -> dict:
    """`hf_prune.export_onnx` of `model` into `directory` (checked against PyTorch: fp32 within 1e-4, int8 by argmax
    agreement); returns {"fp32": model.onnx path, "int8": model_quantized.onnx path or None, "report": ...}."""
    report = hf_prune_export_onnx(model, directory, task="text-classification", int8=int8, overwrite=True)
    return {"fp32": os.path.join(directory, "model.onnx"),
            "int8": os.path.join(directory, "model_quantized.onnx") if int8 else None, "report": report}


def _feed(session, inputs: dict) -> dict:
    """The inputs an ONNX Runtime session declares (a model with no attention left has no `attention_mask` input:
    the exporter drops inputs the graph does not read)."""
    values = {**inputs, "token_type_ids": torch.zeros_like(inputs["input_ids"])}
    return {i.name: values[i.name].numpy() for i in session.get_inputs()}


def ort_accuracy(onnx_path: str, test, batch_size: int = 64) -> float:
    """Accuracy of an ONNX graph on the test sentences (padded per batch), in ONNX Runtime."""
    from hf_prune_ort import OnnxModel

    model = OnnxModel.from_pretrained(os.path.dirname(onnx_path), os.path.basename(onnx_path))
    correct = 0
    for i in range(0, len(test), batch_size):
        rows = test[i:i + batch_size]
        width = max(len(r) for r in rows["input_ids"])
        ids = np.zeros((len(rows["input_ids"]), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for j, r in enumerate(rows["input_ids"]):
            ids[j, :len(r)], mask[j, :len(r)] = r, 1
        pred = model(ids, attention_mask=mask).logits.argmax(-1)
        correct += int((pred == np.asarray(rows["labels"])).sum())
    return correct / len(test)


def _runner(model, inputs: dict, runtime: str, threads: int, onnx_path: str | None):
    """A zero-argument callable running one forward of `model` on `inputs` in `runtime`."""
    if runtime == "eager":
        return lambda: model(**inputs)
    if runtime == "compiled":
        compiled = torch.compile(model)
        return lambda: compiled(**inputs)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
    feed = _feed(session, inputs)
    return lambda: session.run(None, feed)


def latencies(models: dict, seq_len: int, threads: int, runtime: str, rounds: int, repeats: int,
              onnx_paths: dict | None = None, token_ids: tuple[int, int] = (1000, 2000)) -> dict:
    """Median forward latency (ms) of every model at batch 1 and 32, `threads` intra-op threads, in `runtime`.

    The models are timed in interleaved rounds (each round: `repeats` forwards of every model in turn; the result is
    the median over rounds of each round's median), so a slow spell of the machine hits teacher and students alike
    and the speed-up ratios stay comparable. `runtime`: `eager` PyTorch; `compiled`, each model through
    `torch.compile` (inductor); `onnxruntime`, each model's ONNX export (`onnx_paths`) in an ONNX Runtime CPU
    session with all graph optimisations. Teacher and students always go through the same runtime. The inputs are
    random ids in `token_ids` (ordinary word pieces of the MiniLM vocabulary), no padding.
    """
    torch.set_num_threads(threads)
    out = {name: {} for name in models}
    for batch in (1, 32):
        ids = torch.randint(*token_ids, (batch, seq_len))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        reps = repeats if batch == 1 else max(3, repeats // 5)
        with torch.inference_mode():
            if runtime == "compiled":
                torch._dynamo.reset()
            runners = {name: _runner(m, inputs, runtime, threads, (onnx_paths or {}).get(name))
                       for name, m in models.items()}
            for run in runners.values():  # warm-up (and compilation)
                for _ in range(3):
                    run()
            per_round = {name: [] for name in models}
            for _ in range(rounds):
                for name, run in runners.items():
                    per_round[name].append(_median_ms(run, reps))
        for name, values in per_round.items():
            out[name][f"b{batch}"] = statistics.median(values)
    return out


def int8_table(models: dict, exports: dict, results: dict, seq: int, args) -> list[dict]:
    """Per model: fp32 and int8 ONNX accuracy on the test sentences and ONNX Runtime latency, timed interleaved."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(results["teacher"]["path"])
    _, test = recipe.load_data(tokenizer, results["protocol"]["seed"], seq, None, results["protocol"]["max_test"])
    names = [n for n in models if n != FLOOR]
    paths = {**{n: exports[n]["fp32"] for n in names}, **{f"{n}-int8": exports[n]["int8"] for n in names}}
    timed = {f"ort_{t}t": latencies(dict.fromkeys(paths), seq, t, "onnxruntime", args.rounds, args.repeats, paths)
             for t in args.threads}
    rows = []
    for n in names:
        rows.append({"model": n, "fp32_accuracy": ort_accuracy(paths[n], test),
                     "int8_accuracy": ort_accuracy(paths[f"{n}-int8"], test),
                     "int8_check": exports[n]["report"].int8,
                     "latency_ms": {k: {"fp32": v[n], "int8": v[f"{n}-int8"]} for k, v in timed.items()}})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", default="", help="suffix of the result files; use it for any shortened protocol")
    p.add_argument("--plot", action="store_true",
                   help="at the end, draw accuracy vs speed-up from the results (benchmarks/plots.py; needs matplotlib)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts to time")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES),
                   help="where to time the models: eager PyTorch, torch.compile (needs a C compiler), ONNX Runtime "
                        '(needs `pip install -e ".[bench]"`)')
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per setting")
    p.add_argument("--repeats", type=int, default=10, help="batch-1 forwards per model per round (batch 32: 1/5)")
    p.add_argument("--int8", action="store_true",
                   help="add int8 rows (dynamic int8 ONNX of each model): test accuracy in ONNX Runtime and latency")
    p.add_argument("--skip-ablation", action="store_true",
                   help="no ablation or variant runs (no-distillation, `-attnN`), e.g. for a one-target re-run")
    args, rest = p.parse_known_args(argv)
    rest = list(rest)
    if "onnxruntime" in args.runtimes and importlib.util.find_spec("onnxruntime") is None:
        p.error('--runtimes onnxruntime needs ONNX Runtime: pip install -e ".[bench]" (or leave it out of --runtimes)')
    if not args.skip_ablation:
        if "--no-distill-ablation" not in rest:
            rest.append("--no-distill-ablation")
        if "--attention-layer-variants" not in rest:
            rest += ["--attention-layer-variants", *map(str, ATTENTION_LAYER_VARIANTS)]
    if "--output" not in rest:
        rest += ["--output", os.path.join("runs", "cofi_minilm" + (f"_{args.label}" if args.label else ""))]
    results = recipe.main(rest)
    seq = recipe.parse_args(rest).max_length
    models = {"teacher": AutoModelForSequenceClassification.from_pretrained(results["teacher"]["path"]).eval()}
    for run in results["runs"]:  # the saved, reloaded models
        models[run["name"]] = AutoModelForSequenceClassification.from_pretrained(run["path"]).eval()
    models[FLOOR] = floor_model(models["teacher"])
    t_flops = forward_flops(describe_structure(models["teacher"]), seq)
    names = {"eager": "eager", "compiled": "compiled", "onnxruntime": "ort"}
    with tempfile.TemporaryDirectory(prefix="hf_prune_cofi_onnx_") as onnx_dir:
        onnx_paths, int8_rows = None, []
        if "onnxruntime" in args.runtimes:
            exports = {n: export_onnx(m, os.path.join(onnx_dir, n), int8=args.int8 and n != FLOOR)
                       for n, m in models.items()}
            onnx_paths = {n: e["fp32"] for n, e in exports.items()}
        timed = {f"{names[rt]}_{t}t": latencies(models, seq, t, rt, args.rounds, args.repeats, onnx_paths)
                 for rt in args.runtimes for t in args.threads}
        if args.int8 and onnx_paths:
            int8_rows = int8_table(models, exports, results, seq, args)
    teacher_info = {"name": "teacher (MiniLM-L6, dense)", "accuracy": results["teacher"]["eval_accuracy"],
                    "sparsity": 0.0, "train_wall_time_s": results["teacher"].get("train_wall_time_s")}
    rows = []
    for key, info in [("teacher", teacher_info)] + [(r["name"], r) for r in results["runs"]]:
        model = models[key]
        s = describe_structure(model)
        row = {
            "model": info["name"], "accuracy": info["accuracy"], "sparsity": info["sparsity"],
            "params": sum(p.numel() for p in model.parameters()), "flops_ratio": t_flops / forward_flops(s, seq),
            "train_wall_time_s": info["train_wall_time_s"], "structure": s,
            "heads_per_layer": [layer["heads"] for layer in s["layers"]],
            "ffn_per_layer": [layer["intermediate_size"] for layer in s["layers"]], "hidden": s["hidden_size"],
            "ffn_kept_per_layer": (get_pruning_state(model).metrics.get("kept_neurons_per_layer")
                                   if key != "teacher" else None),  # before the zero padding (multiple_of)
            "latency_ms": {k: v[key] for k, v in timed.items()},
            "speedup": {k: {b: v["teacher"][b] / v[key][b] for b in v[key]} for k, v in timed.items()},
        }
        row["speedup_needed"] = 0.7 * row["flops_ratio"]
        rows.append(row)
    # Record the measured numbers in each exported model's card (re-saved in place, the export stays compressed).
    for run, row in zip(results["runs"], rows[1:]):
        model = models[run["name"]]
        metrics = get_pruning_state(model).metrics
        metrics.update(teacher_accuracy=round(rows[0]["accuracy"], 4), flops_ratio=round(row["flops_ratio"], 3))
        for k, lat in row["latency_ms"].items():
            for b, ms in lat.items():
                metrics[f"latency_{b}_{k}_ms"] = round(ms, 3)
                metrics[f"speedup_{b}_{k}"] = round(row["speedup"][k][b], 3)
        save_pruned(model, run["path"], overwrite=True,
                    eval_results=[recipe.accuracy_eval_result(row["accuracy"], results["protocol"]["seed"])])
    proto = results["protocol"]
    lines = [
        f"CoFi on MiniLM-L6 / Rotten Tomatoes sentences (split seed {proto['seed']}: "
        f"{'first ' + str(proto['max_train']) + ' of ' if proto['max_train'] else ''}"
        f"8,500 train, {proto['max_test'] or 2068} test). Protocol: {args.label or 'full'}; CPU latency at seq {seq} "
        f"({platform.processor() or platform.machine()}), median of {args.rounds} interleaved rounds.",
        "",
        "| model | acc | sparsity | params | FLOPs ratio | heads/layer | FFN/layer (kept) | hidden | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['sparsity']:.3f} | {r['params'] / 1e6:.2f}M | "
            f"{r['flops_ratio']:.2f}x | {r['heads_per_layer']} | {_ffn_cell(r)} | {r['hidden']} | "
            f"{(r['train_wall_time_s'] or 0):.0f} |"
        )
    lines += ["", "FFN widths include the zero neurons the export pads each kept FFN with (to a multiple of "
              "`CoFiConfig.multiple_of`; kept neurons in parentheses), and the FLOPs count them: they are computed.",
              "", "Latency (ms) and speed-up vs the teacher; target: speed-up >= 0.7x the FLOPs ratio.", "",
              "| model | needed | " + " | ".join(f"{k} b1 | {k} b32" for k in timed) + " |",
              "|---|---|" + "---|---|" * len(timed)]
    for r in rows:
        cells = []
        for k in timed:
            for b in ("b1", "b32"):
                sp = r["speedup"][k][b]
                mark = "" if r is rows[0] else (" ok" if sp >= r["speedup_needed"] else " **no**")
                cells.append(f"{r['latency_ms'][k][b]:.2f} ({sp:.2f}x{mark})")
        lines.append(f"| {r['model']} | {r['speedup_needed']:.2f}x | " + " | ".join(cells) + " |")
    floor = {k: {b: v[FLOOR][b] for b in v[FLOOR]} for k, v in timed.items()}
    lines.append(f"| {FLOOR} (no sublayer left: fixed cost) | - | " + " | ".join(
        f"{floor[k][b]:.2f} ({timed[k]['teacher'][b] / floor[k][b]:.2f}x)" for k in timed for b in ("b1", "b32"))
        + " |")
    lines += ["", f"The `{FLOOR}` row is the teacher with every attention and FFN sublayer removed (embeddings, pooler "
              "and classifier only): no export can be faster in that setting, and its speed-up is the most any "
              "amount of pruning could give."]
    if int8_rows:
        lines += ["", "int8 on top (`hf-prune export-onnx --int8`: dynamic int8 weights, ONNX Runtime), interleaved "
                  "with the fp32 exports; accuracy of each ONNX graph on the test sentences; goal: int8 >= 1.5x over "
                  "fp32 at batch 32 for <= 0.5 points.", "",
                  "| model | fp32 ORT acc | int8 ORT acc | points lost | "
                  + " | ".join(f"{k} b1 fp32 / int8 (x) | {k} b32 fp32 / int8 (x)" for k in int8_rows[0]["latency_ms"])
                  + " |", "|---|---|---|---|" + "---|---|" * len(int8_rows[0]["latency_ms"])]
        for r in int8_rows:
            cells = [f"{v['fp32'][b]:.2f} / {v['int8'][b]:.2f} ({v['fp32'][b] / v['int8'][b]:.2f}x)"
                     for v in r["latency_ms"].values() for b in ("b1", "b32")]
            lines.append(f"| {r['model']} | {r['fp32_accuracy']:.4f} | {r['int8_accuracy']:.4f} | "
                         f"{100 * (r['fp32_accuracy'] - r['int8_accuracy']):.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stem = os.path.join(HERE, "results", "cofi_minilm" + (f"_{args.label}" if args.label else ""))
    with open(stem + ".json", "w") as fh:
        json.dump({"protocol": proto, "label": args.label or "full", "latency_settings": list(timed),
                   "rounds": args.rounds, "repeats_b1": args.repeats,
                   "command": " ".join(["python", "benchmarks/cofi_minilm.py"] + (argv or sys.argv[1:])),
                   "rows": rows, "floor_latency_ms": floor, "int8_rows": int8_rows,
                   "machine_state": machine_state()}, fh, indent=2, default=str)
    with open(stem + ".md", "w") as fh:
        fh.write(table + "\n")
    if args.plot:
        from plots import plot_after_run

        print(f"plot: {plot_after_run('cofi', stem + '.json')}")


if __name__ == "__main__":
    main()
