import copy
import warnings

import pytest
import torch

from hf_prune import ADMMConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, get_pruning_state, oneshot
from hf_prune.oneshot.blocks import find_blocks, linear_weight_view
from hf_prune.oneshot.masks import num_to_prune
from hf_prune.oneshot.solver import LayerStats, LayerTask, build_solver

from conftest import TINY_MODELS

CONFIGS = {
    "admm": ADMMConfig,
    "wanda": WandaConfig,
    "sparsegpt": SparseGPTConfig,
    "magnitude": MagnitudeConfig,
}


def _pruned_weights(model):
    state = get_pruning_state(model)
    modules = dict(model.named_modules())
    return {name: linear_weight_view(modules[name]).detach() for name in state.module_sparsity}


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_unstructured_sparsity_is_exact(arch, method, sparsity, calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS[arch]()
    config = CONFIGS[method](sparsity=sparsity)
    oneshot(model, config, calibration=calibration_ids, show_progress=False)
    weights = _pruned_weights(model)
    n_linear = sum(1 for _ in find_blocks(model).layers[0].modules() if isinstance(_, torch.nn.Linear) or type(_).__name__ == "Conv1D")
    assert len(weights) == n_linear * 2  # every Linear of both blocks, nothing else
    for name, weight in weights.items():
        zeros = int((weight == 0).sum())
        if getattr(config, "mask_group", "layer") == "row":
            per_row = (weight == 0).sum(dim=1)
            assert bool((per_row == num_to_prune(sparsity, weight.shape[1])).all()), name
        else:
            assert zeros == num_to_prune(sparsity, weight.numel()), (name, zeros)
    assert "embed" not in " ".join(weights) and "lm_head" not in weights


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_structure_in_every_group(arch, method, pattern, calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS[arch]()
    oneshot(model, CONFIGS[method](pattern=pattern), calibration=calibration_ids, show_progress=False)
    n, m = map(int, pattern.split(":"))
    for name, weight in _pruned_weights(model).items():
        kept = (weight != 0).reshape(weight.shape[0], -1, m).sum(dim=-1)
        assert bool((kept == n).all()), name
    assert get_pruning_state(model).layout == pattern


def test_pruned_model_stays_an_ordinary_model(calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    oneshot(model, ADMMConfig(sparsity=0.5), calibration=calibration_ids, show_progress=False)
    assert all(type(m) in (torch.nn.Linear,) for n, m in model.named_modules() if n.endswith("proj"))
    out = model(input_ids=calibration_ids[:2], labels=calibration_ids[:2])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.config.use_cache is not False or model.config.use_cache is None


def _correlated_inputs(tokens=2048, d_in=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=generator) / d_in**0.5
    scales = torch.logspace(-1, 1, d_in)  # heterogeneous feature scales, as in LLM activations
    return (torch.randn(tokens, d_in, generator=generator) @ mixing + 0.3 * torch.randn(tokens, d_in, generator=generator)) * scales


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_admm_reconstructs_layer_outputs_better_than_wanda_and_magnitude(pattern, sparsity):
    x = _correlated_inputs()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    errors = {}
    for method, cls in CONFIGS.items():
        config = cls(sparsity=sparsity, pattern=pattern)
        solver = build_solver(config)
        stats = LayerStats(64, torch.device("cpu"), solver.full_gram)
        stats.add(x)
        task = LayerTask("layer", weight.clone(), config.sparsity, config.n_m, stats)
        pruned = solver.solve(task)
        errors[method] = ((x @ pruned.T - x @ weight.T).square().sum() / (x @ weight.T).square().sum()).item()
    assert errors["admm"] < errors["wanda"] < errors["magnitude"], errors
    assert errors["admm"] < errors["sparsegpt"] * 1.05, errors


def test_admm_block_output_error_below_baselines_on_tiny_llama(calibration_ids):
    """Same calibration, same first block: ADMM's pruned block reproduces the dense block's outputs best."""
    torch.manual_seed(0)
    dense = TINY_MODELS["llama"]()
    errors = {}
    for method in ("admm", "wanda", "magnitude"):
        model = copy.deepcopy(dense)
        oneshot(model, CONFIGS[method](sparsity=0.6), calibration=calibration_ids, show_progress=False)
        with torch.no_grad():
            ref = dense(input_ids=calibration_ids, output_hidden_states=True).hidden_states[1]
            out = model(input_ids=calibration_ids, output_hidden_states=True).hidden_states[1]
        errors[method] = ((out - ref).square().sum() / ref.square().sum()).item()
    assert errors["admm"] < errors["wanda"] and errors["admm"] < errors["magnitude"], errors


def test_magnitude_needs_no_calibration():
    torch.manual_seed(0)
    model = TINY_MODELS["opt"]()
    oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False)
    assert get_pruning_state(model).module_sparsity


def test_targets_ignore_and_overrides(calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    config = WandaConfig(sparsity=0.5, targets=["self_attn\\..*"], ignore=["o_proj"], sparsity_overrides={"q_proj": 0.25})
    oneshot(model, config, calibration=calibration_ids, show_progress=False)
    sparsity = get_pruning_state(model).module_sparsity
    assert sorted(n.split(".", 3)[-1] for n in sparsity) == sorted(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] * 2)
    assert all(v == 0.25 for n, v in sparsity.items() if n.endswith("q_proj"))
    assert all(v == 0.5 for n, v in sparsity.items() if not n.endswith("q_proj"))
    assert bool((model.model.layers[0].mlp.down_proj.weight != 0).all())


def test_owl_sparsities_from_ratios():
    from hf_prune.oneshot.owl import owl_sparsities_from_ratios

    values = owl_sparsities_from_ratios([0.01, 0.03, None, 0.02], sparsity=0.6, owl_lambda=0.1)
    # scaled to [0, 0.2], centred: keep = 0.4 + [-0.1, 0.1, -, 0.0]; the block without targets keeps the target
    assert values == pytest.approx([0.7, 0.5, 0.6, 0.6])


def test_owl_gives_outlier_heavy_blocks_lower_sparsity(calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    with torch.no_grad():  # block 1 gets many outlier weights
        for module in model.model.layers[1].modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, :8] *= 20
    oneshot(model, WandaConfig(sparsity=0.5, owl=True, owl_lambda=0.1), calibration=calibration_ids, show_progress=False)
    sparsity = get_pruning_state(model).module_sparsity
    block0 = [v for n, v in sparsity.items() if ".layers.0." in n]
    block1 = [v for n, v in sparsity.items() if ".layers.1." in n]
    # Two blocks: min-max scaling puts them at target ± lambda (up to per-row rounding of Wanda's row groups).
    assert all(v == pytest.approx(0.6, abs=0.01) for v in block0), block0
    assert all(v == pytest.approx(0.4, abs=0.01) for v in block1), block1


def test_admm_fixed_mask_keeps_given_mask_and_improves_reconstruction(calibration_ids):
    torch.manual_seed(0)
    dense = TINY_MODELS["llama"]()
    wanda = copy.deepcopy(dense)
    oneshot(wanda, WandaConfig(sparsity=0.6), calibration=calibration_ids, show_progress=False)
    masks = {n: w != 0 for n, w in _pruned_weights(wanda).items()}
    updated = copy.deepcopy(dense)
    oneshot(updated, ADMMConfig(mask_mode="fixed", sparsity=0.6), calibration=calibration_ids, masks=masks, show_progress=False)
    for name, weight in _pruned_weights(updated).items():
        assert bool(((weight != 0) == masks[name]).all()), name  # exactly the given support
    with torch.no_grad():
        ref = dense(input_ids=calibration_ids, output_hidden_states=True).hidden_states[1]
        def err(m):
            return (m(input_ids=calibration_ids, output_hidden_states=True).hidden_states[1] - ref).square().sum()

        assert err(updated) < 0.8 * err(wanda)


def test_singular_gram_raises_damping_with_warning_and_stays_finite():
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    tiny = torch.randint(0, 128, (1, 8))  # 8 tokens for 64 and 128 inputs: every Gram matrix is singular
    with pytest.warns(RuntimeWarning, match=r"Gram matrix of model\.layers\.0\.self_attn\.q_proj is singular .* damping raised from 0\.1 to 1"):
        oneshot(model, ADMMConfig(sparsity=0.5, max_seq_length=8), calibration=tiny, show_progress=False)
    for weight in _pruned_weights(model).values():
        assert bool(torch.isfinite(weight).all())


def test_dead_inputs_do_not_produce_nan():
    x = _correlated_inputs(tokens=512)
    x[:, :5] = 0  # dead inputs
    for method, cls in CONFIGS.items():
        solver = build_solver(cls(sparsity=0.5))
        stats = LayerStats(64, torch.device("cpu"), solver.full_gram)
        stats.add(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pruned = solver.solve(LayerTask("layer", torch.randn(32, 64), 0.5, None, stats))
        assert bool(torch.isfinite(pruned).all()), method


@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.6), ("2:4", None)])
def test_admm_bfloat16_iterations_match_float32_reconstruction(pattern, sparsity):
    """matmul_precision="bfloat16" (mask-selection iterations in bf16, the rest fp32): same exact sparsity, and a
    reconstruction error within 2 % of the float32 solver's."""
    x = _correlated_inputs(d_in=256, tokens=2048)
    weight = torch.randn(320, 256, generator=torch.Generator().manual_seed(3))  # 81,920 weights: layer-wide path
    stats = LayerStats(256, torch.device("cpu"), True)
    stats.add(x)
    errors, results = {}, {}
    for precision in ("float32", "bfloat16"):
        config = ADMMConfig(sparsity=sparsity, pattern=pattern, matmul_precision=precision)
        pruned = build_solver(config).solve(LayerTask("layer", weight.clone(), config.sparsity, config.n_m, stats))
        assert pruned.dtype == torch.float32
        assert int((pruned == 0).sum()) == int(config.sparsity * pruned.numel())
        results[precision] = pruned
        errors[precision] = ((x @ pruned.T - x @ weight.T).square().sum() / (x @ weight.T).square().sum()).item()
    assert errors["bfloat16"] < errors["float32"] * 1.02, errors
    assert not torch.equal(results["bfloat16"], results["float32"])  # it really ran a different product


@pytest.mark.parametrize("low_memory", [False, True])  # True: Ĝ parked in a file between factorisations
@pytest.mark.parametrize("fail_first", [False, True])
def test_admm_in_place_on_scratch_statistics_is_bit_equal(fail_first, low_memory, monkeypatch):
    """The runner's statistics are scratch: ADMM normalises their Gram in place (memory); others are left as they
    were. Same bits either way, shared statistics (q/k/v) and a damping retry (the first factorisation reported
    not positive definite: the shifted Gram must come back exactly) included."""
    cholesky_ex, calls = torch.linalg.cholesky_ex, []

    def flaky(a, *args, **kwargs):
        calls.append(1)
        chol, info = cholesky_ex(a, *args, **kwargs)
        return (chol, torch.ones_like(info)) if fail_first and len(calls) % 2 == 1 else (chol, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    x = _correlated_inputs(d_in=256, tokens=2048)
    weights = [torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows)) for rows in (320, 96)]
    results = {}
    for scratch in (False, True):
        stats = LayerStats(256, torch.device("cpu"), True)
        stats.add(x)
        stats.scratch = scratch
        gram = stats.gram.clone()
        solver = build_solver(ADMMConfig(sparsity=0.6))
        solver.low_memory = low_memory and scratch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            results[scratch] = [solver.solve(LayerTask(f"l{i}", w.clone(), 0.6, None, stats))
                                for i, w in enumerate(weights)]
        solver.release()
        if solver.low_memory:
            assert stats.gram is None  # parked in a file, then dropped
        else:
            assert torch.equal(stats.gram, gram) != scratch  # overwritten only when scratch
    assert len(calls) == (8 if fail_first else 2)  # with the failure: twice per layer (damping 0.1 fails, 1.0)
    for a, b in zip(results[False], results[True]):
        assert a.view(torch.int32).equal(b.view(torch.int32))
        assert int((a == 0).sum()) == int(0.6 * a.numel())


# ------------------------------------------------------------------ class 16: pruning a pruned model again
def _zeros(model, names):
    modules = dict(model.named_modules())
    return sum(int((modules[n].weight == 0).sum()) for n in names) / sum(modules[n].weight.numel() for n in names)


def test_second_oneshot_is_refused_unless_allowed_and_then_recorded(tmp_path):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    oneshot(model, MagnitudeConfig(sparsity=0.6), show_progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"already pruned \(magnitude, layout 'unstructured', 60.0% .*allow_repruning=True"):
        oneshot(model, MagnitudeConfig(sparsity=0.3), show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    oneshot(model, MagnitudeConfig(sparsity=0.3), show_progress=False, allow_repruning=True)
    state = get_pruning_state(model)
    names = list(state.module_sparsity)
    assert abs(state.overall_sparsity - _zeros(model, names)) < 1e-9 and abs(state.overall_sparsity - 0.6) < 1e-3
    assert [run["config"]["sparsity"] for run in state.history] == [0.6] and state.config.sparsity == 0.3
    model.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(60.0 % sparse)" in card and "pruned 2 times" in card
    assert "| 1 | magnitude | unstructured | 60.0 % | 60.0 % |" in card and "| 2 | magnitude | unstructured | 30.0 % | 60.0 % |" in card
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert get_pruning_state(loaded).history == state.history
    with pytest.raises(ValueError, match="already pruned"):  # a loaded hf_prune checkpoint counts too
        oneshot(loaded, MagnitudeConfig(sparsity=0.7), show_progress=False)


def test_unstructured_then_2_4_records_the_union(calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    oneshot(model, WandaConfig(sparsity=0.5), calibration=calibration_ids, show_progress=False)
    oneshot(model, WandaConfig(pattern="2:4"), calibration=calibration_ids, show_progress=False, allow_repruning=True)
    state = get_pruning_state(model)
    modules = dict(model.named_modules())
    for name, value in state.module_sparsity.items():
        w = modules[name].weight
        assert value == float((w == 0).sum()) / w.numel()
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) <= 2).all()
    assert state.overall_sparsity > 0.55 and state.layout == "2:4" and state.history[0]["layout"] == "unstructured"


def test_three_runs_and_older_checkpoints_without_history():
    from hf_prune.export.save import state_from_dict, state_to_dict

    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    for s in (0.2, 0.4, 0.5):
        oneshot(model, MagnitudeConfig(sparsity=s), show_progress=False, allow_repruning=True)
    state = get_pruning_state(model)
    assert [r["config"]["sparsity"] for r in state.history] == [0.2, 0.4]
    data = state_to_dict(state)
    assert state_from_dict(data).history == state.history
    data.pop("history")
    assert state_from_dict(data).history == []
    data["history"] = "garbage"
    assert state_from_dict(data).history == []


def test_structured_state_is_refused_even_when_allowed():
    from hf_prune import CoFiConfig
    from hf_prune.state import PruningState, set_pruning_state

    model = TINY_MODELS["llama"]()
    set_pruning_state(model, PruningState(config=CoFiConfig(target_sparsity=0.5), layout="structured"))
    with pytest.raises(ValueError, match=r"already pruned structurally .* not supported"):
        oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False, allow_repruning=True)
