"""CoFi through `PruningTrainer` in two CPU processes (torchrun, gloo): every rank ends with the same gates, lambdas,
fixed masks and weights, the masks freeze mid-run without breaking DDP, and the exports agree."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_process_cofi_run_stays_in_sync_through_the_freeze(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "cofi_ddp_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == 8
    state0, state1 = r0["state"], r1["state"]
    assert bool(state0["hf_prune_cofi.frozen"]) and bool(state1["hf_prune_cofi.frozen"])
    for name, value in state0.items():
        torch.testing.assert_close(value, state1[name], msg=name, atol=0, rtol=0)
    # the gates and lambdas did train (DDP averaged their gradients), and the export obeys the layer target
    assert float(state0["hf_prune_cofi.lambda_1"]) != 0.0
    assert float(state0["hf_prune_cofi.layer_lambdas.attention"].abs().sum()) > 0
    assert r0["structure"] == r1["structure"]
    assert sum(not l["attention_removed"] for l in r0["structure"]["layers"]) <= 2
