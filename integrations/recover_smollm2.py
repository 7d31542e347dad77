"""Recipe: ADMM-prune SmolLM2-135M, recover it with masked LoRA, merge, save compressed, reload, report perplexity.

Recovery trains on the calibration articles of `hf_prune.assets.wikipedia_split()` only (the text the pruning was
calibrated on), never on the held-out articles the perplexity is measured on. The merged model keeps the pruned
mask exactly (checked here), is saved as hf_prune's compressed export with a model card recording the pruning config
and the recovery (data, steps, adapter config, perplexity before/after), and is reloaded with `from_pretrained`
(checked bit-equal).

    python integrations/recover_smollm2.py                                  # ADMM 2:4, then 120 recovery steps
    python integrations/recover_smollm2.py --pruned outputs/smollm2-admm-24 --steps 40    # reuse a pruned export
    python integrations/recover_smollm2.py --sparsity 0.7 --output outputs/smollm2-admm-70-recovered

The same from the shell, on any hf_prune checkpoint:
    hf-prune recover outputs/smollm2-admm-24 --data calib.txt --eval eval.txt --steps 40 --seq-len 256 \\
        --learning-rate 2e-3 --bf16 --output outputs/smollm2-admm-24-recovered
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import ADMMConfig, get_pruning_state, oneshot
from hf_prune.assets import smollm2_path, wikipedia_split
from hf_prune.peft.recover import recover


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", help="an existing hf_prune checkpoint of SmolLM2-135M to recover (skips pruning)")
    parser.add_argument("--sparsity", type=float, default=None, help="ADMM sparsity (default: 2:4)")
    parser.add_argument("--pattern", default=None, help="N:M pattern, default 2:4 unless --sparsity is given")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-windows", type=int, default=8, help="held-out 512-token windows (8 = 4,096 tokens)")
    parser.add_argument("--output", default="outputs/smollm2-admm-24-recovered")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        sys.exit(f"{output} exists and is not empty; pass --overwrite to replace it")

    calibration, held_out = wikipedia_split()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    if args.pruned:
        model = AutoModelForCausalLM.from_pretrained(args.pruned, dtype=torch.float32)
        if get_pruning_state(model) is None:
            sys.exit(f"--pruned {args.pruned} is not an hf_prune checkpoint (no pruning state in its config.json)")
    else:
        pattern = args.pattern or ("unstructured" if args.sparsity is not None else "2:4")
        config = ADMMConfig(sparsity=args.sparsity, pattern=pattern, num_calibration_samples=64, max_seq_length=512)
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        print(f"pruning SmolLM2-135M with ADMM ({pattern}, sparsity {config.sparsity}) on the calibration articles ...")
        oneshot(model, config, calibration=calibration, tokenizer=tokenizer)
        get_pruning_state(model).base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state = get_pruning_state(model)
    masks = {n: m.weight != 0 for n, m in model.named_modules() if n in state.module_sparsity}

    started = time.perf_counter()
    merged = recover(model, calibration, tokenizer, steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                     learning_rate=args.learning_rate, bf16="auto", eval_texts=held_out, eval_windows=args.eval_windows,
                     eval_seq_len=512, lora_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                              target_modules="all-linear"),
                     data_name="wikipedia_split() calibration articles (80; the 26 held-out ones never seen)")
    elapsed = time.perf_counter() - started
    modules = dict(merged.named_modules())
    changed = [n for n, mask in masks.items() if not torch.equal(modules[n].weight != 0, mask)]
    if changed:
        raise SystemExit(f"the merged mask differs from the pruned one in {changed[:3]}")
    metrics = get_pruning_state(merged).metrics
    metrics["recovery_command"] = "python integrations/recover_smollm2.py " + " ".join(sys.argv[1:])
    merged.save_pretrained(output, overwrite=args.overwrite, eval_results=[dict(
        task_type="text-generation", dataset_type="wikipedia", dataset_name="Wikipedia (gensim test corpus, held out)",
        metric_type="perplexity", metric_value=metrics["recovery_perplexity_after"])])
    tokenizer.save_pretrained(output)

    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    for (name, p), (_, q) in zip(merged.state_dict().items(), reloaded.state_dict().items()):
        if not torch.equal(p, q):
            raise SystemExit(f"{name} differs after save_pretrained / from_pretrained")
    print(f"\nrecovered {metrics['recovery_steps']} steps ({metrics['recovery_tokens']:,} tokens) in {elapsed:.0f}s; "
          f"mask unchanged in all {len(masks)} pruned modules; reloaded bit-equal from {output.resolve()}")
    print(f"held-out perplexity: pruned {metrics['recovery_perplexity_before']:.2f} -> recovered "
          f"{metrics['recovery_perplexity_after']:.2f}")
    print(f"inspect it with: hf-prune info {output}")


if __name__ == "__main__":
    main()
