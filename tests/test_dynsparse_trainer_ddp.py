"""DynSparse through `PruningTrainer` in two CPU processes (torchrun, gloo): every rank holds the same masks after
every step, through several pattern updates, and resuming from a mid-run checkpoint equals the uninterrupted run."""

import torch

from torchrun_helpers import run_two_ranks


def test_two_process_pruning_trainer_masks_identical_and_resume_equal(tmp_path):
    r0, r1 = run_two_ranks("dynsparse_trainer_ddp_worker.py", tmp_path, timeout=300)
    full0, full1 = r0["full"], r1["full"]
    steps = [str(s) for s in range(1, 9)]
    assert list(full0["masks"]) == list(full1["masks"]) == steps
    assert full0["updates"]["8"] == full1["updates"]["8"] == 3  # several pattern updates
    for step in steps:  # identical on both ranks after every step (each rank trained on other data)
        assert torch.equal(full0["masks"][step], full1["masks"][step]), step
    assert not torch.equal(full0["masks"]["1"], full0["masks"]["8"]), "the pattern must move"
    for name, value in full0["weights"].items():
        torch.testing.assert_close(value, full1["weights"][name], msg=name, rtol=0, atol=0)

    for rank in (r0, r1):  # resumed at step 3, before the last two updates: the same masks, losses and weights
        full, resumed = rank["full"], rank["resumed"]
        assert list(resumed["masks"]) == steps[3:]
        assert full["updates"]["3"] < full["updates"]["8"]
        for step in steps[3:]:
            assert torch.equal(resumed["masks"][step], full["masks"][step]), step
            assert resumed["updates"][step] == full["updates"][step], step
        assert list(full["losses"]) == steps  # the resumed history holds steps 1-3 from the checkpoint
        assert resumed["losses"] == full["losses"]
        assert torch.equal(resumed["generator"], full["generator"])
        for name, value in full["weights"].items():
            torch.testing.assert_close(resumed["weights"][name], value, msg=name)
