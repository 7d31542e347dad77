"""Two CPU processes (torch.distributed gloo via torchrun): every rank holds identical masks at every step."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("regrowth", ["random", "gradient"])
def test_two_process_masks_identical(tmp_path, regrowth):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "dynsparse_ddp_worker.py"), str(tmp_path), regrowth]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["updates"] == r1["updates"] == 3
    assert torch.equal(r0["history"], r1["history"])
    assert not torch.equal(r0["history"][0], r0["history"][-1]), "the pattern must move"
    for name, value in r0["weights"].items():
        torch.testing.assert_close(value, r1["weights"][name], msg=name)
