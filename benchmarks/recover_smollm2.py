"""Masked-LoRA recovery of ADMM-pruned SmolLM2-135M: held-out perplexity of dense, pruned and recovered.

Rows: dense; ADMM 60 %, 70 % and 2:4, each recovered with masked LoRA (`hf_prune.peft.recover`); and 2:4 with
plain (unmasked) peft LoRA, merged and then re-masked (what a user gets without masking). Protocol: ADMM
calibration = 64 windows of 512 tokens of the calibration articles of `hf_prune.assets.wikipedia_split()` (seed 0,
the protocol of benchmarks/oneshot_smollm2.py); recovery trains on the same calibration articles only (windows of
`--seq-len`, shuffled by the Trainer), never on the held-out articles; perplexity on the first `--eval-windows`
non-overlapping 512-token windows of the held-out articles. Each row is a fresh subprocess (its wall time and peak
RSS are its own) and stops training at `--max-train-minutes` even if `--steps` are not done (the steps done are
recorded). Every masked row asserts the merged mask equals the pruned one, saves the compressed export + card,
reloads it with `from_pretrained` and asserts it bit-equal.

Resumable: rows already in the JSON (same protocol) are skipped; run the same command again after an interruption.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/recover_smollm2.py
    python benchmarks/recover_smollm2.py --rows 2:4 0.7 --steps 40 --max-train-minutes 20 --out benchmarks/results/recover_smollm2_steps40.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from hf_prune.cpu import machine_state
from subprocess_rows import run_in_subprocess  # noqa: E402  (a sibling in benchmarks/, on the path when run as a script)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "recover_smollm2.json"
ROWS = ["2:4", "0.7", "2:4-plain", "0.6"]  # the rows the targets hinge on first, so partial results are useful
SETTING_DIR = {"0.6": "admm-0.6", "0.7": "admm-0.7", "2:4": "admm-2_4"}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pruned_checkpoint(workdir: Path, setting: str) -> Path:
    """The ADMM checkpoint for `setting` in `workdir`, pruned (in this process) if missing or not what it claims."""
    path = workdir / SETTING_DIR[setting]
    want = {"pattern": setting} if ":" in setting else {"sparsity": float(setting), "pattern": "unstructured"}
    try:
        pruning = json.loads((path / "config.json").read_text())["quantization_config"]["pruning"]["config"]
        if pruning["method"] == "admm" and pruning["num_calibration_samples"] == 64 and all(
            pruning[k] == v for k, v in want.items()
        ):
            return path
    except (OSError, KeyError, ValueError):
        pass
    import torch
    from transformers import AutoModelForCausalLM

    from hf_prune import ADMMConfig, oneshot
    from hf_prune.assets import smollm2_path

    print(f"  pruning ADMM {setting} into {path} ...", flush=True)
    calibration = torch.load(workdir / "data.pt")["calibration"]
    model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    oneshot(model, ADMMConfig(**want, num_calibration_samples=64, max_seq_length=512), calibration=calibration,
            show_progress=False)
    model.save_pretrained(path, overwrite=True)
    return path


def prepare(workdir: Path) -> None:
    """The ADMM calibration windows (the oneshot benchmark's protocol), tokenised once."""
    if (workdir / "data.pt").exists():
        return
    import torch
    from transformers import AutoTokenizer

    from hf_prune.assets import smollm2_path, wikipedia_split
    from hf_prune.oneshot.calibration import calibration_windows

    calib_texts, _ = wikipedia_split()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    workdir.mkdir(parents=True, exist_ok=True)
    calib = calibration_windows(calib_texts, tokenizer, num_samples=64, seq_len=512, seed=0)
    torch.save({"calibration": calib}, workdir / "data.pt")


class TimeBudget(TrainerCallback):
    """Stops training once `seconds` of training wall time have passed; records the training wall time."""

    def __init__(self, seconds: float):
        self.seconds, self.started, self.elapsed = seconds, None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.elapsed = time.perf_counter() - self.started
        if self.elapsed > self.seconds:
            control.should_training_stop = True


def _masks(model) -> dict:
    from hf_prune import get_pruning_state

    modules = dict(model.named_modules())
    return {n: modules[n].weight != 0 for n in get_pruning_state(model).module_sparsity}


def run_row(row: str, args) -> dict:
    """One row, in its own process."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.assets import smollm2_path, wikipedia_split
    from hf_prune.evaluation import perplexity

    started = time.perf_counter()
    torch.manual_seed(0)
    calib_texts, eval_texts = wikipedia_split()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    result = {"row": row}
    if row == "dense":
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        result["perplexity"] = round(perplexity(model, eval_texts, tokenizer, seq_len=512,
                                                max_windows=args.eval_windows, show_progress=False), 3)
        return result | {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_mb": round(_peak_rss_mb(), 1)}

    setting = row.removesuffix("-plain")
    checkpoint = pruned_checkpoint(args.workdir, setting)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    masks = _masks(model)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=args.target_modules, lora_dropout=0.0)
    budget = TimeBudget(args.max_train_minutes * 60)
    train = dict(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate, bf16="auto" if args.bf16 else False,
                 callbacks=[budget])
    result.update(setting=setting, mode="plain LoRA, merged, re-masked" if row.endswith("-plain") else "masked LoRA")
    if row.endswith("-plain"):
        from peft import get_peft_model

        from hf_prune.peft.recover import train_adapter, training_windows

        windows = training_windows(calib_texts, tokenizer, args.seq_len)
        trainer = train_adapter(get_peft_model(model, lora), windows, **train)
        merged = trainer.model.merge_and_unload()
        result["perplexity_plain_merged_unmasked"] = round(perplexity(
            merged, eval_texts, tokenizer, seq_len=512, max_windows=args.eval_windows, show_progress=False), 3)
        modules = dict(merged.named_modules())
        filled = sum(int(((modules[n].weight != 0) & ~m).sum()) for n, m in masks.items())
        result["pruned_entries_filled_by_merge"] = filled
        with torch.no_grad():
            for name, mask in masks.items():
                modules[name].weight.mul_(mask)
        result["perplexity_recovered"] = round(perplexity(
            merged, eval_texts, tokenizer, seq_len=512, max_windows=args.eval_windows, show_progress=False), 3)
        steps, precision = trainer.state.global_step, "bf16" if trainer.args.bf16 else "fp32"
    else:
        from hf_prune import get_pruning_state
        from hf_prune.peft.recover import recover

        merged = recover(model, calib_texts, tokenizer, lora_config=lora, seq_len=args.seq_len, eval_texts=eval_texts,
                         eval_windows=args.eval_windows, eval_seq_len=512,
                         data_name="wikipedia_split() calibration articles (80, never the held-out 26)", **train)
        metrics = get_pruning_state(merged).metrics
        modules = dict(merged.named_modules())
        for name, mask in masks.items():
            assert torch.equal(modules[name].weight != 0, mask), f"mask of {name} changed"
        out = args.workdir / f"recovered-{setting.replace(':', '_')}"
        merged.save_pretrained(out, overwrite=True)
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        for (name, p), (_, q) in zip(merged.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(p, q), f"{name} differs after save/from_pretrained"
        result.update(perplexity_pruned=metrics["recovery_perplexity_before"],
                      perplexity_recovered=metrics["recovery_perplexity_after"], mask_unchanged=True, saved_to=str(out))
        steps, precision = metrics["recovery_steps"], metrics["recovery_precision"]
    result.update(steps=steps, precision=precision, machine_state=machine_state(), tokens=steps * args.batch_size * args.seq_len,
                  train_wall_s=round(budget.elapsed, 1), s_per_step=round(budget.elapsed / max(steps, 1), 2),
                  wall_s=round(time.perf_counter() - started, 1), peak_rss_mb=round(_peak_rss_mb(), 1))
    return result


def table(report: dict) -> str:
    runs = {r["row"]: r for r in report["runs"]}
    dense = runs.get("dense", {}).get("perplexity")
    pruned = {r["setting"]: r["perplexity_pruned"] for r in runs.values() if "perplexity_pruned" in r}
    lines = [f"Dense perplexity: **{dense:.2f}**\n" if dense else "",
             "| row | pruned ppl | recovered ppl | log-gap closed | target (≤ √(dense·pruned)) | met | steps | tokens | "
             "train wall s | s/step | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        r = runs.get(row)
        if r is None:
            continue
        before = pruned.get(r["setting"])
        target = math.sqrt(dense * before) if dense and before else None
        closed = (f"{math.log(before / r['perplexity_recovered']) / math.log(before / dense):.0%}"
                  if dense and before else "–")
        label = f"ADMM {r['setting'] if ':' in r['setting'] else str(int(float(r['setting']) * 100)) + ' %'}, {r['mode']}"
        lines.append(
            f"| {label} | {before if before is not None else '–'} | {r['perplexity_recovered']:.2f} | {closed} | "
            f"{f'{target:.2f}' if target else '–'} | {('yes' if r['perplexity_recovered'] <= target else 'no') if target else '–'} | "
            f"{r['steps']} | {r['tokens']} | {r['train_wall_s']:.0f} | {r['s_per_step']} | {r['peak_rss_mb']:.0f} |"
        )
    plain = runs.get("2:4-plain")
    if plain:
        lines.append(f"\nPlain LoRA at 2:4 before re-masking (dense merged weights, sparsity lost): perplexity "
                     f"{plain['perplexity_plain_merged_unmasked']:.2f}; its merge filled "
                     f"{plain['pruned_entries_filled_by_merge']:,} pruned entries.")
    return "\n".join(line for line in lines if line is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--target-modules", default="all-linear")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32 (default: bf16 autocast where the CPU runs it natively, else fp32)")
    parser.add_argument("--max-train-minutes", type=float, default=30.0)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out 512-token windows (8 = 4,096 tokens)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--workdir", type=Path, default=HERE / "results" / ".recover_work")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--table", action="store_true", help="only print (and rewrite) the table of --out")
    parser.add_argument("--plot", action="store_true",
                        help="at the end, draw perplexity before/after recovery from --out (benchmarks/plots.py)")
    args = parser.parse_args()
    if args.table:
        report = json.loads(args.out.read_text())
        args.out.with_suffix(".md").write_text(table(report) + "\n")
        print(table(report))
        if args.plot:
            from plots import plot_after_run

            print(f"plot: {plot_after_run('recover', args.out)}")
        return
    if args.run_one:
        print(json.dumps(run_row(args.run_one, args)))
        return

    protocol = {k: getattr(args, k) for k in ("steps", "seq_len", "batch_size", "rank", "learning_rate",
                                              "target_modules", "bf16", "max_train_minutes", "eval_windows")}
    protocol.update(model="SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)", pruning="ADMM, 64 x 512 calibration",
                    training_data="wikipedia_split() calibration articles", evaluation="wikipedia_split() held-out "
                    f"articles, first {args.eval_windows} non-overlapping 512-token windows",
                    machine=f"{os.cpu_count()} CPU cores shared with other jobs, OMP_NUM_THREADS="
                            f"{os.environ.get('OMP_NUM_THREADS', 'default')}, nice {os.nice(0)}")
    report = json.loads(args.out.read_text()) if args.out.exists() else {"protocol": protocol, "runs": []}
    if report["protocol"] != protocol:
        raise SystemExit(f"{args.out} holds runs of another protocol ({report['protocol']}); pass another --out")
    prepare(args.workdir)
    done = {r["row"] for r in report["runs"]}
    for row in ["dense"] + [r for r in ROWS if r in args.rows]:
        if row in done:
            continue
        print(f"running {row} ...", flush=True)
        report["runs"].append(run_in_subprocess([sys.executable, __file__, "--run-one", row] + sys.argv[1:], f"row {row}"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))
    if args.plot:
        from plots import plot_after_run

        print(f"plot: {plot_after_run('recover', args.out)}")


if __name__ == "__main__":
    main()
