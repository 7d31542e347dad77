#!/usr/bin/env bash
# One-shot pruning of SmolLM2-135M on a CUDA GPU: ADMM, SparseGPT and Wanda at 50 %, the same protocol as
# benchmarks/oneshot_smollm2.py (its --device cuda). Checks each perplexity against the CPU run's recorded JSON
# (within 1 %) and prints pruning wall time and peak GPU memory. Without CUDA it prints "no CUDA: skipped", exits 0.
#
#   bash benchmarks/gpu_oneshot.sh            # needs a CUDA build of torch (the pinned CPU wheel has no CUDA)
set -euo pipefail
source "$(dirname "$0")/gpu_common.sh"
OUT=benchmarks/results/oneshot_smollm2_gpu.json
rm -f "$OUT"
"$PYTHON" benchmarks/oneshot_smollm2.py --device cuda \
    --methods wanda sparsegpt admm --settings 0.5 --out "$OUT"
"$PYTHON" - "$OUT" <<'PY'
import json, sys
gpu = {(r["method"], r["setting"]): r for r in json.load(open(sys.argv[1]))["runs"]}
cpu = {}
# the newest CPU figure of each (method, setting) wins: the shared-Gram re-run, then the full grid
for path in ("benchmarks/results/oneshot_smollm2.json", "benchmarks/results/oneshot_smollm2_shared_gram.json"):
    try:
        cpu.update({(r["method"], r["setting"]): r for r in json.load(open(path))["runs"]})
    except FileNotFoundError:
        pass
failed = []
print(f"{'method':10s} {'setting':7s} {'GPU ppl':>9s} {'CPU ppl':>9s} {'diff':>7s} {'prune s':>8s} {'peak GPU MB':>12s}")
for key, row in sorted(gpu.items()):
    ref = cpu.get(key)
    diff = (row["perplexity"] / ref["perplexity"] - 1) if ref else float("nan")
    print(f"{key[0]:10s} {key[1]:7s} {row['perplexity']:9.2f} {ref['perplexity'] if ref else float('nan'):9.2f} "
          f"{diff * 100:6.2f}% {row.get('prune_time_s', float('nan')):8.1f} {row.get('peak_gpu_mb', float('nan')):12.0f}")
    if key[0] != "dense" and (ref is None or abs(diff) > 0.01):
        failed.append(key)
if failed:
    sys.exit(f"GPU perplexity differs from the CPU run's by more than 1 % (or no CPU figure) for {failed}")
print("GPU perplexities within 1 % of the CPU run's")
PY
