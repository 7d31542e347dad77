"""CoFi on LLaMA-family decoders (Sheared-LLaMA style): size formula, target architecture, export, reload, generate."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_prune import CoFiConfig, PruningTrainer
from hf_prune.methods.cofi.arch import get_adapter
from hf_prune.methods.cofi.model import get_gates
from hf_prune.methods.cofi.plugin import CoFiPlugin
from hf_prune.methods.cofi.sparsity import expected_params
from hf_prune.methods.cofi.structure import describe_structure
from hf_prune.methods.cofi.targets import expected_counts, full_counts, target_counts

import cofi_helpers
from cofi_helpers import ToyLMDataset, random_gates, tiny_llama, training_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = dict(target_layers=3, target_heads=4, target_intermediate_size=20, target_hidden_size=24)


def _ids(seed=0, batch=2, length=9):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _binary(plugin):
    return {k: (v != 0).float() for k, v in plugin.gates.deterministic_masks().items()}


def _heterogeneous(plugin, seed=0):
    """Fixed masks with fractional values, one attention sublayer removed (layer 0, the KV cache's first layer),
    one whole layer removed (layer 2), different head counts and FFN widths per layer, a smaller hidden size."""
    g = torch.Generator().manual_seed(seed)
    gates = plugin.gates
    with torch.no_grad():
        for name, gate in gates.gates.items():
            getattr(gates, f"fixed_{name}").copy_(torch.rand(gate.log_alpha.shape, generator=g) * 0.6 + 0.4)
        gates.fixed_mha[0] = 0.0
        gates.fixed_layer[2] = 0.0
        gates.fixed_head[1, :2] = 0.0
        gates.fixed_head[3, 1] = 0.0
        gates.fixed_neuron[1, :10] = 0.0
        gates.fixed_neuron[3, 5:30] = 0.0
        gates.fixed_hidden[::5] = 0.0
        gates.frozen.fill_(True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_size_and_counts_equal_direct_counts_of_the_export(seed):
    model = tiny_llama(seed)
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=1), model)
    dims = plugin.adapter.dims
    # dense: the formula's full size is the direct count (Q, K, V, O with GQA; gate, up, down)
    assert dims.full_params == get_adapter(tiny_llama(seed)).prunable_weight_count()
    assert dims.full_params == 4 * (32 * 8 * 8 + 2 * 32 * 4 * 8 + 32 * 8 * 8 + 3 * 32 * 48)
    random_gates(plugin, seed, scale=1.5)
    masks = _binary(plugin)
    small = plugin.export(model)
    ad = get_adapter(small)
    assert expected_params(dims, **masks).item() == ad.prunable_weight_count()
    structure = describe_structure(small)
    counts = expected_counts(dims, masks)
    layers = structure["layers"]
    assert counts["kv_heads"].item() == sum(layer["kv_heads"] for layer in layers)
    assert counts["intermediate_size"].item() == sum(layer["intermediate_size"] for layer in layers)
    assert counts["hidden_size"].item() == structure["hidden_size"] == small.model.embed_tokens.embedding_dim
    assert counts["layers"].item() == int((masks["layer"] != 0).sum())
    assert all(layer["heads"] == 2 * layer["kv_heads"] for layer in layers)  # a KV head goes with its two query heads
    assert small.hf_prune_state.metrics["sparsity"] == pytest.approx(1 - ad.prunable_weight_count() / dims.full_params)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
def test_heterogeneous_export_equals_masked_model(model_type, tied):
    model = tiny_llama(0, model_type, tie_word_embeddings=tied)
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=16), model)
    _heterogeneous(plugin)
    ids = _ids()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    small = plugin.export(model)
    with torch.no_grad():
        exported = small(input_ids=ids).logits
    torch.testing.assert_close(exported, masked, atol=1e-4, rtol=0)
    s = describe_structure(small)
    assert not s["plain"] and s["hidden_size"] == 32 - 7
    assert [layer["heads"] for layer in s["layers"]] == [0, 4, 0, 6]
    assert [layer["attention_removed"] for layer in s["layers"]] == [True, False, True, False]
    assert [layer["ffn_removed"] for layer in s["layers"]] == [False, False, True, False]
    # 38 and 23 padded to multiples of 16
    assert [layer["intermediate_size"] for layer in s["layers"]] == [48, 48, 0, 32]
    assert (small.lm_head.weight is small.model.embed_tokens.weight) == tied
    assert small.lm_head.weight.shape == (64, 25)
    assert not any(k.startswith("model.layers.2.") for k in small.state_dict())  # nothing left of layer 2


def test_masked_model_loaded_with_from_pretrained_survives_train_eval_switches(tmp_path):
    """transformers >= 5.25 kernelizes a `from_pretrained` model and re-kernelizes it on every `train()` / `eval()`,
    which resets the `forward` of LLaMA's RMSNorm: the hidden-dimension masking must not live in a patched forward
    (it did, and the real SmolLM2 export then differed from the masked model by 30 in the logits)."""
    from transformers import AutoModelForCausalLM

    tiny_llama(0).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=16), model)
    _heterogeneous(plugin)
    ids = _ids()
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
        model.train()
        model.eval()  # a mode switch: where transformers re-kernelizes
        masked = model(input_ids=ids).logits
    torch.testing.assert_close(masked, before, atol=0, rtol=0)
    norm = model.model.norm
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert not torch.equal(norm(x), norm.forward(x))  # the hook masks; the stock forward alone does not
        small = plugin.export(model)
        torch.testing.assert_close(small(input_ids=ids).logits, masked, atol=1e-4, rtol=0)


def test_export_with_biases_equals_masked_model():
    model = tiny_llama(1, attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=1), model)
    _heterogeneous(plugin, seed=1)
    with torch.no_grad():
        plugin.gates.fixed_head[0] = 0.0  # every head gone, the mha gate on: a bias must not leak out
        plugin.gates.fixed_mha[0] = 0.7
    ids = _ids(1)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        exported = plugin.export(model)(input_ids=ids).logits
    torch.testing.assert_close(exported, masked, atol=1e-4, rtol=0)


def test_masked_rms_norm_is_the_rms_norm_of_the_kept_dimensions():
    model = tiny_llama(0)
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, prune_layers=False, prune_heads=False,
                                   prune_neurons=False), model)
    z = torch.ones(32)
    z[[1, 4, 9]] = 0.0
    z[0] = 0.5
    with torch.no_grad():
        plugin.gates.fixed_hidden.copy_(z)
        plugin.gates.frozen.fill_(True)
    norm = model.model.norm
    plugin.gates.refresh(False)
    x = torch.randn(3, 32)
    keep = z != 0
    ref = torch.zeros(3, 32)
    part = x[:, keep]
    ref[:, keep] = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight[keep]
    torch.testing.assert_close(norm(x), ref * z, atol=1e-6, rtol=0)


def test_target_architecture_freezes_to_exact_uniform_shape_and_a_plain_config():
    model = tiny_llama(0, "qwen2", tie_word_embeddings=True)
    plugin = CoFiPlugin(CoFiConfig(**ARCH), model)
    assert plugin.gates.arch_targets == {"layers": 3, "kv_heads": 2, "intermediate_size": 20, "hidden_size": 24}
    random_gates(plugin, 4, scale=3.0)  # far from the target: the freeze has to pick exactly that many
    plugin.gates.freeze(None)
    ids = _ids(2)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    small = plugin.export(model)
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked, atol=1e-4, rtol=0)
    c = small.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size,
            c.head_dim) == (3, 4, 2, 20, 24, 8)
    assert len(c.layer_types) == 3 and len(small.model.layers) == 3
    assert describe_structure(small)["plain"]
    # the layers kept are those with the highest layer logits, renumbered in order
    la = plugin.gates.gates["layer"].log_alpha.detach()
    assert small.hf_prune_state.metrics["target_architecture"] == plugin.gates.arch_targets
    assert sorted(torch.topk(la, 3).indices.tolist()) == [i for i, kept in enumerate(
        small.hf_prune_state.metrics["kept_neurons_per_layer"]) if kept]


@pytest.mark.parametrize("model_type, plain", [("llama", False), ("qwen2", True)])
def test_uniform_shape_the_config_class_refuses_is_saved_with_the_structure_record(tmp_path, caplog, model_type,
                                                                                   plain):
    # hidden 20 with 6 query heads: LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit
    # head_dim (Qwen2Config does not), so the LLaMA export keeps the original config and the structure record
    from transformers import AutoModelForCausalLM

    model = tiny_llama(0, model_type)
    plugin = CoFiPlugin(CoFiConfig(target_layers=3, target_kv_heads=3, target_intermediate_size=20,
                                   target_hidden_size=20), model)
    random_gates(plugin, 5)
    plugin.gates.freeze(None)
    ids = _ids(5)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    with caplog.at_level("WARNING", logger="hf_prune.methods.cofi.prune_decoder"):
        small = plugin.export(model)
    assert describe_structure(small)["plain"] is plain
    assert ("refuses it as a plain config" in caplog.text) is not plain
    if not plain:
        assert "not a multiple of the number of attention heads" in caplog.text
    small.save_pretrained(str(tmp_path / "m"))
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked, atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded(input_ids=ids).logits, masked, atol=1e-4, rtol=0)
    assert get_adapter(loaded).prunable_weight_count() == 3 * 20 * (8 * (2 * 2 + 2) * 3 + 3 * 20)


def _train(tmp_path, name, cfg, max_steps, resume=None, save_steps=None, seed=0):
    student, teacher = tiny_llama(seed), tiny_llama(seed)
    kw = dict(max_steps=max_steps, per_device_train_batch_size=4)
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path / name, **kw),
                             pruning_config=cfg, train_dataset=ToyLMDataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("frozen", [True, False])
def test_gradient_accumulation_weights_the_distillation_like_one_big_batch(tmp_path, frozen):
    # causal LMs normalise their own loss over the accumulated batch, so Trainer does not divide it; CoFi's terms
    # (KL, Lagrangian: per-micro-batch means) must be divided by the accumulation steps or they count double here
    def one_sgd_step(name, batch, accum):
        student, teacher = tiny_llama(0), tiny_llama(1)
        cfg = CoFiConfig(**ARCH, gate_init_droprate=0.05)
        args = training_args(tmp_path / name, max_steps=1, per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accum, optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
        trainer = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=cfg,
                                 train_dataset=ToyLMDataset(n=4))
        if frozen:
            trainer.pruning_plugin.gates.freeze(None)
        else:  # sampled gates differ between one and two forward passes: keep them at their deterministic values
            trainer.pruning_plugin.gates.refresh = lambda training: type(trainer.pruning_plugin.gates).refresh(
                trainer.pruning_plugin.gates, False)
        trainer.train()
        return {k: v.clone() for k, v in student.state_dict().items()}

    one, two = one_sgd_step("one", 4, 1), one_sgd_step("two", 2, 2)
    moved = [k for k in one if not torch.equal(one[k], tiny_llama(0).state_dict().get(k, one[k]))]
    assert moved  # the step changed the weights
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-5, msg=k)


def test_lagrangian_moves_each_constrained_count_toward_its_target(tmp_path):
    cfg = CoFiConfig(**ARCH, sparsity_warmup_steps=0, finetune_steps=0, gate_learning_rate=0.1,
                     lagrangian_learning_rate=0.2, gate_init_droprate=0.05)
    student = tiny_llama(0)
    trainer = PruningTrainer(model=student, teacher_model=tiny_llama(0),
                             args=training_args(tmp_path, max_steps=25, per_device_train_batch_size=4),
                             pruning_config=cfg, train_dataset=ToyLMDataset())
    gates = get_gates(student)
    dims = trainer.pruning_plugin.adapter.dims
    start = {k: v.item() for k, v in expected_counts(dims, gates.keep_probabilities()).items()}
    trainer.train()
    end = {k: v.item() for k, v in expected_counts(dims, gates.keep_probabilities()).items()}
    target, full = target_counts(gates.arch_targets, dims), full_counts(dims)
    for name in target:
        assert abs(end[name] - target[name]) < abs(start[name] - target[name]) - 0.05 * full[name], (name, start, end)
    logs = [h for h in trainer.state.log_history if "expected_layers" in h][-1]
    for key in ("loss_hard", "loss_distill_pred", "loss_lagrangian", "expected_layers", "expected_kv_heads",
                "expected_heads_per_layer", "expected_intermediate_per_layer", "expected_hidden",
                "expected_total_layers", "target_total_kv_heads", "lambda_hidden_size", "expected_sparsity"):
        assert key in logs, key
    assert "target_sparsity" not in logs


def test_resume_equals_uninterrupted_run(tmp_path):
    cfg = CoFiConfig(**ARCH, sparsity_warmup_steps=3, finetune_steps=2, gate_learning_rate=0.1,
                     lagrangian_learning_rate=0.1, distill_layer_weight=0.5)
    full = _train(tmp_path, "full", cfg, 8)
    _train(tmp_path, "part", cfg, 8, save_steps=4)
    resumed = _train(tmp_path, "resumed", cfg, 8, resume=str(tmp_path / "part" / "checkpoint-4"))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b) and bool(a["hf_prune_cofi.frozen"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.equal(a["hf_prune_cofi.arch_lambdas.kv_heads"], torch.zeros(2))
    small = full.export_pruned_model()
    assert small.config.num_hidden_layers == 3 and small.config.hidden_size == 24


def test_export_after_training_generates_with_the_kv_cache(tmp_path):
    # Trainer sets `config.use_cache = args.use_cache` (False) on the model it trains; an export built from that
    # config used to save `use_cache: false` in its generation config, and generate() recomputed the whole prefix
    # at every token (3.4x slower at batch 8 on SmolLM2)
    cfg = CoFiConfig(**ARCH, sparsity_warmup_steps=1, finetune_steps=1)
    trainer = _train(tmp_path, "run", cfg, 3)
    assert trainer.model.config.use_cache is False  # what Trainer did to the trained model
    small = trainer.export_pruned_model()
    assert small.config.use_cache is True and small.generation_config.use_cache is True
    small.save_pretrained(tmp_path / "export")
    saved = json.load(open(tmp_path / "export" / "generation_config.json"))
    assert saved.get("use_cache", True) is True
    calls = []
    small.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    ids = _ids(batch=1, length=5)
    small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                   pad_token_id=0)
    assert calls == [5, 1, 1, 1]  # the prompt once, then one new token per step: the cache is used


_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    {imports}
    from transformers import AutoModelForCausalLM
    path, out = sys.argv[1], sys.argv[2]
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except Exception as err:
        json.dump({{"error": f"{{type(err).__name__}}: {{err}}"}}, open(out, "w")); sys.exit(0)
    ids = torch.load(path + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    json.dump({{"logits": logits.tolist(), "generated": gen.tolist(), "cls": type(model).__name__}}, open(out, "w"))
    """
)


def _fresh(tmp_path, path, with_hf_prune):
    script = tmp_path / f"load_{with_hf_prune}.py"
    script.write_text(_LOAD.format(imports="import hf_prune" if with_hf_prune else ""))
    out = tmp_path / f"out_{with_hf_prune}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    if with_hf_prune:
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd = [sys.executable, str(script), str(path), str(out)]
    else:  # hf_prune cannot be imported at all
        env["PYTHONPATH"] = str(tmp_path / "empty")
        cmd = [sys.executable, "-I", str(script), str(path), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


def frozen_plugin(model, uniform: bool, seed: int) -> CoFiPlugin:
    """CoFi on `model` with fixed masks: the target architecture `ARCH` (a uniform export) or `_heterogeneous`."""
    plugin = CoFiPlugin(CoFiConfig(**ARCH) if uniform else CoFiConfig(target_sparsity=0.5), model)
    if uniform:
        random_gates(plugin, seed)
        plugin.gates.freeze(None)
    else:
        _heterogeneous(plugin, seed=seed)
    return plugin


@pytest.mark.parametrize("uniform", [False, True])
def test_fresh_process_from_pretrained_and_generate_with_kv_cache_equal(tmp_path, uniform):
    model = tiny_llama(3)
    plugin = frozen_plugin(model, uniform, 3)
    ids = _ids(3, batch=2, length=5)
    gen_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
    masked_gen = model.generate(ids, **gen_kw)
    small = plugin.export(model)
    with torch.no_grad():
        logits = small(input_ids=ids).logits
    generated = small.generate(ids, **gen_kw)
    assert torch.equal(generated, masked_gen)  # the KV cache of the pruned layers (a removed attention: layer 0)
    assert torch.equal(small.generate(ids, **gen_kw, use_cache=False), generated)
    path = tmp_path / "pruned"
    small.save_pretrained(str(path))
    torch.save(ids, str(path / "inputs.pt"))
    res, _ = _fresh(tmp_path, path, with_hf_prune=True)
    assert res["cls"] == "LlamaForCausalLM"
    torch.testing.assert_close(torch.tensor(res["logits"]), logits, atol=1e-5, rtol=0)
    assert torch.equal(torch.tensor(res["generated"]), generated)
    res, stderr = _fresh(tmp_path, path, with_hf_prune=False)
    if uniform:  # a plain LLaMA config: loads and runs without hf_prune
        torch.testing.assert_close(torch.tensor(res["logits"]), logits, atol=1e-5, rtol=0)
        assert torch.equal(torch.tensor(res["generated"]), generated)
        assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    else:  # heterogeneous: refused (never random weights), and the log names hf_prune
        assert "error" in res, res
        assert "hf_prune" in stderr + res["error"]


@pytest.mark.parametrize(
    "kwargs, message",
    cofi_helpers.ARCH_TARGETS_THE_TINY_LLAMA_CANNOT_HAVE,
)
def test_target_architecture_the_model_cannot_have_is_refused_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoFiPlugin(CoFiConfig(**kwargs), tiny_llama(0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_layers": 0}, "target_layers must be an integer >= 1"),
        ({"target_hidden_size": 2.5}, "target_hidden_size must be an integer or None, got 2.5"),
        ({"target_heads": 4, "target_kv_heads": 2}, "give target_heads or target_kv_heads, not both"),
        ({"target_layers": 2, "target_sparsity": 0.5}, "give target_sparsity=0.5 or a target architecture"),
        ({"target_hidden_size": 16, "prune_hidden": False}, "target_hidden_size needs prune_hidden=True"),
        ({"target_layers": 2, "target_ffn_layers": 1}, "with a target architecture use target_layers"),
    ],
)
def test_bad_target_fields_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoFiConfig(**kwargs)


def test_unsupported_models_and_mismatched_teacher_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForSequenceClassification

    with pytest.raises(ValueError, match=r"CoFi does not support this architecture: model is a GPT2LMHeadModel .*"
                                         r"supported: .*LlamaForCausalLM"):
        CoFiPlugin(CoFiConfig(), GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    with pytest.raises(ValueError, match="model is a LlamaForSequenceClassification"):
        CoFiPlugin(CoFiConfig(), LlamaForSequenceClassification(tiny_llama(0).config))
    with pytest.raises(ValueError, match="vocabulary of 80 but the student model 64"):
        CoFiPlugin(CoFiConfig(), tiny_llama(0), teacher_model=tiny_llama(0, vocab_size=80))
    from cofi_helpers import tiny_bert

    with pytest.raises(ValueError, match="a target architecture .* is for LLaMA-family decoders"):
        CoFiPlugin(CoFiConfig(target_layers=2), tiny_bert(0))
