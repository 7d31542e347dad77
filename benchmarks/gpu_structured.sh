#!/usr/bin/env bash
# The distilled rows of the structured benchmark (issue 30) on a CUDA GPU: SmolLM2-135M pruned to shapes A and B by
# `StructuredConfig` (importance + least-squares refit), then logit distillation from the dense model through
# `hf_prune.distill` (bf16 autocast), at 262k tokens (128 steps x 2048) for both shapes, a learning-rate lever at B,
# and 1M tokens (512 steps) at A. Rows are added to benchmarks/results/structured_smollm2.{json,md} (each records its
# device); the speed columns stay a CPU pass (`--speed`). On this project's 2-core CPU one 262k-token row takes
# about 26 minutes with 2 threads alone (12 s a step) and 1M tokens about 1.7 hours, so the 1M rows are measured
# where a GPU is lent.
# Without CUDA it prints "no CUDA: skipped" and exits 0.
#
#   bash benchmarks/gpu_structured.sh        # needs a CUDA build of torch (the pinned CPU wheel has no CUDA)
set -euo pipefail
source "$(dirname "$0")/gpu_common.sh"
run() { "$PYTHON" benchmarks/structured_smollm2.py --device cuda --no-depth "$@"; }
run --shapes B --distill-steps 128 --distill-lr 1e-4
run --shapes B --distill-steps 128 --distill-lr 3e-4
run --shapes A --distill-steps 128 --distill-lr 1e-4
run --shapes A --distill-steps 512 --distill-lr 1e-4
run --shapes A --distill-steps 512 --distill-lr 3e-4
cat benchmarks/results/structured_smollm2.md
