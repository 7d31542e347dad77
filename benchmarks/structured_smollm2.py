"""Structured one-shot pruning of SmolLM2-135M (`StructuredConfig`, issue 30): held-out perplexity before training.

Shapes (issue 30): **B** is the CoFi shape of issue 18 (28 layers / 2 KV groups / FFN 864 / hidden 528, 49.65 % of
the non-embedding parameters removed); **A** removes about 30 % (`target_sparsity=0.3`, the documented split: 2 of
3 KV groups per layer and the FFN width that lands on 30 %). Rows per shape: importance only (`reconstruct=False`,
the units Minitron's activation importance picks, sliced) and importance + least-squares reconstruction of
`o_proj` / `down_proj`. Calibration: windows of the Wikipedia calibration articles (`hf_prune.assets.wikipedia_split`);
evaluation: the held-out articles, 8 windows x 512 tokens (and, for the distilled rows, also the 32 x 512 of the
CoFi benchmark, whose structured baseline scored 116.99 after 262k tokens). `--distill-steps N` adds, per shape, a
row after logit distillation from the dense model (`hf_prune.distill`: KL at temperature 1, the CoFi benchmark's
budget by default: windows of 256 tokens, 2 x 4 per step, lr 1e-4 cosine; 128 steps = 262k tokens of the calibration
articles) for each recorded before-training row picked by `--distill-rows` (default: the uniform reconstruction row
alone; any of importance only, depth only, Torch-Pruning, per-layer shapes), started from that row's saved model and
named `"<row> + distillation (N steps, lr X)"`; the table's last line pairs each row's perplexity before and after.
`--per-layer` adds the reconstruction row with per-layer shapes (`StructuredConfig(uniform=False)`: the same
budget, split over the layers by importance; its checkpoint loads with `import hf_prune`).

Also per shape (see docs/benchmarks/structured.md): a depth-only row (`target_layers` alone, at the nearest
non-embedding parameter count), and with `--torch-pruning` the Torch-Pruning 1.6.1 peer row
(`benchmarks/torch_pruning_peer.py`; `pip install torch-pruning==1.6.1`, in the `bench` extra). `--speed` is a pass of
its own: greedy tokens/s in ONNX Runtime (batch 1, 1 thread) and eager PyTorch (batch 8) for every row, from the
models the pruning rows saved under `--runs`, each timed together with the dense model; `--levers` is the refit sweep
(more calibration windows, other damping) into `NAME_levers.json`.

Rows are resumable: each finished row is written to the JSON at once, and a rerun with the same settings skips it.

    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --shapes B --calibration-windows 32
    python benchmarks/structured_smollm2.py --shapes B --threads 2 --distill-steps 128
    python benchmarks/structured_smollm2.py --shapes A,B --threads 2 --distill-steps 128 \\
        --distill-rows "importance only,importance + reconstruction,depth only,Torch-Pruning"
    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --shapes A,B --per-layer
    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --shapes A,B --torch-pruning
    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --speed
    OMP_NUM_THREADS=1 python benchmarks/structured_smollm2.py --levers --shapes B
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torch_pruning_peer as tp_peer  # noqa: E402
from generation_speed import onnx_session, time_generation  # noqa: E402

from hf_prune import StructuredConfig, distill, get_pruning_state, oneshot  # noqa: E402
from hf_prune.assets import smollm2_path, wikipedia_split  # noqa: E402
from hf_prune.cpu import machine_state  # noqa: E402
from hf_prune.evaluation import perplexity  # noqa: E402
from hf_prune.methods.structured.flops import flops_per_token  # noqa: E402
from hf_prune.methods.structured.targets import TargetShape, adapter_for, prunable_params, resolve_target  # noqa: E402
from hf_prune.oneshot.calibration import tokenize_texts  # noqa: E402
from hf_prune.state import get_training_record  # noqa: E402

SHAPES = {
    "A": {"target_sparsity": 0.3},
    "B": {"target_layers": 28, "target_kv_heads": 2, "target_intermediate_size": 864, "target_hidden_size": 528},
}
RESULTS = str(HERE / "results")
SPEED_BATCHES = {"ort": [1], "eager": [8]}  # ONNX Runtime at batch 1 (1 thread), eager PyTorch at batch 8
TORCH_PRUNING = "Torch-Pruning 1.6.1"
DISTILL_ROWS = "importance + reconstruction$"  # the uniform reconstruction row only, as before --distill-rows


def _row_stats(model, context: int) -> dict:
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    tables = emb.numel() + (0 if head is emb else head.numel())  # SmolLM2 ties its LM head to the embedding
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "non_embedding_params": params - tables, "flops_per_token": flops_per_token(model, context)}


def _non_embedding(d, t: TargetShape) -> int:
    """Non-embedding parameters of a decoder of shape `t`: its matrices, two RMSNorms per layer and the final one."""
    return prunable_params(d, t) + t.layers * 2 * t.hidden_size + t.hidden_size


def depth_for(dense, shape: str) -> int:
    """The layer count whose depth-only model is nearest the shape's non-embedding parameters."""
    ad = adapter_for(dense)
    d = ad.dims
    target = _non_embedding(d, resolve_target(StructuredConfig(**SHAPES[shape]), ad))
    per_layer = _non_embedding(d, TargetShape(1, d.head_units, d.intermediate_size, d.hidden_size)) - d.hidden_size
    return max(1, min(d.num_layers, round((target - d.hidden_size) / per_layer)))


def planned_rows(shape: str, dense, per_layer: bool = False) -> dict[str, dict]:
    """The one-shot rows of a shape: name -> `StructuredConfig` target fields. The depth-only row drops whole layers
    by block influence alone; it has no width cut, so there is nothing to refit (`reconstruct` does not apply).
    `per_layer` adds the reconstruction row with per-layer shapes (`uniform=False`, the same parameter budget)."""
    layers = depth_for(dense, shape)
    rows = {f"{shape} importance only": {**SHAPES[shape], "reconstruct": False},
            f"{shape} importance + reconstruction": {**SHAPES[shape], "reconstruct": True}}
    if per_layer:
        rows[f"{shape} importance + reconstruction, per-layer shapes"] = {**SHAPES[shape], "reconstruct": True,
                                                                           "uniform": False}
    rows[f"{shape} depth only ({layers} layers, block influence)"] = {"target_layers": layers}
    return rows


def unit_rows(shape: str, dense) -> dict[str, dict]:
    """The unit ablation of a shape (`--lever-units`): name -> `StructuredConfig` fields of the shape's cut of one
    unit kind alone (and of every width cut but the hidden one), importance only and with the refit where a refit
    applies. It says how much of the shape's loss each unit kind causes and how much of it the refit can win back:
    the hidden cut and dropped layers have no projection to refit under `refit_target="layer"`."""
    ad = adapter_for(dense)
    full, t = ad.dims, resolve_target(StructuredConfig(**SHAPES[shape]), ad)
    cuts = {"layers": ("target_layers", t.layers, full.num_layers, "layers"),
            "kv": ("target_kv_heads", t.kv_heads, full.head_units, "KV groups"),
            "ffn": ("target_intermediate_size", t.intermediate_size, full.intermediate_size, "FFN"),
            "hidden": ("target_hidden_size", t.hidden_size, full.hidden_size, "hidden")}
    cuts = {k: v for k, v in cuts.items() if v[1] < v[2]}
    heads = dense.config.num_attention_heads
    if "hidden" in cuts and t.hidden_size % heads:
        # alone, the hidden cut keeps every query head, and a plain config needs heads | hidden: the nearest such size
        # (SmolLM2 at B: 528 with 9 heads -> 531; the shape itself has 6 heads once the KV cut is made)
        near = int(t.hidden_size / heads + 0.5) * heads
        cuts["hidden"] = ("target_hidden_size", near, full.hidden_size, "hidden")
    combos = [[k] for k in cuts]
    if "hidden" in cuts and len(cuts) > 2:
        combos.append([k for k in cuts if k != "hidden"])
    rows = {}
    for combo in combos:
        fields = {cuts[k][0]: cuts[k][1] for k in combo}
        what = " + ".join(f"{cuts[k][3]} {cuts[k][1]}" for k in combo)
        refits = any(k in ("kv", "ffn") for k in combo)
        rows[f"{shape} cut {what} only, importance only"] = {**fields, "reconstruct": False}
        if refits:
            rows[f"{shape} cut {what} only, importance + reconstruction"] = {**fields, "reconstruct": True}
    return rows


def _damping(text: str) -> float | str:
    """A `--lever-damping` item: a number, or "auto" (`StructuredConfig(damping="auto")`)."""
    return text if text == "auto" else float(text)


def _is_distilled(r: dict) -> bool:
    return "distill_wall_s" in r or "from_row" in r


def distilled_name(row: str, steps: int, lr: float) -> str:
    """`"A importance + reconstruction + distillation (128 steps, lr 0.0001)"`: the name rows were recorded under
    before `--distill-rows`, so that a rerun recognises them (`_DISTILLED` parses it back)."""
    return f"{row} + distillation ({steps} steps, lr {lr:g})"


def distill_picks(data: dict, shapes: list[str], texts: list[str], steps: int, lr: float) -> list[tuple[str, str]]:
    """`(row, distilled row)` for every recorded before-training row of `shapes` (not dense, not itself distilled)
    whose name contains one of `texts`; a text ending in `$` must end the name instead (`"importance +
    reconstruction$"` picks the uniform reconstruction row, not its per-layer-shapes sibling). Rows whose distilled
    row is recorded already are left out."""
    picks = []
    for row, r in data["rows"].items():
        if row == "dense" or r.get("shape") not in shapes or _is_distilled(r):
            continue
        if any(row.endswith(t[:-1]) if t.endswith("$") else t in row for t in texts if t):
            name = distilled_name(row, steps, lr)
            if name not in data["rows"]:
                picks.append((row, name))
    return picks


def load_student(model_dir: str, device: str):
    """A saved row's model, to distil: a plain checkpoint loads as its own class, a per-layer-shapes one through
    hf_prune (imported above), both in fp32 as the one-shot runner returns them."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)


_DISTILLED = re.compile(r"(.+) \+ distillation \((\d+ steps, lr [^)]+)\)")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")


def _save_model(model, tokenizer, model_dir: str) -> str:
    model.save_pretrained(model_dir)  # uniform: a plain checkpoint of its class; per-layer shapes: loads via hf_prune
    tokenizer.save_pretrained(model_dir)
    return model_dir


def merge_save(out_json: str, data: dict) -> None:
    """Writes `data` to `out_json`, first adding the rows another run of this script recorded there since `data`
    was read (two rows distilled side by side, one process per core, share the file): under a lock, atomically."""
    import fcntl

    with open(out_json + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(out_json):
            with open(out_json) as fh:
                on_disk = json.load(fh).get("rows", {})
            for row, record in on_disk.items():
                data.setdefault("rows", {}).setdefault(row, record)
        with open(out_json + ".tmp", "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(out_json + ".tmp", out_json)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="B", help="comma-separated: A, B")
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--damping", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=1, help="torch threads (pruning, evaluation, eager timing)")
    p.add_argument("--name", default="structured_smollm2", help="results/NAME.json and .md")
    p.add_argument("--runs", default="runs/structured_smollm2", help="saved models: RUNS/NAME/<row>, ONNX exports")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="add a distilled row per --distill-rows row of each shape (128: 262k tokens)")
    p.add_argument("--distill-rows", default=DISTILL_ROWS,
                   help="comma-separated texts: the recorded before-training rows whose name contains one get a "
                        "distilled row, started from their saved model (a text ending in $ must end the name; default: "
                        "%(default)s; all: 'importance only,importance + reconstruction,depth only,Torch-Pruning')")
    p.add_argument("--per-layer", action="store_true",
                   help="add the reconstruction row with per-layer shapes (StructuredConfig(uniform=False)) per shape")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.add_argument("--distill-seq-len", type=int, default=256)
    p.add_argument("--distill-save-steps", type=int, default=0,
                   help="checkpoint the distillation every N steps under RUNS/NAME/<row>.checkpoints and resume from "
                        "there when rerun (long runs spread over sessions); 0: no checkpoints")
    p.add_argument("--distill-eval-every", type=int, default=0,
                   help="held-out perplexity (32 x 512) every N steps during distillation, kept beside the checkpoints "
                        "(across resumes) and in the row as `trajectory`")
    p.add_argument("--distill-bf16", default="auto", choices=["auto", "true", "false"],
                   help="bf16 autocast for distillation (auto: where the device runs bf16 natively)")
    p.add_argument("--device", default="cpu", help="pruning, evaluation and distillation device (cuda: "
                   "benchmarks/gpu_structured.sh); the speed pass always times on the CPU")
    p.add_argument("--no-depth", action="store_true", help="skip the depth-only rows")
    p.add_argument("--torch-pruning", action="store_true", help=f"add the {TORCH_PRUNING} row per shape")
    p.add_argument("--tp-tied-timeout", type=int, default=0,
                   help=f"seconds to let {TORCH_PRUNING} build its graph on the tied model (0: skip; a cut-off "
                        "build records its cProfile top 10)")
    p.add_argument("--speed", action="store_true",
                   help="only the speed pass: fill the generation columns of the rows in the JSON from their saved "
                        "models (re-pruning a one-shot or Torch-Pruning row whose model is missing)")
    p.add_argument("--speed-redo", action="store_true", help="re-time rows that already have speed columns")
    p.add_argument("--speed-rows", default="", help="time only rows whose name contains this text")
    p.add_argument("--speed-saved-only", action="store_true", help="time only rows whose model is saved (no re-pruning)")
    p.add_argument("--gen-prompt-len", type=int, default=32)
    p.add_argument("--gen-new-tokens", type=int, default=64)
    p.add_argument("--gen-rounds", type=int, default=3)
    p.add_argument("--onnx-atol", type=float, default=1e-3, help="see benchmarks/cofi_smollm2.py --onnx-atol")
    p.add_argument("--levers", action="store_true",
                   help="only the refit sweep: the reconstruction row of each shape at each --lever-windows (with "
                        "--damping) and each --lever-damping (with --calibration-windows), into NAME_levers.json")
    p.add_argument("--lever-windows", default="64,128")
    p.add_argument("--lever-damping", default="0.1,0.001")
    p.add_argument("--lever-units", action="store_true",
                   help="with --levers: the unit ablation of each shape instead of the sweep (each unit kind's cut "
                        "alone, importance only and refit; see unit_rows)")
    p.add_argument("--lever-baseline", action="store_true",
                   help="with --levers: the importance-only row at each --lever-windows (the refit's baseline at "
                        "equal calibration data) instead of the reconstruction rows")
    p.add_argument("--lever-refit-targets", default="",
                   help="StructuredConfig.refit_target values to add at --calibration-windows / --damping (e.g. dense)")
    args = p.parse_args(argv)
    if args.speed and args.device != "cpu":
        p.error("--speed times generation on the CPU (ONNX Runtime batch 1, eager batch 8): run it without --device")
    torch.set_num_threads(args.threads)
    settings = {"calibration_windows": args.calibration_windows, "seq_len": args.seq_len,
                "eval_windows": args.eval_windows, "damping": args.damping}
    name = f"{args.name}_levers" if args.levers else args.name
    out_json = os.path.join(RESULTS, f"{name}.json")
    data = json.load(open(out_json)) if os.path.exists(out_json) else {}
    if not args.levers and data.get("settings") != settings:
        data = {"settings": settings, "rows": {}}
    data.setdefault("rows", {})
    runs = os.path.join(args.runs, name)

    def save() -> None:
        os.makedirs(RESULTS, exist_ok=True)
        merge_save(out_json, data)
        with open(os.path.join(RESULTS, f"{name}.md"), "w") as fh:
            fh.write(table(data))

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration, held_out = wikipedia_split()
    held_out_ids = tokenize_texts(held_out, tokenizer)  # tokenised once: the 8 x 512 rows and the distilled 32 x 512
    eval_ids = held_out_ids[: args.eval_windows * args.seq_len]

    def load_dense():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(args.device)

    dense = load_dense()

    def ppl(model) -> float:
        return perplexity(model, input_ids=eval_ids, seq_len=args.seq_len, show_progress=False)

    def prune_row(kwargs: dict, windows: int, damping: float):
        config = StructuredConfig(**kwargs, damping=damping, num_calibration_samples=windows,
                                  max_seq_length=args.seq_len)
        return oneshot(dense, config, calibration=calibration, tokenizer=tokenizer, show_progress=False,
                       device=args.device)

    def oneshot_row(row: str, shape: str, kwargs: dict, windows: int, damping: float) -> dict:
        started = time.perf_counter()
        small = prune_row(kwargs, windows, damping)
        wall = time.perf_counter() - started
        m = get_pruning_state(small).metrics
        errors = m["reconstruction_error"].values()
        reconstructs = kwargs.get("reconstruct", True) and bool(errors)
        return {
            "shape": shape, "reconstruct": reconstructs, "config": kwargs, "perplexity": ppl(small),
            "pruning_wall_s": round(wall, 1), "sparsity": m["sparsity"], "target": m["target_architecture"],
            **_row_stats(small, args.seq_len), "kept_layer_indices": m["kept_layer_indices"],
            "mean_error_importance_only": _mean(e["importance_only"] for e in errors),
            "mean_error_reconstructed": _mean(e["reconstructed"] for e in errors) if reconstructs else None,
            **({"damping_chosen": {f"{d:g}": sum(e.get("damping") == d for e in errors)
                                   for d in sorted({e["damping"] for e in errors})}} if damping == "auto" else {}),
            "model_dir": _save_model(small, tokenizer, os.path.join(runs, _slug(row))),
        }

    if args.levers:
        for shape in args.shapes.split(","):
            kwargs = {**SHAPES[shape], "reconstruct": True}
            if args.lever_units:
                for row, fields in unit_rows(shape, dense).items():
                    if row not in data["rows"]:
                        data["rows"][row] = {**oneshot_row(row, shape, fields, args.calibration_windows, args.damping),
                                             "calibration_windows": args.calibration_windows, "damping": args.damping}
                        print(row, json.dumps(data["rows"][row]), flush=True)
                        save()
                continue
            grid = [(int(w), args.damping, "layer") for w in args.lever_windows.split(",") if w]
            grid += [(args.calibration_windows, _damping(x), "layer") for x in args.lever_damping.split(",") if x]
            grid += [(args.calibration_windows, args.damping, t) for t in args.lever_refit_targets.split(",") if t]
            if args.lever_baseline:  # importance only at the same calibration: the refit's gain at equal data
                grid = [(w, d, t if t != "layer" else None) for w, d, t in grid if t == "layer" and d == args.damping]
            for windows, damping, target in grid:
                row = f"{shape} importance {'only' if target is None else '+ reconstruction'}, {windows} windows"
                row += f", damping {damping if isinstance(damping, str) else f'{damping:g}'}" if target is not None else ""
                row += "" if target in ("layer", None) else f", refit target {target}"
                fields = {**kwargs, "reconstruct": False} if target is None else {**kwargs, "refit_target": target}
                if row not in data["rows"]:
                    data["rows"][row] = {**oneshot_row(row, shape, fields, windows,
                                                       damping), "calibration_windows": windows, "damping": damping}
                    data["settings"] = {**settings, "calibration_windows": "per row", "damping": "per row"}
                    print(row, json.dumps(data["rows"][row]), flush=True)
                    save()
        print(table(data))
        return

    if "dense" not in data["rows"]:
        data["rows"]["dense"] = {"shape": "dense", "perplexity": ppl(dense), **_row_stats(dense, args.seq_len)}
        save()

    def model_dir_of(row: str, r: dict) -> str | None:
        return rebuild(row, r, dense, load_dense, prune_row, tokenizer, runs, args)

    if args.speed:
        speed_pass(args, data, dense, path, held_out_ids, runs, save, model_dir_of)
        print(table(data))
        return
    if args.tp_tied_timeout and "torch_pruning_tied_probe" not in data:
        data["torch_pruning_tied_probe"] = tp_peer.tied_build_probe(load_dense, args.tp_tied_timeout)
        print("torch-pruning tied probe", json.dumps(data["torch_pruning_tied_probe"]), flush=True)
        save()
    for shape in args.shapes.split(","):
        for row, kwargs in planned_rows(shape, dense, args.per_layer).items():
            if row in data["rows"] or (args.no_depth and "depth only" in row):
                continue
            data["rows"][row] = oneshot_row(row, shape, kwargs, args.calibration_windows, args.damping)
            print(row, json.dumps(data["rows"][row]), flush=True)
            save()
        if args.torch_pruning and not any(r.get("method") == TORCH_PRUNING and r["shape"] == shape
                                          for r in data["rows"].values()):
            row, record = torch_pruning_row(shape, dense, load_dense, tokenizer, runs, ppl, args)
            data["rows"][row] = record
            print(row, json.dumps(record), flush=True)
            save()
        if not args.distill_steps:
            continue
        for row, distilled in distill_picks(data, [shape], args.distill_rows.split(","), args.distill_steps,
                                            args.distill_lr):
            record = distill_row(row, data["rows"][row], distilled, dense, calibration, tokenizer, held_out_ids,
                                 ppl, model_dir_of, runs, args)
            if record is None:
                print(f"{row}: no saved model and none can be rebuilt here, not distilled", flush=True)
                continue
            data["rows"][distilled] = record
            print(distilled, json.dumps(record), flush=True)
            save()
    print(table(data))


def torch_pruning_row(shape: str, dense, load_dense, tokenizer, runs: str, ppl, args) -> tuple[str, dict]:
    """The Torch-Pruning row of `shape` (see `benchmarks/torch_pruning_peer.py`), at the ratio whose non-embedding
    parameters are nearest the shape's; its model is saved, reloaded as a plain checkpoint and evaluated."""
    ad = adapter_for(dense)
    target = _non_embedding(ad.dims, resolve_target(StructuredConfig(**SHAPES[shape]), ad))
    started = time.perf_counter()
    ratio, predicted = tp_peer.ratio_for(load_dense, target)
    search = time.perf_counter() - started
    model = load_dense()
    timings = tp_peer.prune(model, ratio)
    row = f"{shape} {TORCH_PRUNING} (magnitude, ratio {ratio:g})"
    model_dir = _save_model(model, tokenizer, os.path.join(runs, _slug(row)))
    small = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    record = {
        "shape": shape, "method": TORCH_PRUNING, "ratio": ratio, "settings": tp_peer.SETTINGS,
        "target_non_embedding_params": target, "ratio_search_s": round(search, 1), **timings,
        "perplexity": ppl(small), "sparsity": 1.0 - tp_peer.non_embedding_params(small) / tp_peer.non_embedding_params(
            dense), "hidden_size": small.config.hidden_size, "intermediate_size": small.config.intermediate_size,
        "heads": small.config.num_attention_heads, "kv_heads": small.config.num_key_value_heads,
        **_row_stats(small, args.seq_len), "model_dir": model_dir,
        "predicted_non_embedding_params": predicted,  # the one-layer search's figure: equal when every layer is alike
    }
    return row, record


def distill_row(row: str, r: dict, name: str, dense, calibration, tokenizer, held_out_ids, ppl, model_dir_of,
                runs: str, args) -> dict | None:
    """The record of row `row` (record `r`) after logit distillation from `dense` (`hf_prune.distill`: windows of
    `--distill-seq-len` tokens of the calibration articles, 2 x 4 per step), started from the row's saved model
    (`model_dir_of(row, r)`, which rebuilds a missing one); its model is saved as `name`. None when the row has no
    model to start from."""
    model_dir = model_dir_of(row, r)
    if model_dir is None:
        return None
    small = load_student(model_dir, args.device)
    eval32 = held_out_ids[: 32 * 512]
    ckpt = os.path.join(runs, _slug(name) + ".checkpoints")
    trajectory = Trajectory(os.path.join(ckpt, "trajectory.json"), args.distill_eval_every, eval32)
    resumable = {}
    if args.distill_save_steps:
        resume = os.path.isdir(ckpt) and any(d.startswith("checkpoint-") for d in os.listdir(ckpt))
        resumable = dict(output_dir=ckpt, save_strategy="steps", save_steps=args.distill_save_steps, save_total_limit=2,
                         resume_from_checkpoint=True if resume else None)
        print(f"{name}: checkpoints in {ckpt}" + (", resuming from the newest" if resume else ""), flush=True)
    started = time.perf_counter()
    small = distill(small, dense, calibration, tokenizer, steps=args.distill_steps, seq_len=args.distill_seq_len,
                    batch_size=2, grad_accum=4, learning_rate=args.distill_lr,
                    bf16={"auto": "auto", "true": True, "false": False}[args.distill_bf16],
                    data_name="wikipedia_split() calibration articles",
                    callbacks=[trajectory] if args.distill_eval_every else None, **resumable)
    wall = time.perf_counter() - started
    state = get_pruning_state(small)  # a plain checkpoint has none: distill keeps its record on the model
    m = state.metrics if state is not None else get_training_record(small)
    return {
        "shape": r["shape"], "from_row": row, "reconstruct": bool(r.get("reconstruct")), "perplexity": ppl(small),
        "distill_wall_s": round(wall, 1),
        "perplexity_32x512": perplexity(small, input_ids=eval32, seq_len=512, show_progress=False),
        "distillation_tokens": m.get("distillation_tokens"), "distillation_train_loss":
        m.get("distillation_train_loss"), "distillation_precision": m.get("distillation_precision"),
        "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
        **{k: r[k] for k in ("sparsity", "target") if k in r},
        "machine_state": machine_state(), **_row_stats(small, args.seq_len),
        "model_dir": _save_model(small, tokenizer, os.path.join(runs, _slug(name))),
        **({"trajectory": trajectory.points, "distill_wall_s_all_sessions": trajectory.wall_all_sessions(wall)}
           if args.distill_eval_every or args.distill_save_steps else {}),
    }


class Trajectory(TrainerCallback):
    """Held-out perplexity (32 x 512) every `every` optimizer steps of a distillation, and the training wall time up
    to the last checkpoint, in `path` beside the run's checkpoints, so a run resumed in a later session keeps its
    earlier points and its whole wall time. A point is taken after the step's update, in eval mode."""

    def __init__(self, path: str, every: int, eval_ids: torch.Tensor):
        self.path, self.every, self.eval_ids = path, every, eval_ids
        saved = json.load(open(path)) if os.path.isfile(path) else {}
        self.points, self.base = saved.get("points", []), saved.get("wall_s_at_last_checkpoint", 0.0)
        self._started = time.perf_counter()

    def wall_all_sessions(self, this_session: float) -> float:
        """This session's wall plus the earlier sessions' up to the checkpoint this one resumed from."""
        return round(self.base + this_session, 1)

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.every or state.global_step % self.every or any(p["step"] == state.global_step for p in self.points):
            return
        was_training = model.training
        model.eval()
        ppl = perplexity(model, input_ids=self.eval_ids, seq_len=512, show_progress=False)
        model.train(was_training)
        self.points.append({"step": state.global_step, "perplexity_32x512": round(ppl, 3)})
        print(f"step {state.global_step}: held-out perplexity (32 x 512) {ppl:.3f}", flush=True)
        self._write()

    def on_save(self, args, state, control, **kwargs):
        self._write(wall=self.base + time.perf_counter() - self._started)

    def _write(self, wall: float | None = None) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        saved = json.load(open(self.path)) if os.path.isfile(self.path) else {}
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"points": self.points, "wall_s_at_last_checkpoint":
                       round(wall, 1) if wall is not None else saved.get("wall_s_at_last_checkpoint", 0.0)}, fh, indent=1)
        os.replace(tmp, self.path)


def rebuild(row: str, r: dict, dense, load_dense, prune_row, tokenizer, runs: str, args) -> str | None:
    """The saved model of row `row` (its record `r`), pruned again and saved when it is missing; None when the row
    cannot be rebuilt here (a distilled row without a saved model)."""
    if r.get("model_dir") and os.path.isfile(os.path.join(r["model_dir"], "config.json")):
        return r["model_dir"]
    saved = os.path.join(runs, _slug(row))  # saved by a run whose record of it another run's save replaced
    if os.path.isfile(os.path.join(saved, "config.json")):
        r["model_dir"] = saved
        return saved
    if args.speed_saved_only:
        return None
    planned = planned_rows(r["shape"], dense, per_layer=True) if r["shape"] in SHAPES else {}
    if row in planned:
        small = prune_row(planned[row], args.calibration_windows, args.damping)
    elif r.get("method") == TORCH_PRUNING:
        small = load_dense()
        tp_peer.prune(small, r["ratio"])
    else:
        return None
    r["model_dir"] = _save_model(small, tokenizer, os.path.join(runs, _slug(row)))
    return r["model_dir"]


def speed_pass(args, data: dict, dense, dense_dir: str, held_out_ids, runs: str, save, model_dir_of) -> None:
    """Greedy tokens/s of every row, each timed in one process with the dense model, interleaved (so each row's
    speed-up is against the dense timing of its own pass); see `benchmarks/generation_speed.py`."""
    speed_settings = {"prompt_len": args.gen_prompt_len, "new_tokens": args.gen_new_tokens, "rounds": args.gen_rounds,
                      "batches": SPEED_BATCHES, "ort_threads": 1, "eager_threads": args.threads,
                      "onnx_atol": args.onnx_atol}
    prompt = held_out_ids[: 8 * args.gen_prompt_len].view(8, args.gen_prompt_len)
    context = args.gen_prompt_len + args.gen_new_tokens // 2
    dense_flops = flops_per_token(dense, context)
    dense_onnx, dense_err, _ = onnx_session(dense_dir, os.path.join(runs, "onnx", "dense"), atol=args.onnx_atol,
                                            threads=1)
    for row, r in data["rows"].items():
        if row == "dense" or (r.get("speed", {}).get("settings") == speed_settings and not args.speed_redo):
            continue
        if args.speed_rows not in row:
            continue
        model_dir = model_dir_of(row, r)
        if model_dir is None:
            print(f"{row}: no saved model, not timed", flush=True)
            continue
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        onnx, err, check = onnx_session(model_dir, os.path.join(runs, "onnx", _slug(row)), atol=args.onnx_atol,
                                        threads=1)
        atol = args.onnx_atol
        if err and err.startswith("ExportVerificationError"):  # a model with huge logit noise (Torch-Pruning's
            atol = 10 * args.onnx_atol  # perplexity-1e5 rows): timed at a looser check, the first error kept
            onnx, retry_err, check = onnx_session(model_dir, os.path.join(runs, "onnx", _slug(row)), atol=atol,
                                                  threads=1)
            err = f"{err} (at atol {args.onnx_atol:g}; {retry_err or f'passed at {atol:g}'})"
        pair = {"dense": {"model": dense, "onnx": dense_onnx}, row: {"model": model, "onnx": onnx}}
        time_generation(pair, prompt, batches=SPEED_BATCHES, new_tokens=args.gen_new_tokens, rounds=args.gen_rounds)
        ratio = dense_flops / flops_per_token(model, context)
        for key, entry, flops_ratio, error in (("dense", pair["dense"], 1.0, dense_err), (row, pair[row], ratio, err)):
            tps, base = entry.get("tokens_per_s", {}), pair["dense"].get("tokens_per_s", {})
            speedup = {k: v / base[k] for k, v in tps.items() if k in base}
            data["rows"][key]["speed"] = {
                "settings": speed_settings, "tokens_per_s": tps, "dense_tokens_per_s": base, "speedup": speedup,
                "flops_ratio": flops_ratio, "flops_context": context,
                "speedup_over_flops_ratio": {k: v / flops_ratio for k, v in speedup.items()},
                "onnx_error": error, "onnx_verification": check if key == row else None,
                "onnx_atol": args.onnx_atol if key == "dense" else atol,
                "machine_state": machine_state()}
        print(row, json.dumps(r["speed"]), flush=True)
        save()
        del model, onnx, pair


def table(data: dict) -> str:
    lines = ["| Row | Perplexity | Params | Non-emb. params | Removed (non-emb.) | FLOPs/token | Mean rel. calib. error | "
             "Pruning wall | ORT b1 tok/s | eager b8 tok/s | FLOPs ratio | speed-up / FLOPs ratio (ORT b1, eager b8) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        err = r.get("mean_error_reconstructed") or r.get("mean_error_importance_only")
        lines.append(
            f"| {name} | {r['perplexity']:.2f} | {r['params'] / 1e6:.2f}M | {r['non_embedding_params'] / 1e6:.2f}M | "
            f"{r.get('sparsity', 0.0):.4f} | {r['flops_per_token'] / 1e6:.1f}M | "
            f"{'' if err is None else f'{err:.4f}'} | {_wall(r)} | {_speed(r)} |"
        )
    s = data["settings"]
    lines.append(f"\nSettings: {s['calibration_windows']} calibration windows x {s['seq_len']} tokens, held-out "
                 f"perplexity on {s['eval_windows']} windows x {s['seq_len']}, damping {s['damping']}; before any "
                 "training. FLOPs/token at a context of seq_len. Tokens/s: greedy generation, ONNX Runtime at batch 1 "
                 "on 1 thread and eager PyTorch at batch 8, each row timed in one process with the dense model "
                 "(speed-up vs that dense timing in brackets); FLOPs ratio: dense / row FLOPs per generated token at "
                 "the generation's mean context.")
    pairs = before_after(data)
    if pairs:
        lines.append("\nBefore -> after distillation (held-out perplexity, 8 x 512): " + "; ".join(
            f"**{shape}**: " + ", ".join(f"{row} {b:.2f} -> {a:.2f} ({steps})" for row, b, a, steps in rows)
            for shape, rows in pairs.items()) + ".")
    return "\n".join(lines) + "\n"


def before_after(data: dict) -> dict[str, list[tuple[str, float, float, str]]]:
    """Per shape, `(row without its shape, perplexity before, after, "N steps, lr X")` of each distilled row whose
    source row is recorded (rows of earlier runs have no `from_row`: their source is the name before the suffix)."""
    pairs: dict[str, list] = {}
    for name, r in data["rows"].items():
        m = _DISTILLED.fullmatch(name)
        if m is None or not _is_distilled(r):
            continue
        source = r.get("from_row", m.group(1))
        if source in data["rows"]:
            row = source[len(r["shape"]) + 1:] if source.startswith(f"{r['shape']} ") else source
            pairs.setdefault(r["shape"], []).append((row, data["rows"][source]["perplexity"], r["perplexity"],
                                                     m.group(2)))
    return pairs


def _speed(row: dict) -> str:
    """The speed columns (blank for a row not yet timed: the JSON of earlier runs has none)."""
    sp = row.get("speed")
    if not sp:
        return " | | | "
    cells = []
    for key in ("ort_b1", "eager_b8"):
        v, x = sp["tokens_per_s"].get(key), sp["speedup"].get(key)
        cells.append("–" if v is None else f"{v:.1f} ({x:.2f}x)")
    ratios = ", ".join("–" if sp["speedup_over_flops_ratio"].get(k) is None else
                       f"{sp['speedup_over_flops_ratio'][k]:.2f}" for k in ("ort_b1", "eager_b8"))
    return f"{cells[0]} | {cells[1]} | {sp['flops_ratio']:.2f}x | {ratios}"


def _wall(row: dict) -> str:
    if "distill_wall_s" in row:
        return f"{row['distill_wall_s']:.0f} s distillation; 32 x 512 ppl {row['perplexity_32x512']:.2f}"
    return f"{row['pruning_wall_s']:.0f} s" if "pruning_wall_s" in row else ""


if __name__ == "__main__":
    main()
