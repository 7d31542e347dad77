"""CoFi recipe: SmolLM2-135M -> about half its non-embedding parameters with a target architecture (Sheared-LLaMA
style), continued training with distillation from the dense model on Wikipedia, export, reload, perplexity. One command:

    python integrations/cofi_smollm2.py --output runs/cofi_smollm2

Steps (all standard Hugging Face pieces):
1. The shipped real model (`hf_prune.assets.smollm2_path()`) and the 80 calibration / 26 held-out Wikipedia articles
   of the one-shot recipe (`hf_prune.assets.wikipedia_split()`). Training text: `--train-windows` random,
   non-overlapping windows of `--seq-len` tokens of the calibration articles (seeded).
2. `PruningTrainer(model=student, teacher_model=dense, pruning_config=CoFiConfig(target_layers=28,
   target_kv_heads=2, target_intermediate_size=896, target_hidden_size=512, ...))`: next-token cross-entropy plus the
   KL to the dense model's next-token distribution; the gates learn during the first part of the run, the last
   `--finetune` of it trains the weights with the masks fixed at exactly the target shape. Default shape: 28 of 30
   layers, 2 of 3 KV groups (6 of 9 heads), FFN 864 of 1536, hidden 528 of 576 = 53.46M of the 106.17M prunable
   (non-embedding) weights, sparsity 0.4965. (Hidden 512 with FFN 896, 0.4988, would need `import hf_prune` to load:
   `LlamaConfig` refuses a hidden size that 6 heads do not divide, so the export could not be a plain config.)
3. `trainer.export_pruned_model()` -> a physically smaller `LlamaForCausalLM` with a plain `LlamaConfig`, saved to
   `OUTPUT/model` (with the model card), reloaded with `AutoModelForCausalLM.from_pretrained`; perplexity of the dense,
   the masked, the exported and the reloaded model on `--eval-windows` windows of `--eval-seq-len` held-out tokens.
Results: `OUTPUT/results.json`. A finished run whose settings match is reused (`OUTPUT/cofi_run.json`); an
interrupted one resumes from its last Trainer checkpoint (`OUTPUT/trainer/checkpoint-*`, every `--save-steps`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_prune import CoFiConfig, PruningTrainer, get_pruning_state, save_pruned
from hf_prune.assets import smollm2_path, wikipedia_split
from hf_prune.evaluation import perplexity
from hf_prune.methods.cofi import describe_structure
from hf_prune.methods.cofi.arch import get_adapter
from hf_prune.methods.cofi.structure import FORMAT as STRUCTURE_FORMAT
from hf_prune.oneshot.calibration import calibration_windows, tokenize_texts

logger = logging.getLogger("cofi_smollm2")

BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the Hub id of the shipped weights (model card metadata)
TARGETS = ("layers", "kv_heads", "intermediate_size", "hidden_size")


class WindowDataset(torch.utils.data.Dataset):
    """Fixed-length token windows for causal-LM training (labels = inputs; the model shifts them)."""

    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.windows[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def load_assets(args):
    """The tokenizer, the training windows and the held-out token ids the run uses."""
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration, evaluation = wikipedia_split()
    windows = calibration_windows(calibration, tokenizer, num_samples=args.train_windows, seq_len=args.seq_len,
                                  seed=args.seed)
    eval_ids = tokenize_texts(evaluation, tokenizer)[: args.eval_windows * args.eval_seq_len]
    return path, tokenizer, WindowDataset(windows), eval_ids


def load_dense(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def held_out_perplexity(model, eval_ids: torch.Tensor, args) -> float:
    return perplexity(model, input_ids=eval_ids, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size,
                      show_progress=not args.quiet)


def train_steps(args, num_windows: int) -> int:
    """Optimizer steps: `--max-steps`, else one pass over the training windows."""
    if args.max_steps is not None:
        return args.max_steps
    return max(1, num_windows // (args.batch_size * args.grad_accum))


def train_tokens(args, num_windows: int) -> int:
    """The token budget: every step reads `batch_size * grad_accum` windows of `seq_len` tokens."""
    return train_steps(args, num_windows) * args.batch_size * args.grad_accum * args.seq_len


def training_args(out: str, args, num_windows: int) -> TrainingArguments:
    """The continued-training settings; the benchmark's structured baseline trains with the same ones."""
    return TrainingArguments(
        output_dir=out, max_steps=train_steps(args, num_windows), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.lr_warmup_steps,
        lr_scheduler_type="cosine", weight_decay=0.0, logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, save_total_limit=1,
        report_to=[], use_cpu=not torch.cuda.is_available(), seed=args.seed, data_seed=args.seed,
        dataloader_num_workers=0, disable_tqdm=args.quiet,
    )


def cofi_config(args) -> CoFiConfig:
    return CoFiConfig(
        **{f"target_{n}": getattr(args, f"target_{n}") for n in TARGETS},
        sparsity_warmup_steps=args.warmup, finetune_steps=args.finetune, gate_learning_rate=args.gate_lr,
        lagrangian_learning_rate=args.lagrangian_lr, gate_init_droprate=args.gate_init_droprate,
        temperature=args.temperature, hard_label_weight=args.hard_label_weight,
    )


def target_prunable_params(dense: torch.nn.Module, args) -> tuple[int, int]:
    """(prunable weights of the target shape, of the dense model), from the adapter's size formula."""
    d = get_adapter(dense).dims
    kept = args.target_hidden_size * args.target_layers * (
        d.head_dim * (2 * d.group_size + 2) * args.target_kv_heads + d.ffn_matrices * args.target_intermediate_size)
    return kept, d.full_params


def run_settings(args) -> dict:
    """Everything that determines the run's result: a finished run (or a checkpoint) is reused only if these match."""
    keys = ("seed", "seq_len", "train_windows", "max_steps", "batch_size", "grad_accum", "lr", "lr_warmup_steps",
            "gate_lr", "lagrangian_lr", "gate_init_droprate", "warmup", "finetune", "temperature",
            "hard_label_weight", "eval_windows", "eval_seq_len", *(f"target_{n}" for n in TARGETS))
    return {"structure_format": STRUCTURE_FORMAT, **{k: getattr(args, k) for k in keys}}


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)  # a reader never sees half a file


def dense_perplexity(args, dense: torch.nn.Module, eval_ids: torch.Tensor) -> float:
    """The dense model's held-out perplexity, cached in `OUTPUT/dense.json` per evaluation setting."""
    cache = os.path.join(args.output, "dense.json")
    key = {"eval_windows": args.eval_windows, "eval_seq_len": args.eval_seq_len}
    cached = _read_json(cache)
    if cached and cached.get("settings") == key:
        return cached["perplexity"]
    ppl = held_out_perplexity(dense, eval_ids, args)
    _write_json(cache, {"settings": key, "perplexity": ppl})
    return ppl


def _resume_point(trainer_dir: str, settings: dict, overwrite: bool) -> bool:
    """Whether `trainer_dir` holds a checkpoint of this run to resume from; a checkpoint of other settings is an
    error (it is not deleted) unless `overwrite`."""
    stamp = os.path.join(trainer_dir, "run_settings.json")
    has_checkpoint = os.path.isdir(trainer_dir) and any(n.startswith("checkpoint-") for n in os.listdir(trainer_dir))
    if not has_checkpoint:
        return False
    if _read_json(stamp) == settings:
        return True
    if not overwrite:
        raise SystemExit(f"{trainer_dir} holds checkpoints of a run with other settings; pass --overwrite to discard "
                         "them or choose another --output")
    shutil.rmtree(trainer_dir)
    return False


@torch.no_grad()
def export_logit_diffs(masked: torch.nn.Module, small: torch.nn.Module, ids: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| of the export vs the masked model on `ids`, in float32 and in float64 (the folding
    reorders float32 roundings, which 30 layers with SmolLM2's large residual activations accumulate; float64 shows
    the functions are the same). Both models are back in float32 afterwards (float32 -> float64 -> float32 is exact)."""
    masked.eval()
    out = {}
    for name, dtype in (("", torch.float32), ("_float64", torch.float64)):
        masked.to(dtype)
        small.to(dtype)
        diff = (small(input_ids=ids).logits - masked(input_ids=ids).logits).abs().max()
        out[f"export_vs_masked_max_abs_logit_diff{name}"] = float(diff)
    masked.float()
    small.float()
    out["max_abs_logit"] = float(small(input_ids=ids).logits.abs().max())
    return out


def perplexity_eval_result(ppl: float) -> dict:
    """The model card's model-index entry for held-out perplexity."""
    return {"task_type": "text-generation", "dataset_type": "wikipedia",
            "dataset_name": "Wikipedia (gensim test corpus, held out)", "metric_type": "perplexity",
            "metric_value": round(ppl, 3)}


def run_cofi(args, make_student=None, extra_settings: dict | None = None) -> dict:
    """The whole recipe (or the finished run it finds); returns the results written to `OUTPUT/results.json`.

    `make_student(teacher, tokenizer, config, eval_ids) -> (student, config, info)` makes another student than the dense
    model (the benchmark's one-shot cut, `benchmarks/cofi_smollm2.py --init-oneshot`), with the `CoFiConfig` it
    trains under and what to add to the results; `extra_settings` are the settings it depends on. The target shape
    and the sparsity are still those of the dense model: CoFi's target architecture counts units, not fractions.
    """
    os.makedirs(args.output, exist_ok=True)
    settings = {**run_settings(args), **(extra_settings or {})}
    done_file = os.path.join(args.output, "cofi_run.json")
    done = _read_json(done_file)
    if done is not None and done.get("settings") == settings:
        print(f"cofi: reusing the finished run in {args.output}", flush=True)
        return done
    trainer_dir = os.path.join(args.output, "trainer")
    resume = _resume_point(trainer_dir, settings, args.overwrite)  # before any work
    config = cofi_config(args)  # field checks
    path, tokenizer, train, eval_ids = load_assets(args)
    teacher, start_info = load_dense(path), {}
    kept, full = target_prunable_params(teacher, args)
    if make_student is None:
        student = load_dense(path)
    else:
        student, config, start_info = make_student(teacher, tokenizer, config, eval_ids)
    # refuses a target the model cannot have, before any work
    trainer = PruningTrainer(model=student, teacher_model=teacher, pruning_config=config,
                             args=training_args(trainer_dir, args, len(train)), train_dataset=train)
    ppl_dense = dense_perplexity(args, teacher, eval_ids)
    params_dense = sum(p.numel() for p in teacher.parameters())
    print(f"SmolLM2-135M: {len(train)} training windows of {args.seq_len} tokens, "
          f"{train_tokens(args, len(train)):,} training tokens; target {kept:,} of {full:,} prunable weights "
          f"(sparsity {1 - kept / full:.4f}); dense perplexity {ppl_dense:.3f}", flush=True)
    os.makedirs(trainer_dir, exist_ok=True)
    _write_json(os.path.join(trainer_dir, "run_settings.json"), settings)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if resume else None)
    wall = time.perf_counter() - start
    trainer.teacher_model = None  # frees the teacher: no longer needed
    del teacher
    ppl_masked = held_out_perplexity(student, eval_ids, args)
    small = trainer.export_pruned_model()
    ppl_export = held_out_perplexity(small, eval_ids, args)
    diffs = export_logit_diffs(student, small, eval_ids[: min(128, args.eval_seq_len)].unsqueeze(0))
    state = get_pruning_state(small)
    state.base_model = BASE_MODEL
    state.command = "python integrations/cofi_smollm2.py " + " ".join(sys.argv[1:])
    state.metrics.update(perplexity_before=round(ppl_dense, 3), perplexity_after=round(ppl_export, 3))
    model_dir = os.path.join(args.output, "model")
    save_pruned(small, model_dir, overwrite=True, eval_results=[perplexity_eval_result(ppl_export)])
    tokenizer.save_pretrained(model_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    ppl_reloaded = held_out_perplexity(reloaded, eval_ids, args)
    metrics = state.metrics
    result = {
        "model_dir": model_dir, "dense_perplexity": ppl_dense, "masked_perplexity": ppl_masked,
        "export_perplexity": ppl_export, "reloaded_perplexity": ppl_reloaded,
        **diffs,
        # against the dense model (the card's `metrics` count against the student CoFi started from)
        "sparsity": 1 - metrics["prunable_params_after"] / full, "prunable_params": metrics["prunable_params_after"],
        "target_prunable_params": kept, "prunable_params_dense": full, "params": metrics["params_after"],
        "params_dense": params_dense, "structure": describe_structure(small), **start_info,
        "reloaded_config": {k: getattr(reloaded.config, k) for k in (
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
            "head_dim")},
        "train_steps": trainer.state.global_step, "train_tokens": train_tokens(args, len(train)),
        "train_wall_time_s": wall, "resumed": resume, "torch_threads": torch.get_num_threads(),
        "train_log": [e for e in trainer.state.log_history if "loss" in e],
        "config": config.to_dict(), "settings": settings, "command": state.command,
    }
    _write_json(done_file, result)
    _write_json(os.path.join(args.output, "results.json"), result)
    print(f"cofi: perplexity dense {ppl_dense:.3f} -> masked {ppl_masked:.3f}, exported {ppl_export:.3f}, reloaded "
          f"{ppl_reloaded:.3f}; sparsity {result['sparsity']:.4f}, {result['prunable_params']:,} prunable weights; "
          f"export vs masked logits {diffs['export_vs_masked_max_abs_logit_diff']:.2e} (float64: "
          f"{diffs['export_vs_masked_max_abs_logit_diff_float64']:.2e}); {wall:.0f} s of training", flush=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's flags (the benchmark adds its own to the same parser)."""
    p.add_argument("--output", default="runs/cofi_smollm2")
    p.add_argument("--overwrite", action="store_true", help="discard checkpoints of a run with other settings")
    p.add_argument("--seed", type=int, default=0, help="seed of the training windows and of training")
    p.add_argument("--target-layers", type=int, default=28)
    p.add_argument("--target-kv-heads", type=int, default=2, help="KV groups per layer (each with its 3 query heads)")
    p.add_argument("--target-intermediate-size", type=int, default=864)
    p.add_argument("--target-hidden-size", type=int, default=528,
                   help="a multiple of the kept query heads: LlamaConfig refuses others as a plain config")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    p.add_argument("--train-windows", type=int, default=1024, help="training windows drawn from the calibration text")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one pass over the windows)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward (memory: logits are 49k wide)")
    p.add_argument("--grad-accum", type=int, default=4, help="forwards per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of the model's weights (cosine decay)")
    p.add_argument("--lr-warmup-steps", type=int, default=8)
    # short runs need a fast controller and gates that start almost open (see the MiniLM recipe's comment)
    p.add_argument("--gate-lr", type=float, default=0.1)
    p.add_argument("--lagrangian-lr", type=float, default=0.1)
    p.add_argument("--gate-init-droprate", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.5, help="target ramp (fraction of the pruning phase)")
    p.add_argument("--finetune", type=float, default=0.3, help="final fixed-mask phase (fraction of the run)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the next-token distillation")
    p.add_argument("--hard-label-weight", type=float, default=1.0, help="weight of the next-token cross-entropy")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows (32 x 512 = 16k tokens)")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-batch-size", type=int, default=2)
    p.add_argument("--logging-steps", type=int, default=8)
    p.add_argument("--save-steps", type=int, default=32, help="Trainer checkpoint every N steps (0: none)")
    p.add_argument("--quiet", action="store_true", help="no tqdm bars")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    return run_cofi(args)


if __name__ == "__main__":
    main()
