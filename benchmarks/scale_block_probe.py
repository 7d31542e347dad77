"""Where an offloaded one-shot run's time goes on one block of the 1B synthetic LLaMA (TinyLlama's shape): the
statistics pass (block forward on every calibration batch with the Gram accumulation), each solver on those
statistics, and the advance pass (the block forward alone). Used to estimate the 1B runs of `scale_oneshot.py`
without running them: per block, a method costs stats + solve + forward (+ a few seconds of compression and
writing), times 22 blocks. Forwards and Gram scale linearly with the tokens, the solvers not at all, so a smaller
`--samples` is scaled up to `--target-samples`. Random weights and token ids (timing only).

    OMP_NUM_THREADS=1 python benchmarks/scale_block_probe.py --samples 16 --variants sparsegpt admm admm_bf16 admm_10it
"""

from __future__ import annotations

import argparse
import json
import time

VARIANTS = {  # name -> (method, config overrides)
    "sparsegpt": ("sparsegpt", {}),
    "admm": ("admm", {}),
    "admm_bf16": ("admm", {"matmul_precision": "bfloat16"}),
    "admm_10it": ("admm", {"iterations": 10, "mask_iterations": 8}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="calibration windows actually run")
    parser.add_argument("--target-samples", type=int, default=64, help="windows the estimate is for")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=22, help="blocks of the model the estimate is for")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_prune import get_config_class
    from hf_prune.oneshot.blocks import capture_block_inputs, find_blocks, linear_weight_view, run_block
    from hf_prune.oneshot.passes import collect_stats
    from hf_prune.oneshot.plan import plan_layers
    from hf_prune.oneshot.solver import LayerTask, build_solver

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=1, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    base = get_config_class("admm")(sparsity=0.5)
    blocks = find_blocks(model)
    scale = args.target_samples / args.samples
    out = {"samples_run": args.samples, "target_samples": args.target_samples, "seq_len": args.seq_len,
           "threads": torch.get_num_threads()}
    with torch.no_grad():
        inputs = capture_block_inputs(model, blocks, list(ids.split(base.calibration_batch_size)))
        block, entries = blocks.layers[0], plan_layers(blocks, base, None)[0]
        started = time.perf_counter()
        for hidden, extra, kwargs in zip(inputs.hidden, inputs.extra_args, inputs.kwargs):
            run_block(block, hidden, extra, kwargs)
        out["forward_s"] = round((time.perf_counter() - started) * scale, 1)
        started = time.perf_counter()
        stats = collect_stats(block, entries, inputs, True)
        out["stats_pass_s"] = round((time.perf_counter() - started) * scale, 1)
        weights = {e.name: linear_weight_view(e.module).detach().float().clone() for e in entries}
        for variant in args.variants:
            method, overrides = VARIANTS[variant]
            solver = build_solver(get_config_class(method)(sparsity=0.5, **overrides))
            started = time.perf_counter()
            for e in entries:
                solver.solve(LayerTask(name=e.name, weight=weights[e.name], sparsity=0.5, n_m=None,
                                       stats=stats[e.name]))
            solver.release()
            solve = time.perf_counter() - started
            block_s = out["stats_pass_s"] + solve + out["forward_s"]
            out[variant] = {"solve_s": round(solve, 1), "block_s": round(block_s, 1),
                            "run_estimate_min": round(block_s * args.blocks / 60, 1)}
            print(variant, out[variant], flush=True)
    reference = out.get("sparsegpt", {}).get("block_s")
    for variant in args.variants:
        if reference and variant != "sparsegpt":
            out[variant]["over_sparsegpt"] = round(out[variant]["block_s"] / reference, 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
