"""Runs a test worker in two CPU processes with torchrun (gloo) and loads what each rank saved."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_two_ranks(worker: str, out, *args: str, timeout: int) -> tuple[dict, dict]:
    """`torchrun --standalone --nproc_per_node 2 tests/WORKER OUT ARGS...`; returns OUT/rank0.pt and OUT/rank1.pt.

    The worker writes `OUT/rank{r}.pt`; a non-zero exit fails with the end of its stderr.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", worker), str(out), *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
