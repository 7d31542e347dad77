"""DynSparse through `attach` in a plain loop: invariants at every step, updates, optimizer surgery, DOF."""

import pytest
import torch

from hf_prune import DynSparseConfig, attach, get_pruning_state

from dynsparse_utils import MODELS, batch, check_masks_hold


def _loop(model, config, steps, lr=1e-2, track=False, every_step=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    pruner = attach(model, config, optimizer=opt, total_steps=steps)
    pruner.updater.track_changes = track
    check_masks_hold(pruner.updater)
    for step in range(steps):
        loss = model(**batch(step)).loss
        loss.backward()
        opt.step()
        updated = pruner.step()
        if every_step is not None:
            every_step(step, pruner, opt, updated)
        opt.zero_grad()
    return pruner, opt


@pytest.mark.parametrize("arch, block_size", [("bert", 1), ("llama", 16), ("bert", [8, 16])])
def test_exact_sparsity_and_blocks_every_step(arch, block_size):
    model = MODELS[arch]()
    config = DynSparseConfig(sparsity=0.75, block_size=block_size, num_updates=4, pruning_ratio=0.5)
    dof = []
    updates = []

    def every_step(step, pruner, opt, updated):
        check_masks_hold(pruner.updater)
        metrics = pruner.metrics()
        expected = 1 - sum(
            pruner.updater.num_active[n] * m.block_numel for n, m in pruner.updater.masks.items()
        ) / sum(m.numel for m in pruner.updater.masks.values())
        assert metrics["dynsparse/sparsity"] == pytest.approx(expected)
        assert metrics["dynsparse/sparsity"] == pytest.approx(0.75, abs=0.02)
        dof.append(metrics["dynsparse/explored_dof"])
        updates.append(updated)

    pruner, _ = _loop(model, config, steps=8, every_step=every_step)
    assert sum(updates) == 4 and pruner.updater.updates_done == 4
    assert all(b >= a for a, b in zip(dof, dof[1:])), "explored DOF must be monotone"
    assert dof[-1] > dof[0] > 0.2
    # default selection: every Linear of the transformer blocks, nothing else (no head, no embeddings)
    prefix = "bert.encoder.layer." if arch == "bert" else "model.layers."
    assert all(n.startswith(prefix) for n in pruner.updater.modules)
    assert len(pruner.updater.modules) == (12 if arch == "bert" else 14)
    metrics = pruner.metrics()
    assert metrics["dynsparse/flops_per_token_sparse"] < 0.5 * metrics["dynsparse/flops_per_token_dense"]
    model = pruner.finalize()
    state = get_pruning_state(model)
    assert state.layout == config.layout and state.overall_sparsity >= 0.73
    assert set(state.module_sparsity) == set(pruner.updater.modules)


def test_update_prunes_lowest_norm_and_never_revives_just_pruned():
    model = MODELS["llama"]()
    config = DynSparseConfig(sparsity=0.5, block_size=16, num_updates=1, pruning_ratio=0.5, block_metric="l1")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = attach(model, config, optimizer=opt, total_steps=100)
    up = pruner.updater
    up.track_changes = True
    # weights with distinct block norms, so the lowest-norm set is unambiguous
    for module in up.modules.values():
        with torch.no_grad():
            module.weight.copy_(torch.randn_like(module.weight) * (1 + torch.rand_like(module.weight)))
    up.apply_masks()
    before = {n: up.masks[n].block_scores(m.weight, "l1") for n, m in up.modules.items()}
    pr = up.schedule.pruning_ratio(50)
    up.update_pattern(50)
    for name, (old, new) in up.last_update.items():
        pruned, regrown = old & ~new, new & ~old
        k = round(pr * int(old.sum()))
        assert int(pruned.sum()) == int(regrown.sum()) == k > 0
        assert not torch.any(pruned & regrown)
        assert not torch.any(regrown & old), "regrowth must pick blocks inactive before the update"
        scores = before[name]
        assert scores[pruned].max() <= scores[old & new].min(), "pruned blocks must have the lowest L1 norm"
        assert int(new.sum()) == up.num_active[name]


def test_regrown_weights_and_optimizer_moments_zeroed():
    model = MODELS["bert"]()
    config = DynSparseConfig(sparsity=0.6, block_size=1, num_updates=1, pruning_ratio=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = attach(model, config, optimizer=opt, total_steps=10)
    up = pruner.updater
    up.track_changes = True
    model(**batch(0)).loss.backward()
    opt.step()
    pruner.step()
    opt.zero_grad()
    for module in up.modules.values():  # poison every moment so that zeroing is visible
        for value in opt.state[module.weight].values():
            if value.shape == module.weight.shape:
                value.fill_(1.0)
    up.update_pattern(5)
    for name, (old, new) in up.last_update.items():
        weight = up.modules[name].weight
        regrown, pruned, kept = new & ~old, old & ~new, old & new
        for key in ("exp_avg", "exp_avg_sq"):
            moment = opt.state[weight][key]
            assert torch.all(moment[regrown] == 0) and torch.all(moment[pruned] == 0)
            assert torch.all(moment[kept] == 1)
        assert torch.all(weight[regrown] == 0) and torch.all(weight[pruned] == 0)


def test_inactive_gradients_are_masked_before_the_step():
    model = MODELS["llama"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pruner = attach(model, DynSparseConfig(sparsity=0.9, num_updates=2), optimizer=opt, total_steps=10)
    model(**batch(1)).loss.backward()
    for name, module in pruner.updater.modules.items():
        assert torch.all(module.weight.grad[~pruner.updater.masks[name].mask] == 0)


def test_gradient_regrowth_picks_largest_dense_gradient_blocks():
    model = MODELS["llama"]()
    config = DynSparseConfig(sparsity=0.75, block_size=16, num_updates=1, regrowth="gradient")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = attach(model, config, optimizer=opt, total_steps=2)  # the update follows step 1
    up = pruner.updater
    up.track_changes = True
    model(**batch(3)).loss.backward()
    dense = {n: up.masks[n].block_scores(m.weight.grad, "l1") for n, m in up.modules.items()}
    assert any(torch.any(dense[n][~up.masks[n].mask] > 0) for n in dense), "capture step keeps dense gradients"
    opt.step()
    assert pruner.step()
    for name, (old, new) in up.last_update.items():
        regrown = new & ~old
        k = int(regrown.sum())
        candidates = dense[name].masked_fill(old, float("-inf")).flatten()
        expected = torch.zeros_like(old).flatten()
        expected[torch.topk(candidates, k).indices] = True
        assert torch.equal(regrown.flatten(), expected), name
    check_masks_hold(up)


def test_skipped_fp16_steps_and_accumulation_do_not_advance():
    from accelerate import Accelerator

    model = MODELS["llama"]()
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    pruner = attach(model, DynSparseConfig(sparsity=0.8, update_interval=2), optimizer=opt, total_steps=4)
    for i in range(8):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch(i)).loss)
            opt.step()
            pruner.step()
            opt.zero_grad()
        check_masks_hold(pruner.updater)
    assert pruner.updater.step_count == 4 and pruner.updater.updates_done == 1

    # fp16 grad scaling: an inf gradient makes the scaler skip the optimizer step; the pruner must notice
    model2 = MODELS["llama"]()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    pruner2 = attach(model2, DynSparseConfig(sparsity=0.8, update_interval=1), optimizer=opt2, total_steps=4)
    scaler.scale(model2(**batch(0)).loss).backward()
    next(iter(pruner2.updater.modules.values())).weight.grad.view(-1)[0] = float("inf")
    scaler.step(opt2)
    scaler.update()
    assert pruner2.step() is False and pruner2.updater.step_count == 0
    opt2.zero_grad()
    scaler.scale(model2(**batch(1)).loss).backward()
    scaler.step(opt2)
    scaler.update()
    assert pruner2.step() is True and pruner2.updater.step_count == 1


def test_hook_state_round_trip(tmp_path):
    """save/load of the accelerate hook reproduces the same later pattern sequence."""
    config = DynSparseConfig(sparsity=0.8, block_size=16, update_interval=2, pruning_ratio_decay="constant")

    def run(steps, start_state=None, start_model=None, start_opt=None):
        model = start_model or MODELS["bert"]()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if start_opt is not None:
            opt.load_state_dict(start_opt)
        pruner = attach(model, config, optimizer=opt, total_steps=8)
        if start_state is not None:
            pruner.load(start_state)
        begin = pruner.updater.step_count
        for step in range(begin, steps):
            model(**batch(step)).loss.backward()
            opt.step()
            pruner.step()
            opt.zero_grad()
        return model, opt, pruner

    full_model, _, full = run(8)
    half_model, half_opt, half = run(4)
    half.save(tmp_path)
    resumed_model = MODELS["bert"]()
    resumed_model.load_state_dict(half_model.state_dict())
    _, _, resumed = run(8, start_state=tmp_path, start_model=resumed_model, start_opt=half_opt.state_dict())
    for name in full.updater.masks:
        assert torch.equal(full.updater.masks[name].mask, resumed.updater.masks[name].mask)
        assert torch.equal(full.updater.masks[name].ever_active, resumed.updater.masks[name].ever_active)
    for (n, a), b in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
