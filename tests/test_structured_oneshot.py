"""Structured one-shot pruning (`StructuredConfig`): exact shapes, least-squares refit, plain checkpoints, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_prune import StructuredConfig, get_pruning_state, oneshot
from hf_prune.methods.cofi.arch import get_adapter
from hf_prune.methods.structured.flops import flops_per_token

import cofi_helpers
from cofi_helpers import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(target_layers=3, target_kv_heads=2, target_intermediate_size=20, target_hidden_size=24)


def _calibration(n=8, length=24, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (n, length), generator=g)


def _prune(model, **kw):
    cfg = StructuredConfig(**{**ARCH, **kw}, num_calibration_samples=8, max_seq_length=24, calibration_batch_size=4)
    return oneshot(model, cfg, calibration=_calibration(), show_progress=False)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_exact_target_shape_of_every_unit_kind_and_a_plain_config(model_type):
    model = tiny_llama(1, model_type)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    small = _prune(model)
    assert type(small) is type(model) and small is not model
    c = small.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size,
            c.head_dim) == (3, 4, 2, 20, 24, 8)
    layer = small.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (32, 24) and layer.self_attn.k_proj.weight.shape == (16, 24)
    assert layer.self_attn.o_proj.weight.shape == (24, 32) and layer.mlp.down_proj.weight.shape == (24, 20)
    assert small.model.embed_tokens.weight.shape == (64, 24) and small.lm_head.weight is small.model.embed_tokens.weight
    if model_type == "qwen2":
        assert layer.self_attn.q_proj.bias.shape == (32,)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in dense.items())  # the input model is untouched
    state = get_pruning_state(small)
    m = state.metrics
    assert state.layout == "structured" and m["structure"]["plain"] is True
    assert len(m["kept_layer_indices"]) == 3 and all(len(g) == 2 for g in m["kept_kv_groups"])
    assert m["params_after"] == sum(p.numel() for p in small.parameters())
    # 3 layers x (8 * (2*2 + 2) * 2 groups + 3 * 20) x 24 of 4 x (8 * 6 * 4 + 3 * 48) x 32
    assert m["prunable_params_after"] == 3 * (96 + 60) * 24 and m["prunable_params_before"] == 4 * (192 + 144) * 32
    assert m["flops_per_token_after"] == flops_per_token(small, 24) < m["flops_per_token_before"]
    with torch.no_grad():
        assert torch.isfinite(small(input_ids=_calibration(2, 10)).logits).all()


def test_each_unit_kind_alone():
    model = tiny_llama(2)
    assert _only(model, target_layers=2).config.num_hidden_layers == 2
    assert _only(model, target_heads=4).config.num_key_value_heads == 2
    assert _only(model, target_intermediate_size=7).config.intermediate_size == 7
    small = _only(model, target_hidden_size=16)
    assert small.config.hidden_size == 16 and small.config.intermediate_size == 48


def _only(model, **target):
    cfg = StructuredConfig(**target, num_calibration_samples=8, max_seq_length=24, calibration_batch_size=4)
    return oneshot(model, cfg, calibration=_calibration(), show_progress=False)


def test_layers_dropped_are_the_lowest_block_influence_and_hidden_cut_is_exact():
    # a hidden cut is emulated on the full-width copy while calibrating (zeroed channels, rescaled norms) and then
    # sliced: without any width cut, the result must equal slicing the depth-cut copy directly
    model = tiny_llama(4)
    small = _only(model, target_layers=2)
    m = get_pruning_state(small).metrics
    influence = torch.tensor(m["layer_influence"])
    assert m["kept_layer_indices"] == sorted(torch.topk(influence, 2).indices.tolist())
    kept = m["kept_layer_indices"]
    ids = _calibration(2, 10, seed=5)
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        pos = torch.arange(10).unsqueeze(0)
        emb = model.model.rotary_emb(h, pos)
        for i in kept:
            h = model.model.layers[i](h, position_embeddings=emb, position_ids=pos)
            h = h[0] if isinstance(h, tuple) else h
        expected = model.lm_head(model.model.norm(h))
        torch.testing.assert_close(small(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_refit_lowers_each_layers_calibration_error_below_importance_only(model_type):
    model = tiny_llama(3, model_type)
    refit = _prune(model)
    sliced = _prune(model, reconstruct=False)
    e_refit = get_pruning_state(refit).metrics["reconstruction_error"]
    e_sliced = get_pruning_state(sliced).metrics["reconstruction_error"]
    assert len(e_refit) == 6  # o_proj and down_proj of each of the 3 kept layers
    for name, rec in e_refit.items():
        assert 0 <= rec["reconstructed"] < rec["importance_only"], (name, rec)
        assert "reconstructed" not in e_sliced[name]
    # recomputed independently from the dense model's activations and the exported weights: without a depth or
    # hidden cut, layer 0's o_proj sees the dense model's inputs in both runs
    width = dict(target_layers=None, target_hidden_size=None)
    runs = [_prune(model, **width), _prune(model, reconstruct=False, **width)]
    metrics = [get_pruning_state(small).metrics for small in runs]
    assert metrics[0]["kept_kv_groups"][0] == metrics[1]["kept_kv_groups"][0]
    errs = [_o_proj_error(model, small, m["kept_kv_groups"][0]) for small, m in zip(runs, metrics)]
    recorded = metrics[0]["reconstruction_error"]["model.layers.0.self_attn.o_proj"]
    assert errs[0] == pytest.approx(recorded["reconstructed"], rel=1e-3)
    assert errs[1] == pytest.approx(recorded["importance_only"], rel=1e-3)
    assert errs[0] < 0.9 * errs[1], errs


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dense_refit_target_refits_every_projection_towards_the_dense_outputs(model_type):
    model = tiny_llama(3, model_type)
    small = _prune(model, refit_target="dense")
    errors = get_pruning_state(small).metrics["reconstruction_error"]
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")
    assert sorted(errors) == sorted(f"model.layers.{i}.{p}" for i in range(3) for p in projections)
    for name, rec in errors.items():
        assert 0 <= rec["reconstructed"] <= rec["importance_only"] + 1e-6, (name, rec)
    # the refit compensates what was removed upstream: the calibration logits move closer to the dense model's
    layer = _prune(model)
    with torch.no_grad():
        dense_logits = model(_calibration()).logits
        gaps = [float((m(_calibration()).logits - dense_logits).square().mean()) for m in (small, layer)]
    assert gaps[0] < gaps[1], gaps
    assert _shape(small) == _shape(layer)


def _shape(model) -> tuple:
    c = model.config
    return c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size, c.hidden_size


def _o_proj_error(dense, small, groups: list[int]) -> float:
    """`||X W^T - X_S W_small^T||^2 / ||X W^T||^2` of layer 0's o_proj on the calibration windows (X: the dense
    model's o_proj inputs, S: the kept groups' columns)."""
    xs = []
    o = dense.model.layers[0].self_attn.o_proj
    handle = o.register_forward_pre_hook(lambda mod, args: xs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        dense(input_ids=_calibration())
    handle.remove()
    x = torch.cat(xs).detach()
    cols = torch.tensor([g * 16 + j for g in groups for j in range(16)])  # 2 query heads of dim 8 per group
    target = x @ o.weight.detach().T
    got = x[:, cols] @ small.model.layers[0].self_attn.o_proj.weight.detach().T
    return float((target - got).square().sum() / target.square().sum())


_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.load(path + "/inputs.pt", weights_only=True)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0)
    json.dump({"generated": gen.tolist(), "cls": type(model).__name__,
               "hf_prune_imported": any(m.split(".")[0] == "hf_prune" for m in sys.modules)}, open(out, "w"))
    """
)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_uniform_export_loads_without_hf_prune_and_generates_the_same(tmp_path, model_type):
    model = tiny_llama(5, model_type)
    small = _prune(model)
    ids = _calibration(2, 6, seed=9)
    expected = small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=0)
    path = tmp_path / "small"
    small.save_pretrained(str(path))
    torch.save(ids, str(path / "inputs.pt"))
    script = tmp_path / "load.py"
    script.write_text(_LOAD)
    out = tmp_path / "out.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path / "empty"))
    proc = subprocess.run([sys.executable, "-I", str(script), str(path), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["hf_prune_imported"] is False
    assert res["cls"] == type(model).__name__
    assert res["generated"] == expected.tolist()
    config = json.loads((path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (3, 24, 20)
    card = (path / "README.md").read_text()
    assert "loads with transformers alone, without hf_prune" in card and "import hf_prune" not in card
    assert "| 0 | 4 / 8 | 20 / 48 |" in card  # kept of the model before pruning


def test_onnx_export_of_the_result_matches(tmp_path):
    pytest.importorskip("onnxruntime")
    from hf_prune import export_onnx
    from hf_prune_ort import OnnxModel

    small = _prune(tiny_llama(6))
    report = export_onnx(small, tmp_path / "onnx")
    assert report.task == "text-generation" and report.verification["max_abs_logit_diff"] <= 1e-4
    ids = _calibration(1, 6, seed=2)
    expected = small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)
    got = OnnxModel.from_pretrained(tmp_path / "onnx", threads=1).generate(ids.numpy(), max_new_tokens=8)
    assert got.tolist() == expected.tolist()


def test_target_sparsity_follows_the_documented_split():
    model = tiny_llama(7)
    small = oneshot(model, StructuredConfig(target_sparsity=0.5, num_calibration_samples=8, max_seq_length=24),
                    calibration=_calibration(), show_progress=False)
    c = small.config
    # 4 KV groups * 0.5 = 2 kept; FFN: (0.5 * 4 * 336 * 32 - 4 * 96 * 32) / (3 * 32 * 4) = 24
    assert (c.num_hidden_layers, c.num_key_value_heads, c.intermediate_size, c.hidden_size) == (4, 2, 24, 32)
    assert get_pruning_state(small).metrics["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    cofi_helpers.ARCH_TARGETS_THE_TINY_LLAMA_CANNOT_HAVE + [
        ({"target_heads": 6, "target_hidden_size": 28},
         r"hidden size 28 \(target_hidden_size, or the model's when not given\) with 6 query heads is refused by "
         r"LlamaConfig as a plain config .*divisible.*e\.g\. \[12, 18, 24, 30\]"),
        ({"target_sparsity": 0.99}, r"target_sparsity=0.99: keeping 1 of 4 KV groups per layer, the FFN width would "
                                    r"have to be -?\d+"),
    ],
)
def test_targets_the_model_cannot_have_are_refused_before_any_work(kwargs, message):
    model = tiny_llama(0)
    with pytest.raises(ValueError, match=message):
        oneshot(model, StructuredConfig(**kwargs), calibration=None)  # no calibration: the check comes first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, r"StructuredConfig needs a target: target_sparsity .* or a target architecture"),
        ({"target_sparsity": 0.3, "target_layers": 2}, r"give target_sparsity=0.3 or a target architecture"),
        ({"target_heads": 2, "target_kv_heads": 1}, r"give target_heads or target_kv_heads, not both"),
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number in the open interval \(0, 1\), got 1.0"),
        ({"target_layers": 0}, r"StructuredConfig.target_layers must be an integer >= 1, got 0"),
        ({"target_layers": 2, "damping": -1.0}, r"StructuredConfig.damping must be a finite number >= 0"),
        ({"target_layers": 2, "refit_target": "model"},
         r"StructuredConfig.refit_target must be one of \['layer', 'dense'\], got 'model'"),
        ({"target_layers": 2, "damping": "best"}, r"StructuredConfig.damping must be a number >= 0 or 'auto', got 'best'"),
    ],
)
def test_bad_config_fields_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredConfig(**kwargs)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match=r"supports LLaMA-family causal LMs .*LlamaForCausalLM.*got GPT2LMHeadModel"):
        oneshot(gpt2, StructuredConfig(target_layers=1), calibration=_calibration())
    with pytest.raises(ValueError, match=r"masks= and offload_dir= are not available with StructuredConfig"):
        oneshot(tiny_llama(0), StructuredConfig(target_layers=1), calibration=_calibration(), masks={})
    assert get_adapter(tiny_llama(0)).dims.num_layers == 4


def test_cli_structured_oneshot_saves_a_plain_smaller_checkpoint(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from hf_prune.cli import main

    from conftest import random_texts

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(random_texts(8, seed=0)))
    out = tmp_path / "out"
    code = main(["oneshot", str(model_dir), "--method", "structured", "--calibration", str(calib), "--eval", str(calib),
                 "--seq-len", "64", "--num-samples", "8", "--output", str(out), "--set", "target_layers=1",
                 "--set", "target_intermediate_size=32", "--set", "target_kv_heads=1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "non-embedding parameters removed" in printed and "perplexity:" in printed
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["num_attention_heads"],
            config["intermediate_size"], config["hidden_size"]) == (1, 1, 2, 32, 64)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 32)
    card = (out / "README.md").read_text()
    assert "hf-prune oneshot" in card and "structured" in card
    assert main(["oneshot", str(model_dir), "--method", "structured", "--pattern", "2:4", "--output",
                 str(tmp_path / "o2"), "--calibration", str(calib)]) == 2
    assert "--pattern is for sparse one-shot methods" in capsys.readouterr().err


def test_allocate_ranks_units_across_layers_relative_to_their_layer_mean():
    from hf_prune.methods.structured.allocation import allocate

    # layer 0: flat (every unit = its layer's mean, 1); layer 1: one unit carries it (normalised 4, 0, 0, 0)
    scores = torch.tensor([[2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0]])
    assert allocate(scores, 5) == [4, 1]
    assert allocate(scores, 2) == [1, 1]  # one reserved per layer
    assert allocate(scores, 8) == [4, 4]
    # raw norms 100x larger in layer 1 make no difference once normalised
    assert allocate(torch.tensor([[1.0, 0.5, 0.1], [100.0, 50.0, 10.0]]), 4) == [2, 2]
    with pytest.raises(ValueError, match="cannot keep 9 units over 2 layers of 4"):
        allocate(scores, 9)


def _starve(model, layer: int, groups: list[int], neurons: int) -> None:
    """Makes most of `layer`'s units nearly silent: the V rows of its KV `groups` and the up rows of its first
    `neurons` neurons scaled by 1e-3."""
    with torch.no_grad():
        attn, mlp = model.model.layers[layer].self_attn, model.model.layers[layer].mlp
        for grp in groups:
            attn.v_proj.weight[grp * 8:(grp + 1) * 8] *= 1e-3
        mlp.up_proj.weight[:neurons] *= 1e-3


def test_per_layer_shapes_follow_importance_and_sum_to_the_budget_exactly(tmp_path):
    model = tiny_llama(8)
    _starve(model, 1, groups=[0, 1, 3], neurons=40)
    width = dict(target_layers=None, target_hidden_size=None)  # 4 layers x 2 KV groups, 4 x 20 neurons
    uniform = _prune(model, **width)
    small = _prune(model, **width, uniform=False)
    m, mu = get_pruning_state(small).metrics, get_pruning_state(uniform).metrics
    layers = m["structure"]["layers"]
    kv = [s["kv_heads"] for s in layers]
    ffn = [s["intermediate_size"] for s in layers]
    assert sum(kv) == 4 * 2 and sum(ffn) == 4 * 20
    assert kv[1] == 1 and m["kept_kv_groups"][1] == [2]  # the one group left with a voice
    assert ffn[1] <= 8 and len(set(ffn)) > 1 and len(set(kv)) > 1
    assert all(s["heads"] == 2 * s["kv_heads"] for s in layers)
    assert m["structure"]["plain"] is False and mu["structure"]["plain"] is True
    assert m["prunable_params_after"] == mu["prunable_params_after"] == 4 * (96 + 60) * 32
    attn = small.model.layers[1].self_attn
    assert attn.k_proj.weight.shape == (8, 32) and attn.o_proj.weight.shape == (32, 16)
    assert small.model.layers[1].mlp.down_proj.weight.shape == (32, ffn[1])
    # the uniform default is what it was: same shape whatever the importance
    assert {s["kv_heads"] for s in mu["structure"]["layers"]} == {2}
    assert mu["kept_neurons_per_layer"] == [20] * 4
    # save and reload (with hf_prune: the original config and the structure record) gives the same logits
    from transformers import AutoModelForCausalLM

    small.save_pretrained(tmp_path / "het")
    config = json.loads((tmp_path / "het" / "config.json").read_text())
    assert config["num_key_value_heads"] == 4 and config["quantization_config"]["format"] == "structured"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "het")
    assert [s["kv_heads"] for s in get_pruning_state(reloaded).metrics["structure"]["layers"]] == kv
    ids = _calibration(2, 10, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, small(input_ids=ids).logits, atol=0, rtol=0)
    card = (tmp_path / "het" / "README.md").read_text()
    assert "import hf_prune" in card and f"| 1 | 2 / 8 | {ffn[1]} / 48 |" in card


def test_card_of_a_distilled_structured_model_records_structure_flops_and_data(tmp_path):
    from hf_prune.training.distill import distill

    from conftest import random_texts, tiny_tokenizer

    tok, teacher = tiny_tokenizer(), tiny_llama(9, vocab_size=128)
    cfg = StructuredConfig(**ARCH, num_calibration_samples=4, max_seq_length=16, calibration_batch_size=4)
    small = oneshot(teacher, cfg, calibration=random_texts(4, seed=1), tokenizer=tok, show_progress=False)
    small = distill(small, teacher, random_texts(4, seed=2), tok, steps=2, seq_len=16, batch_size=2,
                    eval_texts=random_texts(2, seed=3), data_name="train.txt", teacher_name="dense-teacher")
    m = get_pruning_state(small).metrics
    small.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("**Structure**: 4 layers, 8 query heads in 4 KV groups, FFN 48, hidden 32 → "
            "3 layers, 4 query heads in 2 KV groups, FFN 20, hidden 24.") in card
    before, after = m["flops_per_token_before"], m["flops_per_token_after"]
    assert (f"**FLOPs per generated token** at a 16-token context: {before:,} → {after:,} "
            f"({after / before:.2f}×).") in card
    assert "**Calibration data**: 4 texts, 4 windows × 16 tokens = 64 tokens." in card
    assert m["distillation_tokens"] == 2 * 2 * 16
    assert (f"**Distillation data**: train.txt, 2 steps × 16-token windows = 64 tokens, from `dense-teacher`; "
            f"held-out perplexity {m['distillation_perplexity_before']} → {m['distillation_perplexity_after']} "
            f"(teacher {m['distillation_teacher_perplexity']}).") in card
    assert "prunable decoder weights removed physically" in card and "the LM head are kept" in card


def test_warns_when_the_calibration_tokens_cannot_determine_the_refit(caplog):
    model = tiny_llama(0)
    few = StructuredConfig(**ARCH, num_calibration_samples=2, max_seq_length=8)  # 16 tokens, 32 kept o_proj inputs
    with caplog.at_level("WARNING", logger="hf_prune.methods.structured.prune"):
        oneshot(model, few, calibration=_calibration(), show_progress=False)
    assert "16 calibration tokens for a least-squares refit over 32 kept inputs: underdetermined" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_prune.methods.structured.prune"):
        _prune(model)  # 8 x 24 tokens
        oneshot(model, StructuredConfig(**ARCH, num_calibration_samples=2, max_seq_length=8, reconstruct=False),
                calibration=_calibration(), show_progress=False)
    assert "underdetermined" not in caplog.text


def test_auto_damping_holds_out_every_fourth_window_and_picks_the_lowest_held_out_error():
    from hf_prune.methods.structured import damping as auto
    from hf_prune.methods.structured.reconstruct import refit, relative_error
    from hf_prune.oneshot.blocks import Blocks, capture_block_inputs
    from hf_prune.oneshot.passes import collect_stats
    from hf_prune.oneshot.plan import LayerPlan

    model = tiny_llama(3).eval()
    ad = get_adapter(model)
    batches = list(_calibration(n=8).split(4))
    inputs = capture_block_inputs(model, Blocks("model.layers", ad.layers), batches)
    layer, lin = ad.layers[0], ad.ffn_down(0)
    fit, held = auto.split_grams(layer, lin, inputs)
    whole = collect_stats(layer, [LayerPlan("down", lin, 0.0)], inputs, True)["down"].gram
    torch.testing.assert_close(fit + held, whole, rtol=1e-5, atol=1e-4)
    # the held-out part is windows 3 and 7 (the last of each batch of 4): their own Gram
    xs = []
    handle = lin.register_forward_pre_hook(lambda m, a: xs.append(a[0].detach()[3].reshape(-1, lin.in_features)))
    with torch.no_grad():
        for hidden, extra, kwargs in zip(inputs.hidden, inputs.extra_args, inputs.kwargs):
            layer(hidden, *extra, **kwargs)
    handle.remove()
    x = torch.cat(xs)
    torch.testing.assert_close(held, x.T @ x, rtol=1e-5, atol=1e-4)
    w, keep = lin.weight.detach().float(), torch.arange(0, lin.in_features, 2)
    best, errors = auto.choose_damping(w, fit, held, keep)
    assert set(errors) == set(auto.CANDIDATES) and errors[best] == min(errors.values())
    assert errors[1e-2] == pytest.approx(relative_error(w, refit(w, fit, keep, 1e-2), held, keep))
    assert auto.choose_damping(w, fit, torch.zeros_like(held), keep) == (auto.FALLBACK, {})


def test_auto_damping_records_each_layers_choice_and_matches_a_fixed_run_at_that_choice(monkeypatch):
    from hf_prune.methods.structured import damping as auto

    model = tiny_llama(3)
    small = _prune(model, damping="auto")
    records = get_pruning_state(small).metrics["reconstruction_error"]
    assert len(records) == 6 and all(r["damping"] in auto.CANDIDATES for r in records.values())
    assert all(r["reconstructed"] < r["importance_only"] for r in records.values())
    assert StructuredConfig(target_layers=2).damping == "auto"  # the default
    fixed = get_pruning_state(_prune(model, damping=0.01)).metrics["reconstruction_error"]
    assert all(r["damping"] == 0.01 for r in fixed.values())
    # a single candidate: the auto run is the fixed run at that value (same units, same refit on all windows)
    monkeypatch.setattr(auto, "CANDIDATES", (1e-3,))
    only, same = _prune(model, damping="auto"), _prune(model, damping=1e-3)
    assert {r["damping"] for r in get_pruning_state(only).metrics["reconstruction_error"].values()} == {1e-3}
    for (name, a), b in zip(only.state_dict().items(), same.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-4)  # Gram summed in two parts: float order only
