"""`hf-prune` command line.

    hf-prune oneshot PATH --method admm --sparsity 0.6 --calibration FILE --output DIR [--push-to-hub REPO]
    hf-prune oneshot PATH --method structured --set target_layers=N --set target_intermediate_size=M ... (or --sparsity S)
    hf-prune info DIR
    hf-prune push DIR REPO_ID
    hf-prune recover DIR --data FILE --steps N --output OUT [--eval FILE] [--bf16]
    hf-prune distill STUDENT_DIR --teacher TEACHER_DIR --data FILE --steps N --output OUT [--eval FILE] [--bf16]
    hf-prune export-onnx DIR OUT [--task auto|text-classification|fill-mask|text-generation] [--int8] [--opset N]
    hf-prune eval DIR --tasks T1,T2 [--limit N] [--batch-size B] [--num-fewshot K] [--include-path DIR] [--write-card]
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from .config import get_config_class, registered_methods
from .export import describe_export, format_description, push_pruned
from .export.hub import DEFAULT_TIMEOUT, PushError, check_timeout
from .output_dir import check_output
from .text_files import TextFiles, read_texts  # noqa: F401  (read_texts: public helper, kept importable from here)

logger = logging.getLogger("hf_prune")


# Files one of which `AutoTokenizer.from_pretrained` needs to find a tokenizer in a directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tekken.json")


def load_tokenizer(model_path: str, tokenizer_path: str | None, needed_for: str | None):
    """The tokenizer from `--tokenizer` or else from the model directory.

    Args:
        needed_for: why a tokenizer is needed (e.g. "to tokenise --calibration text"), or None when the run needs
            none (it is still loaded, and saved with the export, when the directory has one).

    Returns `None` when no tokenizer is needed and the directory has none; raises, naming the directory, the files
    looked for and `--tokenizer`, when one is needed and there is none (before the model is loaded).
    """
    from transformers import AutoTokenizer

    path = Path(tokenizer_path or model_path)
    flag = "--tokenizer" if tokenizer_path else "model directory"
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {str(path)!r} is not a directory (the Hub is not reached from here)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        if needed_for is None:
            logger.warning("%s has no tokenizer; the export is written without one", path)
            return None
        raise ValueError(
            f"{flag} {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}), and one is needed "
            f"{needed_for}: pass --tokenizer PATH, a directory holding the model's tokenizer (e.g. the original "
            "model's), or save it into the model directory (tokenizer.save_pretrained(DIR))"
        )
    return AutoTokenizer.from_pretrained(path)


def _parse_set(values: list[str]) -> dict:
    """`--set KEY=VALUE` pairs; a value is JSON when it parses as JSON (numbers, lists, true), else a string."""
    options = {}
    for item in values:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key in options:
            raise ValueError(f"--set {key}= is given twice")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def config_from_args(config_cls, flags: dict[str, tuple[str, object]], sets: list[str]):
    """Builds the method config from its dedicated flags and `--set` pairs.

    Args:
        config_cls: the `PruningConfig` subclass.
        flags: `{field: (flag, value)}`; a value of `None` means the flag was not given (the field's default holds).
        sets: the raw `--set KEY=VALUE` items; they may set any field, including a dedicated flag's field when that
            flag is not given too.
    """
    import dataclasses

    options = _parse_set(sets)
    fields = sorted(f.name for f in dataclasses.fields(config_cls) if f.init)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"--set {', '.join(unknown)}: not a field of {config_cls.__name__}; its fields: {', '.join(fields)}")
    kwargs = {}
    for name, (flag, value) in flags.items():
        if value is None:
            continue
        if name in options:
            raise ValueError(f"{flag} and --set {name}= both set {config_cls.__name__}.{name}; give it once")
        kwargs[name] = value
    return config_cls(**kwargs, **options)


def _oneshot_parser(sub) -> None:
    p = sub.add_parser("oneshot", help="prune an LLM in one shot from calibration text (ADMM, Wanda, SparseGPT, "
                                       "magnitude; structured width / depth pruning)")
    p.add_argument("model", help="path of a transformers checkpoint directory")
    p.add_argument("--method", default="admm",
                   help="one-shot method: admm (default), wanda, sparsegpt, magnitude, or structured (a physically "
                        "smaller model: --set target_layers=... --set target_intermediate_size=... or --sparsity)")
    p.add_argument("--sparsity", type=float, help="fraction of weights to zero, in (0, 1); implied by --pattern N:M; "
                                                  "structured: fraction of the non-embedding parameters to remove")
    p.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4")
    p.add_argument("--calibration", help="calibration text: .txt, .jsonl (text field) or a directory of them")
    p.add_argument("--num-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    p.add_argument("--eval", help="held-out text for perplexity before and after pruning (same formats)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="at most this many evaluation windows (only their tokens are read from --eval)")
    p.add_argument("--tokenizer", default=None,
                   help="directory of the tokenizer (default: the model directory); needed for --calibration/--eval")
    p.add_argument("--allow-repruning", action="store_true",
                   help="prune a model that hf_prune already pruned; both runs are recorded (refused otherwise)")
    p.add_argument("--output", required=True, help="directory to write the pruned model to")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --output directory")
    p.add_argument("--dense", action="store_true",
                   help="write ordinary dense safetensors (for runtimes that cannot read the compressed format)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export and its model card to this Hub repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    _timeout_argument(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="device to prune on (default: cuda if available, else cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field, e.g. --set iterations=30 --set mask_group=row")
    p.add_argument("--offload", action="store_true",
                   help="never load the whole model: prune block by block from the checkpoint and write each pruned "
                        "block straight into the compressed --output (for models bigger than memory); "
                        "resumable: finished blocks are kept, and the same command after an interruption continues "
                        "at the next block")
    p.add_argument("--restart", action="store_true",
                   help="with --offload: discard the finished blocks of an interrupted run into --output (kept in "
                        ".NAME.hf_prune-partial beside it) and start over")


def run_oneshot(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .evaluation import perplexity
    from .export import save_pruned
    from .methods.structured import StructuredConfig
    from .oneshot import OneShotConfig, oneshot
    from .state import get_pruning_state

    # Everything that can be checked is checked before the model is loaded.
    config_cls = get_config_class(args.method)
    structured = issubclass(config_cls, StructuredConfig)
    if not (structured or issubclass(config_cls, OneShotConfig)):
        one_shot = [m for m in registered_methods()
                    if issubclass(get_config_class(m), (OneShotConfig, StructuredConfig))]
        raise ValueError(f"--method {args.method!r} is not a one-shot method; choose from {one_shot}")
    common = {"num_calibration_samples": ("--num-samples", args.num_samples),
              "max_seq_length": ("--seq-len", args.seq_len)}
    if structured:
        # the physically smaller model: --sparsity is the fraction of non-embedding parameters removed
        if args.pattern is not None:
            raise ValueError("--pattern is for sparse one-shot methods; --method structured removes whole units")
        if args.offload:
            raise ValueError("--offload is for sparse one-shot methods; --method structured needs the model in memory")
        config = config_from_args(config_cls, {"target_sparsity": ("--sparsity", args.sparsity), **common}, args.set)
    else:
        config = config_from_args(
            config_cls, {"sparsity": ("--sparsity", args.sparsity), "pattern": ("--pattern", args.pattern), **common},
            args.set,
        )
    if args.restart and not args.offload:
        raise ValueError("--restart discards an interrupted --offload run; it needs --offload")
    output = Path(args.output)
    check_output(output, args.overwrite, sources=[args.model], what="--output")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise ValueError(f"--push-to-hub {args.push_to_hub!r} is not a valid repo id: {err}") from None
        check_timeout(args.timeout or None)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"model path {args.model!r} is not a directory (the Hub is not reached from here)")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise ValueError(f"--eval-windows must be >= 1, got {args.eval_windows}")
    calibration = _text_files(args.calibration, "calibration") if args.calibration else None
    if calibration is None and config.uses_calibration:
        raise ValueError(f"--method {args.method} needs --calibration text")
    eval_texts = _text_files(args.eval, "eval") if args.eval else None
    if calibration is not None and not config.uses_calibration:
        logger.warning("--method %s uses no calibration text; --calibration is ignored", args.method)
        calibration = None
    needed_for = " and ".join(
        [f"to tokenise the --calibration text (--method {args.method})"] * (calibration is not None)
        + ["to tokenise the --eval text"] * (eval_texts is not None)
    ) or None
    tokenizer = load_tokenizer(args.model, args.tokenizer, needed_for)
    if args.offload:
        return _run_oneshot_offloaded(args, config, calibration, eval_texts, tokenizer)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Loading {args.model} ({args.dtype}) on {device}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)
    ppl_before = ppl_after = None
    if eval_texts:
        ppl_before = perplexity(model, eval_texts, tokenizer, seq_len=config.max_seq_length, max_windows=args.eval_windows)
        print(f"perplexity before pruning: {ppl_before:.2f}", flush=True)
    started = time.perf_counter()
    model = oneshot(model, config, calibration=calibration, tokenizer=tokenizer,  # structured: a new, smaller model
                    allow_repruning=args.allow_repruning)
    elapsed = time.perf_counter() - started
    state = get_pruning_state(model)
    if eval_texts:
        ppl_after = perplexity(model, eval_texts, tokenizer, seq_len=config.max_seq_length, max_windows=args.eval_windows)
        state.metrics.update(perplexity_before=round(ppl_before, 3), perplexity_after=round(ppl_after, 3))
    state.base_model = state.base_model or args.model
    state.command = "hf-prune " + shlex.join(args.argv)
    overall = state.metrics["sparsity"] if structured else state.overall_sparsity
    eval_results = None
    if eval_texts:
        eval_results = [dict(task_type="text-generation", dataset_type="text", dataset_name=Path(args.eval).name,
                             metric_type="perplexity", metric_value=round(ppl_after, 3))]
    save_pruned(model, output, overwrite=args.overwrite, dense=args.dense, eval_results=eval_results,
                repo_id=args.push_to_hub, tokenizer=tokenizer)  # the tokenizer in the same atomic write
    if structured:
        m = state.metrics
        print(f"\nstructured pruning done in {elapsed:.1f}s: {m['target_architecture']}")
        print(f"  non-embedding parameters removed: {overall:.4f} ({m['prunable_params_before']:,} -> "
              f"{m['prunable_params_after']:,}); FLOPs/token {m['flops_per_token_before']:,} -> "
              f"{m['flops_per_token_after']:,}")
    else:
        print(f"\n{args.method} {config.pattern} pruning done in {elapsed:.1f}s")
        print(f"  pruned modules:    {len(state.module_sparsity)}, sparsity {overall:.4f}")
    if eval_texts:
        print(f"  perplexity:        {ppl_before:.2f} -> {ppl_after:.2f}")
    return _report_saved(output, args)


def _text_files(path: str, what: str) -> TextFiles:
    """`--calibration` / `--eval` files, read lazily (only what the run needs), checked up front."""
    source = TextFiles(path, what)
    source.check()
    return source


def _run_oneshot_offloaded(args, config, calibration, eval_texts, tokenizer) -> int:
    import torch

    from .oneshot import oneshot

    if eval_texts:
        raise ValueError("--eval needs the whole model in memory; it cannot be combined with --offload")
    if args.dense:
        raise ValueError("--dense cannot be combined with --offload, which writes the compressed export")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"Pruning {args.model} block by block ({args.dtype}) on {device}, writing {args.output}", flush=True)
    started = time.perf_counter()
    output = oneshot(args.model, config, calibration=calibration, tokenizer=tokenizer, offload_dir=args.output,
                     overwrite=args.overwrite, restart=args.restart, device=device, dtype=getattr(torch, args.dtype),
                     command="hf-prune " + shlex.join(args.argv))
    elapsed = time.perf_counter() - started  # the tokenizer was saved into the export, in the same atomic write
    print(f"\n{args.method} {config.pattern} pruning done in {elapsed:.1f}s (offloaded)")
    return _report_saved(output, args)


def _report_saved(output, args) -> int:
    """The one-shot command's last lines (in memory or offloaded): where the export went, its size, the push."""
    desc = describe_export(output, verify=False)
    print(f"  saved to:          {output.resolve()} ({desc['file_bytes'] / 1e6:.1f} MB of weights"
          + (f", {desc['file_bytes'] / desc['dense_bytes']:.3f}x dense)" if desc["dense_bytes"] else ")"))
    if args.push_to_hub:
        info = push_pruned(output, args.push_to_hub, private=args.private or None,
                           timeout=args.timeout or None)
        print(f"  pushed to:         {getattr(info, 'commit_url', None) or args.push_to_hub}")
    return 0


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="describe an export: method, sparsity per layer, sizes, whether the files verify")
    p.add_argument("directory", help="an export directory written by hf_prune (or any safetensors checkpoint)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip decoding every compressed tensor")
    p.add_argument("--per-module", action="store_true", help="one sparsity line per module (default: one per block)")


def run_info(args) -> int:
    desc = describe_export(args.directory, verify=not args.no_verify)
    print(json.dumps(desc, indent=2, default=str) if args.json else format_description(desc, per_module=args.per_module))
    return 0 if desc["verified"] in (True, None) else 1


def _push_parser(sub) -> None:
    p = sub.add_parser("push", help="upload an export directory (weights, config, model card) to the Hub")
    p.add_argument("directory", help="export directory written by hf_prune")
    p.add_argument("repo_id", help="Hub repository, e.g. user/smollm2-admm-50")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    _timeout_argument(p)


def _timeout_argument(p) -> None:
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds one Hub request may go without progress before the push fails (default "
                        f"{DEFAULT_TIMEOUT:g}; 0: no limit)")


def run_push(args) -> int:
    info = push_pruned(args.directory, args.repo_id, private=args.private or None, revision=args.revision,
                       commit_message=args.commit_message, create_pr=args.create_pr, timeout=args.timeout or None)
    print(f"pushed {args.directory} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def _recover_parser(sub) -> None:
    p = sub.add_parser("recover", help="recover a pruned checkpoint with masked LoRA on text, merged (mask kept exactly)")
    p.add_argument("directory", help="an hf_prune checkpoint (sparse export)")
    p.add_argument("--data", required=True, help="training text: .txt, .jsonl (text field) or a directory of them")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--output", required=True, help="directory for the merged compressed export")
    p.add_argument("--rank", type=int, default=16, help="LoRA r (lora_alpha = 2r), all linear layers")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval", help="held-out text: perplexity before and after recovery, recorded in the card")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many evaluation windows")
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast (weights stay in their dtype); on a "
                   "CPU without native bf16 it runs in fp32 with a warning (bf16 is emulated there, ~10x slower)")
    p.add_argument("--tokenizer", default=None, help="directory of the tokenizer (default: the checkpoint directory)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --output")


def _text_training_inputs(args, sources: list[str]) -> tuple[list[str], list[str] | None]:
    """The checks and texts every text-training command (`recover`, `distill`) starts with, before any model loads:
    an --output that is free (or --overwrite) and overlaps none of the `sources` directories, --steps >= 1, the --data
    texts and the optional --eval texts."""
    check_output(args.output, args.overwrite, sources=sources, what="--output")
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    texts = read_texts(args.data, "data")
    eval_texts = read_texts(args.eval, "eval") if args.eval else None
    return texts, eval_texts


def _save_trained(model, tokenizer, args, prefix: str, what: str, saved: str) -> int:
    """Records the command, prints the perplexity before -> after (with --eval), writes the model (its card records
    the run) and the tokenizer to --output."""
    from .export import save_pruned
    from .state import record_training

    record_training(model, {f"{prefix}_command": "hf-prune " + shlex.join(args.argv)})
    metrics = get_run_metrics(model)
    evals = None
    if args.eval:
        evals = [dict(task_type="text-generation", dataset_type="text", dataset_name=Path(args.eval).name,
                      metric_type="perplexity", metric_value=metrics[f"{prefix}_perplexity_after"])]
        print(f"held-out perplexity: {metrics[f'{prefix}_perplexity_before']:.3f} before {what} -> "
              f"{metrics[f'{prefix}_perplexity_after']:.3f} after")
    save_pruned(model, args.output, overwrite=args.overwrite, eval_results=evals, tokenizer=tokenizer)
    print(f"{saved} model saved to {args.output}")
    return 0


def get_run_metrics(model) -> dict:
    from .state import get_pruning_state, get_training_record

    state = get_pruning_state(model)
    return state.metrics if state is not None else get_training_record(model)


def run_recover(args) -> int:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from .peft.recover import recover

    texts, eval_texts = _text_training_inputs(args, sources=[args.directory])
    tokenizer = load_tokenizer(args.directory, args.tokenizer, "to tokenise the --data text")
    model = AutoModelForCausalLM.from_pretrained(args.directory)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
    merged = recover(model, texts, tokenizer, steps=args.steps, lora_config=config, seq_len=args.seq_len,
                     batch_size=args.batch_size, learning_rate=args.learning_rate, bf16=args.bf16,
                     eval_texts=eval_texts, eval_windows=args.eval_windows, data_name=Path(args.data).name)
    return _save_trained(merged, tokenizer, args, "recovery", "recovery", "recovered")


def _distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="train a (smaller) student to match a dense teacher's next-token "
                                       "distributions (logit distillation) on text")
    p.add_argument("student", help="the student checkpoint: a plain or structured-pruned causal LM directory")
    p.add_argument("--teacher", required=True, help="the dense teacher's checkpoint directory (same vocabulary)")
    p.add_argument("--data", required=True, help="training text: .txt, .jsonl (text field) or a directory of them")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--output", required=True, help="directory for the distilled student")
    p.add_argument("--eval", help="held-out text: perplexity of teacher and student before and after, in the card")
    p.add_argument("--eval-windows", type=int, default=None, help="at most this many evaluation windows")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training window (default 512)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per device and micro-batch (default 4)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate, cosine schedule (default 1e-4)")
    p.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 1.0)")
    p.add_argument("--alpha", type=float, default=None,
                   help="weight of the distillation term; the LM loss gets 1 - alpha (default 1.0: distillation alone)")
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast (weights stay in their dtype); on a "
                   "CPU without native bf16 it runs in fp32 with a warning (bf16 is emulated there, ~10x slower)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model in --output")
    p.add_argument("--checkpoint-dir", help="write Trainer checkpoints here (every --save-steps) and, when it already "
                   "holds some, resume from the newest: a long run that was stopped continues where it was")
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint every N steps (with --checkpoint-dir; default: --steps / 20)")


def _distill_checkpoints(args) -> dict:
    """`distill`'s Trainer arguments for --checkpoint-dir / --save-steps (checked before any model loads): the
    directory, a checkpoint every N steps, and resume from the newest one already there."""
    if args.checkpoint_dir is None:
        if args.save_steps is not None:
            raise ValueError("--save-steps needs --checkpoint-dir (where the checkpoints go)")
        return {}
    if args.save_steps is not None and args.save_steps < 1:
        raise ValueError(f"--save-steps must be >= 1, got {args.save_steps}")
    ckpt = Path(args.checkpoint_dir).resolve()
    for flag, other in (("--output", args.output), ("STUDENT_DIR", args.student), ("--teacher", args.teacher)):
        if ckpt == Path(other).resolve():
            raise ValueError(f"--checkpoint-dir must be a directory of its own, not {flag} ({other!r})")
    if ckpt.exists() and not ckpt.is_dir():
        raise ValueError(f"--checkpoint-dir: {args.checkpoint_dir!r} is a file, not a directory")
    resume = ckpt.is_dir() and any(p.is_dir() for p in ckpt.glob("checkpoint-*"))
    if resume:
        print(f"resuming from the newest checkpoint in {args.checkpoint_dir}", flush=True)
    return dict(output_dir=str(ckpt), save_strategy="steps", save_steps=args.save_steps or max(1, args.steps // 20),
                resume_from_checkpoint=True if resume else None)


def run_distill(args) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .training.distill import check_dense_student, distill
    from .training.distill_config import DistillationConfig
    from .training.distill_plugin import check_vocab

    # Everything that can be checked is checked before the models are loaded.
    for flag, path in (("STUDENT_DIR", args.student), ("--teacher", args.teacher)):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"{flag}: no such checkpoint directory: {path!r}")
    if Path(args.student).resolve() == Path(args.teacher).resolve():
        raise ValueError(f"STUDENT_DIR and --teacher are the same checkpoint ({args.teacher!r}); distil into a smaller "
                         "student (e.g. one pruned with hf-prune oneshot --method structured)")
    config = DistillationConfig(**{k: v for k, v in (("temperature", args.temperature), ("alpha", args.alpha))
                                   if v is not None})
    check_vocab(AutoConfig.from_pretrained(args.student).vocab_size, AutoConfig.from_pretrained(args.teacher).vocab_size)
    texts, eval_texts = _text_training_inputs(args, sources=[args.student, args.teacher])
    checkpoints = _distill_checkpoints(args)
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student)
    check_dense_student(student)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    print(f"distilling {args.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters) into "
          f"{args.student} ({sum(p.numel() for p in student.parameters()):,})", flush=True)
    student = distill(student, teacher, texts, tokenizer, steps=args.steps, config=config, seq_len=args.seq_len,
                      batch_size=args.batch_size, grad_accum=args.grad_accum, learning_rate=args.learning_rate,
                      bf16=args.bf16, eval_texts=eval_texts, eval_windows=args.eval_windows,
                      data_name=Path(args.data).name, teacher_name=args.teacher, **checkpoints)
    return _save_trained(student, tokenizer, args, "distillation", "distillation", "distilled")


def _export_onnx_parser(sub) -> None:
    p = sub.add_parser("export-onnx", help="export a (pruned) model to ONNX Runtime, checked against PyTorch, "
                                           "optionally int8")
    p.add_argument("model", help="a model directory (any hf_prune export, or a transformers checkpoint)")
    p.add_argument("output", help="directory to write model.onnx, config.json, tokenizer and card to")
    p.add_argument("--task", default="auto", help="auto (from the architecture, default), text-classification, "
                                                  "fill-mask or text-generation (with the KV cache)")
    p.add_argument("--int8", action="store_true", help="also write model_quantized.onnx (int8 weights, exact on "
                   "every CPU; see --int8-scheme)")
    p.add_argument("--int8-scheme", default="auto", choices=["auto", "dynamic", "blockwise"],
                   help="auto: blockwise for text generation, dynamic otherwise; dynamic: 7-bit per-channel weights, "
                   "activations quantized at run time (MatMulInteger); blockwise: weight-only 8-bit in blocks of 32 "
                   "(MatMulNBits)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    p.add_argument("--atol", type=float, default=1e-4,
                   help="the fp32 graph's max abs logit difference from PyTorch must be <= atol + rtol * max |logit| "
                        "(default 1e-4)")
    p.add_argument("--rtol", type=float, default=1e-5,
                   help="the part of the limit that grows with the largest logit (default 1e-5; 0: atol is absolute)")


def run_export_onnx(args) -> int:
    from .deploy import ExportVerificationError, export_onnx

    try:
        report = export_onnx(args.model, args.output, task=args.task, int8=args.int8, opset=args.opset,
                             int8_scheme=args.int8_scheme, overwrite=args.overwrite, atol=args.atol, rtol=args.rtol,
                             command="hf-prune " + shlex.join(args.argv))
    except ExportVerificationError as err:
        print(f"hf-prune export-onnx: error: {err}", file=sys.stderr)
        return 1
    v = report.verification
    print(f"exported {args.model} ({report.task}, opset {report.opset}) to {Path(report.path).resolve()}")
    print(f"  checked against PyTorch: max abs logit diff {v['max_abs_logit_diff']:.2e} (limit "
          f"{report.logit_tolerance:.2e}, max |logit| {v['max_abs_logit']:.3g}) over {v['positions']} positions")
    if report.int8 is not None:
        print(f"  {report.quantized_file} ({report.int8_scheme} int8): argmax agreement with PyTorch "
              f"{report.int8['argmax_agreement']:.4f}, verified on {report.verified_on}")
    print(f"  files: {', '.join(report.files)}")
    return 0


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="task accuracy with lm-evaluation-harness (the eval extra), optionally recorded "
                                    "in the model card")
    p.add_argument("directory", help="a checkpoint directory (an hf_prune export or any causal LM with its tokenizer)")
    p.add_argument("--tasks", required=True,
                   help="comma-separated lm-eval task names, e.g. hf_prune_wiki_cloze (local) or hellaswag,arc_easy "
                        "(their data comes from the Hugging Face Hub)")
    p.add_argument("--limit", type=float, default=None,
                   help="at most N examples per task (a value < 1: that fraction), for quick checks")
    p.add_argument("--batch-size", default="1", help="batch size, or 'auto' (default 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--include-path", action="append", default=None,
                   help="a directory of extra task YAML files (repeatable)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="load the weights as this dtype, e.g. bfloat16 (default: as saved)")
    p.add_argument("--write-card", action="store_true",
                   help="record the results in DIR/README.md's model-index (only the README is rewritten)")
    p.add_argument("--output-json", default=None, help="also write lm-eval's results as JSON to this file")


def run_eval(args) -> int:
    from .evaluation import evaluate_lm

    batch_size = args.batch_size
    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"--batch-size must be an integer or 'auto', got {batch_size!r}") from None
    if args.output_json and not Path(args.output_json).resolve().parent.is_dir():
        raise FileNotFoundError(f"--output-json {args.output_json!r}: its directory does not exist")
    limit = args.limit
    if limit is not None and limit >= 1:
        if limit != int(limit):
            raise ValueError(f"--limit must be a whole number of examples or a fraction < 1, got {limit}")
        limit = int(limit)
    try:
        results = evaluate_lm(args.directory, args.tasks, limit=limit, batch_size=batch_size,
                              num_fewshot=args.num_fewshot, include_path=args.include_path, device=args.device,
                              dtype=args.dtype, write_card=args.write_card)
    except ImportError as err:
        print(f"hf-prune eval: error: {err}", file=sys.stderr)
        return 2
    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"results written to {args.output_json}")
    if args.write_card:
        print(f"results recorded in {Path(args.directory) / 'README.md'} (model-index)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `hf-prune` argument parser; `hf_prune.cli_docs` generates `docs/cli.md` from it."""
    parser = argparse.ArgumentParser(prog="hf-prune", description="Pruning for the Hugging Face stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    _oneshot_parser(sub)
    _info_parser(sub)
    _push_parser(sub)
    _recover_parser(sub)
    _distill_parser(sub)
    _export_onnx_parser(sub)
    _eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in the model card as the command that reproduces the run
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"oneshot": run_oneshot, "info": run_info, "push": run_push, "recover": run_recover,
                "distill": run_distill, "export-onnx": run_export_onnx, "eval": run_eval}[args.command](args)
    except (ValueError, OSError, TypeError, PushError) as err:  # OSError: also OutputWriteError (a full disk)
        print(f"hf-prune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
