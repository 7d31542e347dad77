"""CoFi recipe: MiniLM teacher on Rotten Tomatoes sentences, then CoFi at 60 % and 90 %, then export. One command:

    flock /tmp/hf_prune_cpu.lock python integrations/cofi_minilm_sentiment.py --output runs/cofi_minilm

Steps (all standard Hugging Face pieces):
1. `AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)` fine-tuned with a stock `Trainer`
   on the 8,500 training sentences of `hf_prune.assets.rotten_tomatoes(seed)` (max length 64, batch 32, lr 5e-5,
   2 epochs): the teacher, saved to `OUTPUT/teacher` (reused if present).
2. For each target: a copy of the teacher is the student; `PruningTrainer(..., pruning_config=CoFiConfig(...))`
   learns the gates with distillation, the last part of the run fine-tunes with fixed masks (3 epochs below 80 %
   sparsity, 6 epochs from 80 %: see `cofi_epochs`). Batches are grouped by length
   (`train_sampling_strategy="group_by_length"`), which cuts the padding of these short sentences. A finished run
   whose settings match is reused (`OUTPUT/cofi-XX/cofi_run.json`), so an interrupted recipe resumes.
3. `trainer.export_pruned_model()` -> physically smaller `BertForSequenceClassification`, saved to `OUTPUT/cofi-XX`
   and reloadable with `AutoModelForSequenceClassification.from_pretrained` after `import hf_prune`.
Accuracy on the 2,068 test sentences is printed and written to `OUTPUT/results.json`. `--attention-layers N` caps the
attention sublayers of every run (`CoFiConfig.target_attention_layers`); `--attention-layer-variants 1 2` adds, from
80 % sparsity, runs keeping 1 and 2 (`OUTPUT/cofi-90-attn1`, ...), which trade accuracy for batch-1 latency.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_prune import CoFiConfig, PruningTrainer, get_pruning_state, save_pruned
from hf_prune.assets import minilm_path, rotten_tomatoes
from hf_prune.methods.cofi import describe_structure
from hf_prune.methods.cofi.structure import FORMAT as STRUCTURE_FORMAT


BASE_MODEL = "nreimers/MiniLM-L6-H384-uncased"  # the Hub id of the shipped MiniLM-L6 weights (model card metadata)
VARIANT_MIN_TARGET = 0.8  # --attention-layer-variants apply to the targets of at least this sparsity


def load_data(tokenizer, seed: int, max_length: int, max_train: int | None = None, max_test: int | None = None):
    split = rotten_tomatoes(seed)

    def build(rows):
        texts, labels = zip(*rows)
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": list(labels)})

    train, test = split["train"][:max_train], split["test"][:max_test]
    return build(train), build(test)


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def accuracy_eval_result(acc: float, seed: int) -> dict:
    """The model card's model-index entry for test accuracy on this split."""
    return dict(task_type="text-classification", dataset_type="rotten_tomatoes", dataset_name="Rotten Tomatoes sentences",
                dataset_split=f"test (seed {seed})", metric_type="accuracy", metric_value=round(acc, 4))


def common_args(output_dir: str, args, **kw) -> TrainingArguments:
    base = dict(
        output_dir=output_dir, per_device_train_batch_size=32, per_device_eval_batch_size=64, save_strategy="no",
        logging_steps=25, report_to=[], use_cpu=not torch.cuda.is_available(), seed=args.seed,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def train_teacher(args, tokenizer, train, test) -> tuple[str, dict]:
    path = os.path.join(args.output, "teacher")
    info_file = os.path.join(path, "teacher_run.json")
    if os.path.isfile(info_file):
        with open(info_file) as fh:
            return path, json.load(fh)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    trainer = Trainer(
        model=model, args=common_args(path, args, num_train_epochs=args.teacher_epochs, learning_rate=5e-5),
        train_dataset=train, eval_dataset=test, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    trainer.train()
    info = {"train_wall_time_s": time.perf_counter() - start, **trainer.evaluate()}
    trainer.save_model(path)
    tokenizer.save_pretrained(path)
    with open(info_file, "w") as fh:
        json.dump(info, fh, indent=2)
    return path, info


def run_cofi(args, tokenizer, teacher_path, train, test, target: float, distill: bool = True,
             teacher_accuracy: float | None = None, attention_variant: int | None = None) -> dict:
    """One CoFi run at `target`; `attention_variant=N` is the variant keeping N attention sublayers (`-attnN`)."""
    name = (f"cofi-{round(target * 100)}" + ("" if distill else "-nodistill")
            + (f"-attn{attention_variant}" if attention_variant is not None else ""))
    out = os.path.join(args.output, name)
    n_attention = attention_variant if attention_variant is not None else args.attention_layers
    settings = run_settings(args, target, distill, n_attention)
    done_file = os.path.join(out, "cofi_run.json")
    if os.path.isfile(done_file):
        with open(done_file) as fh:
            done = json.load(fh)
        if done.get("settings") == settings:
            print(f"{name}: reusing the finished run in {out}", flush=True)
            return done
    student = AutoModelForSequenceClassification.from_pretrained(teacher_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_path) if distill else None
    config = CoFiConfig(
        target_sparsity=target,
        sparsity_warmup_steps=args.warmup,
        finetune_steps=args.finetune,
        gate_learning_rate=args.gate_lr,
        lagrangian_learning_rate=args.lagrangian_lr,
        gate_init_droprate=args.gate_init_droprate,
        match_target_on_freeze=not args.no_match_target,
        multiple_of=args.multiple_of,
        target_attention_layers=n_attention,
    )
    trainer = PruningTrainer(
        model=student, teacher_model=teacher, pruning_config=config,
        args=common_args(out, args, num_train_epochs=cofi_epochs(args, target), learning_rate=args.lr,
                         train_sampling_strategy="group_by_length"),
        train_dataset=train, eval_dataset=test, data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    masked_acc = trainer.evaluate()["eval_accuracy"]
    small = trainer.export_pruned_model()
    eval_small = Trainer(model=small, args=common_args(out, args), eval_dataset=test,
                         data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    acc = eval_small.evaluate()["eval_accuracy"]
    if abs(acc - masked_acc) > 0.5 / len(test):  # the export must compute the masked model's function
        warnings.warn(f"{name}: the exported model's accuracy {acc:.4f} differs from the masked model's "
                      f"{masked_acc:.4f}; the export does not reproduce the masked model (please report this)")
    state = get_pruning_state(small)
    state.base_model = BASE_MODEL  # the teacher is this model fine-tuned here; its accuracy goes in the metrics
    state.command = args.command
    if teacher_accuracy is not None:
        state.metrics["teacher_accuracy"] = round(teacher_accuracy, 4)
    state.metrics.update(accuracy=round(acc, 4), masked_model_accuracy=round(masked_acc, 4), distill=distill)
    # the exported model with its card (accuracy as model-index); reloadable with from_pretrained after import hf_prune
    save_pruned(small, out, overwrite=True, eval_results=[accuracy_eval_result(acc, args.seed)])
    tokenizer.save_pretrained(out)
    metrics = state.metrics
    result = {
        "name": name, "target_sparsity": target, "distill": distill, "path": out,
        "accuracy": acc, "masked_model_accuracy": masked_acc,
        "sparsity": metrics["sparsity"], "params": metrics["params_after"],
        "prunable_params": metrics["prunable_params_after"], "train_wall_time_s": wall,
        "train_steps": trainer.state.global_step, "torch_threads": torch.get_num_threads(),
        "structure": describe_structure(small), "config": config.to_dict(), "settings": settings,
    }
    with open(done_file, "w") as fh:
        json.dump(result, fh, indent=2)
    return result


def cofi_epochs(args, target: float) -> float:
    """Length of the CoFi run at `target`: `--cofi-epochs` if given, else 4 epochs below 80 % sparsity and 6 from it.

    Measured on this split: at 90 % the student was 6.3 points below the teacher after 3 epochs and 3.9-4.7 after 6
    (two runs; the issue's bound is 5). At 60 % 3 epochs gave 0.96 points below the teacher while a removed
    sublayer still applied its LayerNorm and 2.2 points once it became the identity (one run each; the sublayers
    switching on and off while the gates train may cost accuracy), hence 4.
    """
    if args.cofi_epochs is not None:
        return args.cofi_epochs
    return 6.0 if target >= 0.8 else 4.0


def _attention_layers_arg(value: str) -> int | None:
    """`--attention-layers`: `CoFiConfig.target_attention_layers` of the main runs (`none`: free, as in the paper)."""
    if value == "none":
        return None
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a number of layers or `none`, got {value!r}")


def run_settings(args, target: float, distill: bool, n_attention: int | None) -> dict:
    """Everything that determines a CoFi run's result: a finished run is reused only if these match."""
    keys = ("seed", "max_length", "teacher_epochs", "lr", "gate_lr", "lagrangian_lr", "warmup",
            "finetune", "gate_init_droprate", "no_match_target", "max_train", "max_test", "multiple_of")
    return {"target": target, "distill": distill, "cofi_epochs": cofi_epochs(args, target),
            "attention_layers": n_attention,
            "structure_format": STRUCTURE_FORMAT,  # a run exported by an hf_prune with other semantics is redone
            **{k: getattr(args, k) for k in keys}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="runs/cofi_minilm")
    p.add_argument("--seed", type=int, default=0, help="seed of the Rotten Tomatoes split and of training")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--cofi-epochs", type=float, default=None,
                   help="length of every CoFi run (default: 4 epochs = 1,064 steps below 80 %% sparsity, 6 from 80 %%)")
    p.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.9])
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate of the student's weights")
    # CoFi's own defaults (0.01 / 0.01 / 0.5) are meant for ~20-epoch runs; in a run of a few hundred steps the
    # controller must move faster, and gates that start almost fully open avoid the early push *away* from the
    # target (expected sparsity ~0.4 at drop rate 0.5 while the target ramps up from 0), which otherwise winds lambda up.
    p.add_argument("--gate-lr", type=float, default=0.1)
    p.add_argument("--lagrangian-lr", type=float, default=0.1)
    p.add_argument("--gate-init-droprate", type=float, default=0.05, help="initial drop rate of every gate")
    p.add_argument("--warmup", type=float, default=0.5, help="sparsity warm-up (fraction of the pruning phase)")
    p.add_argument("--finetune", type=float, default=0.3, help="final fixed-mask phase (fraction of the run)")
    p.add_argument("--no-match-target", action="store_true",
                   help="keep the controller's own final masks instead of matching the target when fine-tuning starts")
    p.add_argument("--multiple-of", type=int, default=16,
                   help="hidden size and FFN widths of the exported model are multiples of this (CoFiConfig.multiple_of)")
    p.add_argument("--attention-layers", default=None, type=_attention_layers_arg,
                   help="attention sublayers the CoFi runs keep (CoFiConfig.target_attention_layers); `none`: free")
    p.add_argument("--attention-layer-variants", type=int, nargs="+", default=[],
                   help=f"also run each target of at least {VARIANT_MIN_TARGET * 100:.0f} %% sparsity keeping N attention "
                        "sublayers, for each N given (`cofi-XX-attnN`; fewer, wider sublayers run faster at batch 1)")
    p.add_argument("--no-distill-ablation", action="store_true", help="also run each target without the teacher")
    p.add_argument("--ablation-targets", type=float, nargs="+", default=None,
                   help="run the ablations only at these targets (default: every target)")
    p.add_argument("--ablation-only", action="store_true",
                   help="train only the ablation and variant runs (e.g. in a second process beside the main ones)")
    p.add_argument("--max-train", type=int, default=None, help="shorten: use only the first N training sentences")
    p.add_argument("--max-test", type=int, default=None, help="shorten: use only the first N test sentences")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command = run_command(argv)
    return args


def run_command(argv: list[str]) -> str:
    """The recipe command that was actually run: the very arguments argparse parsed, shell-quoted (never rebuilt from
    the namespace). Called from another script (the benchmark passes its own argument list), that script's command
    line follows as a shell comment."""
    command = ("python integrations/cofi_minilm_sentiment.py " + shlex.join(argv)).rstrip()
    if argv != sys.argv[1:]:
        command += "  # run by: python " + shlex.join(sys.argv)
    return command


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    train, test = load_data(tokenizer, args.seed, args.max_length, args.max_train, args.max_test)
    teacher_path, teacher_info = train_teacher(args, tokenizer, train, test)
    print(f"teacher: accuracy {teacher_info['eval_accuracy']:.4f}", flush=True)
    results = {"teacher": {"path": teacher_path, **teacher_info}, "runs": [],
               "protocol": {k: v for k, v in vars(args).items()}, "command": args.command}
    for target in args.targets:
        ablate = args.ablation_targets is None or target in args.ablation_targets
        variants = [(True, None)]  # (distill, attention-layer variant)
        if args.no_distill_ablation and ablate:
            variants.append((False, None))
        if target >= VARIANT_MIN_TARGET:
            variants += [(True, n) for n in args.attention_layer_variants]
        if args.ablation_only:
            variants = variants[1:]
        for distill, n_attention in variants:
            r = run_cofi(args, tokenizer, teacher_path, train, test, target, distill,
                         teacher_accuracy=teacher_info["eval_accuracy"], attention_variant=n_attention)
            print(f"{r['name']}: accuracy {r['accuracy']:.4f} (masked {r['masked_model_accuracy']:.4f}), "
                  f"sparsity {r['sparsity']:.3f}, params {r['params']}", flush=True)
            results["runs"].append(r)
    with open(os.path.join(args.output, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
