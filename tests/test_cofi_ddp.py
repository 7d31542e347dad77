"""CoFi through `PruningTrainer` in two CPU processes (torchrun, gloo): every rank ends with the same gates, lambdas,
fixed masks and weights, the masks freeze mid-run without breaking DDP, and the exports agree."""

import torch

from torchrun_helpers import run_two_ranks


def test_two_process_cofi_run_stays_in_sync_through_the_freeze(tmp_path):
    r0, r1 = run_two_ranks("cofi_ddp_worker.py", tmp_path, timeout=300)
    assert r0["steps"] == r1["steps"] == 8
    state0, state1 = r0["state"], r1["state"]
    assert bool(state0["hf_prune_cofi.frozen"]) and bool(state1["hf_prune_cofi.frozen"])
    for name, value in state0.items():
        torch.testing.assert_close(value, state1[name], msg=name, atol=0, rtol=0)
    # the gates and lambdas did train (DDP averaged their gradients), and the export obeys the layer target
    assert float(state0["hf_prune_cofi.lambda_1"]) != 0.0
    assert float(state0["hf_prune_cofi.layer_lambdas.attention"].abs().sum()) > 0
    assert r0["structure"] == r1["structure"]
    assert sum(not layer["attention_removed"] for layer in r0["structure"]["layers"]) <= 2


def test_two_process_decoder_cofi_run_stays_in_sync_and_exports_the_target_architecture(tmp_path):
    r0, r1 = run_two_ranks("cofi_ddp_worker.py", tmp_path, "decoder", timeout=300)
    assert r0["steps"] == r1["steps"] == 8
    state0, state1 = r0["state"], r1["state"]
    assert bool(state0["hf_prune_cofi.frozen"]) and bool(state1["hf_prune_cofi.frozen"])
    for name, value in state0.items():
        torch.testing.assert_close(value, state1[name], msg=name, atol=0, rtol=0)
    # every dimension's lambda trained (DDP averaged the Lagrangian's gradients), and both ranks export the target
    for dim in ("layers", "kv_heads", "intermediate_size", "hidden_size"):
        assert float(state0[f"hf_prune_cofi.arch_lambdas.{dim}"].abs().sum()) > 0, dim
    assert r0["structure"] == r1["structure"]
    assert r0["structure"]["plain"] and r0["structure"]["hidden_size"] == 24
    assert [(s["heads"], s["kv_heads"], s["intermediate_size"]) for s in r0["structure"]["layers"]] == [(4, 2, 20)] * 3
