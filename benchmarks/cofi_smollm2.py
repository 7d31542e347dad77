"""Decoder CoFi benchmark on SmolLM2-135M: CoFi vs a one-shot structured baseline at the same exported shape and
token budget, ADMM 50 % unstructured, and the dense model. One command (resumable: finished runs are reused):

    nice -n 10 python benchmarks/cofi_smollm2.py            # full settings (the recipe's defaults)
    nice -n 15 python benchmarks/cofi_smollm2.py --quick     # minutes: checks the pipeline, figures meaningless

Rows:
- `cofi`: `integrations/cofi_smollm2.py` with the same flags (its run in `OUTPUT` is reused when it matches).
- `structured-baseline`: KV groups / neurons / hidden dims ranked by weight-times-activation norms and layers by
  block influence on the first `--importance-windows` training windows, pruned to exactly the CoFi export's shape
  through CoFi's export path, then the same continued training (same `TrainingArguments`, windows and loss);
  see `benchmarks/structured_baseline.py`.
- `admm-50`: `hf_prune.oneshot` ADMM at 50 % unstructured (`--admm-samples` windows of `--admm-seq-len` tokens of
  the calibration articles): the same parameter count as the 50 % shapes, not faster (dense kernels).
- `dense`: SmolLM2-135M as shipped.
- `cofi after one-shot A` (`--init-oneshot A`, a run of its own: only this row and `dense`, into
  `..._oneshot_A.{json,md}`, the run in `OUTPUT/cofi-after-oneshot-A`): `hf_prune.oneshot(StructuredConfig)` cuts
  the dense model to shape A of `benchmarks/structured_smollm2.py` (30 layers, 2 of 3 KV groups, the FFN width of
  30 % removed; `--oneshot-windows` x `--oneshot-seq-len` calibration tokens, the structured rows' 32 x 512), then
  CoFi, with the CoFi row's flags (target shape, loss, lr, token budget), learns the rest of the way: 2 layers, the
  FFN down to 864 and the hidden size to 528. A unit kind the cut already brought to its target is not gated.

    nice -n 10 python benchmarks/cofi_smollm2.py --init-oneshot A
Columns: held-out perplexity, parameters, FLOPs per generated token, greedy-generation tokens/s at batch 1 and 8
(eager PyTorch, and ONNX Runtime through `hf_prune.export_onnx`), each model timed in the same process, interleaved
over `--gen-rounds` rounds (median). Writes `benchmarks/results/cofi_smollm2{,_quick}.{json,md}`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _load_recipe():
    """`integrations/cofi_smollm2.py` (same file name as this one, so not importable by name from here)."""
    spec = importlib.util.spec_from_file_location("cofi_smollm2_recipe", HERE.parent / "integrations" / "cofi_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()
from generation_speed import onnx_session, time_generation  # noqa: E402
from structured_baseline import DistillationTrainer, prune_to_shape  # noqa: E402
from structured_smollm2 import SHAPES as STRUCTURED_SHAPES  # noqa: E402
from structured_smollm2 import _damping  # noqa: E402

from hf_prune.cpu import machine_state  # noqa: E402
from hf_prune.methods.cofi import describe_structure  # noqa: E402
from hf_prune.methods.cofi.arch import get_adapter  # noqa: E402
from hf_prune.methods.structured.flops import flops_per_token  # noqa: E402

QUICK = ["--train-windows", "8", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4",
         "--eval-windows", "2", "--eval-seq-len", "64", "--save-steps", "0", "--logging-steps", "1",
         "--importance-windows", "2", "--admm-samples", "4", "--admm-seq-len", "64", "--gen-prompt-len", "8",
         "--gen-new-tokens", "4", "--gen-rounds", "1", "--onnx-atol", "1e-2", "--oneshot-windows", "2",
         "--oneshot-seq-len", "64", "--output", "runs/cofi_smollm2_quick"]


# ----------------------------------------------------------------------------------------------------- the runs
# CoFi's own knobs: they do not change the baseline's run, so a finished baseline is reused when only they differ
COFI_ONLY = ("gate_lr", "lagrangian_lr", "gate_init_droprate", "warmup", "finetune")


def _done(path: str, settings: dict, ignore: tuple[str, ...] = ()) -> dict | None:
    done = recipe._read_json(path)
    if done is None:
        return None
    saved = {k: v for k, v in done.get("settings", {}).items() if k not in ignore}
    return done if saved == {k: v for k, v in settings.items() if k not in ignore} else None


def run_baseline(args, cofi: dict) -> dict:
    """The structured baseline at the CoFi export's shape, trained like CoFi; reused when its settings match."""
    if not cofi["structure"]["plain"]:  # refused before any work
        raise SystemExit("the structured baseline is built for a uniform CoFi export (a target architecture whose "
                         "config class accepts the shape); this CoFi export is heterogeneous")
    out = os.path.join(args.output, "baseline")
    settings = {**recipe.run_settings(args), "importance_windows": args.importance_windows,
                "structure": cofi["structure"]}
    done_file = os.path.join(out, "baseline_run.json")
    if (done := _done(done_file, settings, ignore=COFI_ONLY)) is not None:
        print(f"structured-baseline: reusing the finished run in {out}", flush=True)
        return done
    path, tokenizer, train, eval_ids = recipe.load_assets(args)
    dense, teacher = recipe.load_dense(path), recipe.load_dense(path)
    start = time.perf_counter()
    small, _ = prune_to_shape(dense, train.windows[: args.importance_windows], cofi["structure"])
    prune_s = time.perf_counter() - start
    del dense
    assert describe_structure(small) == cofi["structure"], "the baseline must have the CoFi export's shape"
    ppl_oneshot = recipe.held_out_perplexity(small, eval_ids, args)
    use_cache = small.config.use_cache  # Trainer sets it to `args.use_cache` (False); restored before the save
    trainer = DistillationTrainer(model=small, args=recipe.training_args(os.path.join(out, "trainer"), args, len(train)),
                                  train_dataset=train, teacher_model=teacher, temperature=args.temperature,
                                  hard_label_weight=args.hard_label_weight)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    ppl = recipe.held_out_perplexity(small, eval_ids, args)
    model_dir = os.path.join(out, "model")
    small.config.use_cache = use_cache  # so the saved baseline generates with the KV cache, as the CoFi export does
    small.save_pretrained(model_dir)  # a uniform shape: a stock LlamaForCausalLM with a plain config
    tokenizer.save_pretrained(model_dir)
    result = {"model_dir": model_dir, "oneshot_perplexity": ppl_oneshot, "perplexity": ppl, "prune_time_s": prune_s,
              "train_wall_time_s": wall, "train_steps": trainer.state.global_step,
              "train_tokens": recipe.train_tokens(args, len(train)),
              "train_log": [e for e in trainer.state.log_history if "loss" in e], "settings": settings}
    recipe._write_json(done_file, result)
    print(f"structured-baseline: perplexity one-shot {ppl_oneshot:.3f} -> trained {ppl:.3f} ({wall:.0f} s)", flush=True)
    return result


def run_admm(args) -> dict:
    from hf_prune import ADMMConfig, oneshot, save_pruned
    from hf_prune.assets import wikipedia_split

    out = os.path.join(args.output, "admm-50")
    settings = {"admm_samples": args.admm_samples, "admm_seq_len": args.admm_seq_len, "seed": args.seed,
                "eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len}
    done_file = os.path.join(args.output, "admm_run.json")
    if (done := _done(done_file, settings)) is not None:
        print(f"admm-50: reusing the finished run in {out}", flush=True)
        return done
    path, tokenizer, _, eval_ids = recipe.load_assets(args)
    model = recipe.load_dense(path)
    config = ADMMConfig(sparsity=0.5, num_calibration_samples=args.admm_samples, max_seq_length=args.admm_seq_len)
    start = time.perf_counter()
    oneshot(model, config, calibration=wikipedia_split()[0], tokenizer=tokenizer, show_progress=not args.quiet)
    prune_s = time.perf_counter() - start
    ppl = recipe.held_out_perplexity(model, eval_ids, args)
    save_pruned(model, out, overwrite=True, eval_results=[recipe.perplexity_eval_result(ppl)])
    tokenizer.save_pretrained(out)
    result = {"model_dir": out, "perplexity": ppl, "prune_time_s": prune_s, "settings": settings}
    recipe._write_json(done_file, result)
    print(f"admm-50: perplexity {ppl:.3f} ({prune_s:.0f} s)", flush=True)
    return result


# CoFi target field -> the `CoFiConfig` switch of the gates that prune it
GATE_SWITCHES = {"layers": "prune_layers", "kv_heads": "prune_heads", "intermediate_size": "prune_neurons",
                 "hidden_size": "prune_hidden"}


def oneshot_shape(args, dense) -> dict[str, int]:
    """The kept units of the `--init-oneshot` cut (`benchmarks/structured_smollm2.py`'s shape of that name, resolved
    on the dense model), refused before any work unless it lies between the dense model and CoFi's target, with
    something left for CoFi to cut."""
    from hf_prune import StructuredConfig
    from hf_prune.methods.structured.targets import adapter_for, resolve_target

    fields = STRUCTURED_SHAPES[args.init_oneshot]
    t = resolve_target(StructuredConfig(**fields), adapter_for(dense))
    shape = {n: getattr(t, n) for n in recipe.TARGETS}
    target = {n: getattr(args, f"target_{n}") for n in recipe.TARGETS}
    below = [f"{n} {shape[n]} < target {target[n]}" for n in recipe.TARGETS if shape[n] < target[n]]
    if below:
        raise SystemExit(f"--init-oneshot {args.init_oneshot} ({fields}) cuts below CoFi's target shape: "
                         f"{'; '.join(below)}")
    if shape == target:
        raise SystemExit(f"--init-oneshot {args.init_oneshot} is the target shape already: nothing left for CoFi")
    return shape


def oneshot_student(args, teacher, tokenizer, config, eval_ids):
    """`recipe.run_cofi`'s student for `--init-oneshot`: the dense model cut to the shape by `hf_prune.oneshot`
    (importance + least-squares refit), and a `CoFiConfig` that targets the CoFi row's shape from there. A dimension
    the cut already brought to its target is not gated (`prune_*=False`): its stochastic gates would only add noise
    to a run that has nothing to decide there."""
    from dataclasses import replace

    from hf_prune import StructuredConfig, oneshot

    shape = oneshot_shape(args, teacher)
    structured = StructuredConfig(**STRUCTURED_SHAPES[args.init_oneshot], damping=args.oneshot_damping,
                                  num_calibration_samples=args.oneshot_windows, max_seq_length=args.oneshot_seq_len,
                                  seed=args.seed)
    start = time.perf_counter()
    student = oneshot(teacher, structured, calibration=recipe.wikipedia_split()[0], tokenizer=tokenizer,
                      show_progress=not args.quiet)  # a new model: the teacher is left dense
    prune_s = time.perf_counter() - start
    c = student.config
    cut = {"layers": c.num_hidden_layers, "kv_heads": c.num_key_value_heads,
           "intermediate_size": c.intermediate_size, "hidden_size": c.hidden_size}
    assert cut == shape, f"the one-shot cut {cut} must have the shape it was resolved to, {shape}"
    done = [n for n in recipe.TARGETS if shape[n] == getattr(args, f"target_{n}")]
    config = replace(config, **{f"target_{n}": None for n in done}, **{GATE_SWITCHES[n]: False for n in done})
    ppl = recipe.held_out_perplexity(student, eval_ids, args)
    print(f"cofi after one-shot {args.init_oneshot}: one-shot to {shape} in {prune_s:.0f} s, perplexity {ppl:.3f}; "
          f"CoFi gates {[n for n in recipe.TARGETS if n not in done]}", flush=True)
    info = {"oneshot_shape": shape, "oneshot_perplexity": ppl, "prune_time_s": prune_s,
            "oneshot_config": structured.to_dict(), "ungated": done}
    return student, config, info


def run_cofi_after_oneshot(args) -> dict:
    """The `cofi after one-shot SHAPE` row: `recipe.run_cofi` from the one-shot student, in its own folder of
    `--output` (resumable like the CoFi row), with the CoFi row's training settings and target shape."""
    out = os.path.join(args.output, f"cofi-after-oneshot-{args.init_oneshot}")
    sub = argparse.Namespace(**{**vars(args), "output": out})
    extra = {"init_oneshot": args.init_oneshot, "oneshot_fields": STRUCTURED_SHAPES[args.init_oneshot],
             "oneshot_windows": args.oneshot_windows, "oneshot_seq_len": args.oneshot_seq_len,
             "oneshot_damping": args.oneshot_damping}
    result = recipe.run_cofi(sub, make_student=lambda *a: oneshot_student(args, *a), extra_settings=extra)
    if result["prunable_params"] != result["target_prunable_params"]:
        raise SystemExit(f"cofi after one-shot: the export has {result['prunable_params']:,} prunable weights, the "
                         f"target shape {result['target_prunable_params']:,}")
    return result


# ------------------------------------------------------------------------------------------------------ report
def table(rows: list[dict], batches: list[int]) -> str:
    dense = next(r for r in rows if r["name"] == "dense")
    cols = [f"{backend} b{b}" for backend in ("eager", "ort") for b in batches]
    lines = ["| model | held-out ppl | params | non-emb. params | FLOPs/token | FLOPs ratio | "
             + " | ".join(f"{c} tok/s" for c in cols) + " | train s |",
             "|---|---|---|---|---|---|" + "---|" * len(cols) + "---|"]
    for r in rows:
        speeds = []
        for c in cols:
            key = c.replace(" ", "_")
            v, base = r.get("tokens_per_s", {}).get(key), dense.get("tokens_per_s", {}).get(key)
            speeds.append("–" if v is None else f"{v:.1f} ({v / base:.2f}x)" if base else f"{v:.1f}")
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {r['params'] / 1e6:.2f}M | "
                     f"{r['non_embedding_params'] / 1e6:.2f}M | {r['flops_per_token'] / 1e6:.1f}M | "
                     f"{dense['flops_per_token'] / r['flops_per_token']:.2f}x | " + " | ".join(speeds)
                     + (f" | {r['train_wall_time_s']:.0f} |" if "train_wall_time_s" in r else " | – |"))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    recipe.add_arguments(p)
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in minutes")
    p.add_argument("--importance-windows", type=int, default=16, help="training windows the baseline ranks units on")
    p.add_argument("--admm-samples", type=int, default=64)
    p.add_argument("--admm-seq-len", type=int, default=512)
    p.add_argument("--gen-prompt-len", type=int, default=32, help="prompt tokens of the generation timing")
    p.add_argument("--gen-new-tokens", type=int, default=64)
    p.add_argument("--gen-rounds", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=None, help="intra-op threads of the timing (default: torch's)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime columns")
    p.add_argument("--onnx-atol", type=float, default=1e-3,
                   help="max |logit| difference export_onnx accepts (its default 1e-4 is below the float32 noise of "
                        "30 reordered layers with SmolLM2's large activations; the measured one is recorded)")
    p.add_argument("--results", default=None, help="results stem (default benchmarks/results/cofi_smollm2[_quick])")
    p.add_argument("--init-oneshot", choices=sorted(STRUCTURED_SHAPES), default=None,
                   help="instead of the rows above: the `cofi after one-shot SHAPE` row, CoFi started from the "
                        "structured one-shot cut to that shape of benchmarks/structured_smollm2.py (A: ~30 %% removed) "
                        "and learning the rest of the way to the target shape; results stem gets `_oneshot_SHAPE`")
    p.add_argument("--oneshot-windows", type=int, default=32, help="calibration windows of the one-shot cut")
    p.add_argument("--oneshot-seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--oneshot-damping", type=_damping, default=0.01,
                   help="the refit's damping, a number or 'auto' (structured_smollm2.py's rows: 0.01)")


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:  # the quick settings first, so that flags given explicitly still win
        args = p.parse_args(QUICK + argv)
    stem = args.results or str(HERE / "results" / ("cofi_smollm2_quick" if args.quick else "cofi_smollm2"))
    started = time.perf_counter()
    if args.init_oneshot:  # its own row and results file; the other rows' runs are neither redone nor reused
        stem += "" if args.results else f"_oneshot_{args.init_oneshot}"
        runs = {f"cofi after one-shot {args.init_oneshot}": ("cofi_after_oneshot", run_cofi_after_oneshot(args))}
    else:
        cofi = recipe.run_cofi(args)
        runs = {"cofi": ("cofi", cofi), "structured-baseline": ("structured_baseline", run_baseline(args, cofi)),
                "admm-50": ("admm", run_admm(args))}

    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    path, _, _, eval_ids = recipe.load_assets(args)
    dirs = {"dense": path, **{name: run["model_dir"] for name, (_, run) in runs.items()}}
    first = next(iter(runs.values()))[1]  # a CoFi run: it holds the dense perplexity
    ppl = {"dense": first["dense_perplexity"],
           **{name: run["reloaded_perplexity"] if "reloaded_perplexity" in run else run["perplexity"]
              for name, (_, run) in runs.items()}}
    context = args.gen_prompt_len + args.gen_new_tokens // 2
    models = {}
    for name, model_dir in dirs.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        emb = get_adapter(model).embedding().weight.numel()
        m = {"name": name, "model_dir": model_dir, "perplexity": ppl[name], "model": model,
             "params": sum(p.numel() for p in model.parameters()),
             "flops_per_token": flops_per_token(model, context)}
        m["non_embedding_params"] = m["params"] - emb  # the LM head is tied to the embedding in SmolLM2
        if not args.no_onnx:
            m["onnx"], m["onnx_error"], m["onnx_verification"] = onnx_session(
                model_dir, os.path.join(args.output, "onnx", name), atol=args.onnx_atol, threads=args.threads)
        models[name] = m
    for name, (_, run) in runs.items():
        if "train_wall_time_s" in run:
            models[name]["train_wall_time_s"] = run["train_wall_time_s"]
    prompt = eval_ids[: max(args.batches) * args.gen_prompt_len].view(max(args.batches), args.gen_prompt_len)
    time_generation(models, prompt, batches={"eager": args.batches, "ort": args.batches},
                    new_tokens=args.gen_new_tokens, rounds=args.gen_rounds)
    rows = [{k: v for k, v in m.items() if k not in ("model", "onnx")} for m in models.values()]
    result = {
        "rows": rows, **{key: {k: v for k, v in run.items() if k != "train_log"} for key, run in runs.values()},
        "protocol": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
        "generation_context": context, "command": "python benchmarks/cofi_smollm2.py " + " ".join(argv),
        "wall_time_s": time.perf_counter() - started, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "machine_state": machine_state(),
    }
    md = table(rows, args.batches)
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    recipe._write_json(stem + ".json", result)
    with open(stem + ".md", "w") as fh:
        fh.write(f"{md}\n\n`{result['command']}`; {result['date']}, {result['torch_threads']} threads, load "
                 f"average {result['load_average'][0]:.1f} on {result['cpu_count']} cores.\n")
    print(md)
    for r in rows:
        if r.get("onnx_error"):
            print(f"{r['name']}: ONNX Runtime export failed: {r['onnx_error']}")
    return result


if __name__ == "__main__":
    main()
