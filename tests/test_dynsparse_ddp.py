"""Two CPU processes (torch.distributed gloo via torchrun): every rank holds identical masks at every step."""

import pytest
import torch

from torchrun_helpers import run_two_ranks


@pytest.mark.parametrize("regrowth", ["random", "gradient"])
def test_two_process_masks_identical(tmp_path, regrowth):
    r0, r1 = run_two_ranks("dynsparse_ddp_worker.py", tmp_path, regrowth, timeout=240)
    assert r0["updates"] == r1["updates"] == 3
    assert torch.equal(r0["history"], r1["history"])
    assert not torch.equal(r0["history"][0], r0["history"][-1]), "the pattern must move"
    for name, value in r0["weights"].items():
        torch.testing.assert_close(value, r1["weights"][name], msg=name)
