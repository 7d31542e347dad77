# Sourced by the benchmarks/gpu_*.sh scripts: moves to the repository root, sets $PYTHON (default python) and puts
# the checkout first on PYTHONPATH; where torch sees no CUDA it says so and ends the calling script with status 0.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA: skipped (torch.cuda.is_available() is False; the recorded figures of this benchmark are CPU-only)"
    exit 0
fi
