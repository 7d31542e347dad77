"""Masked LoRA recovery (hf_prune.get_sparse_peft_model) on a tiny LLaMA pruned with Wanda."""

import pytest
import torch

peft = pytest.importorskip("peft")
from conftest import VOCAB, tiny_llama  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402

import hf_prune  # noqa: E402
from hf_prune import WandaConfig, get_pruning_state, oneshot  # noqa: E402
from hf_prune.peft.layer import SparseLoraLinear  # noqa: E402

SETTINGS = [dict(pattern="2:4"), dict(sparsity=0.6)]


def _pruned(setting, calibration_ids):
    torch.manual_seed(0)
    model = tiny_llama()
    oneshot(model, WandaConfig(**setting), calibration=calibration_ids, show_progress=False)
    return model


def _masks(model):
    state = get_pruning_state(model)
    modules = dict(model.named_modules())
    return {n: modules[n].weight != 0 for n in state.module_sparsity}


def _train(peft_model, steps=20, lr=1e-2):
    generator = torch.Generator().manual_seed(2)
    batch = torch.randint(0, VOCAB, (4, 32), generator=generator)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, batch


@pytest.mark.parametrize("setting", SETTINGS, ids=["2:4", "60%"])
def test_masked_lora_trains_and_merges_exactly(setting, calibration_ids):
    model = _pruned(setting, calibration_ids)
    masks = _masks(model)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert isinstance(peft_model, PeftModel)
    sparse_layers = [m for m in peft_model.modules() if isinstance(m, SparseLoraLinear)]
    assert len(sparse_layers) == len(masks)
    losses, batch = _train(peft_model)
    assert losses[-1] < losses[0] - 0.1
    peft_model.eval()
    with torch.no_grad():
        adapter_logits = peft_model(input_ids=batch).logits
    merged = peft_model.merge_and_unload()
    assert get_pruning_state(merged) is not None
    modules = dict(merged.named_modules())
    for name, mask in masks.items():
        assert torch.equal(modules[name].weight != 0, mask), name
    if "pattern" in setting:
        w = modules[next(iter(masks))].weight
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 2).all()
    with torch.no_grad():
        merged_logits = merged(input_ids=batch).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)


def test_masked_forward_equals_effective_weight(calibration_ids):
    model = _pruned(dict(pattern="2:4"), calibration_ids)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = next(m for m in peft_model.modules() if isinstance(m, SparseLoraLinear))
    layer.lora_B["default"].weight.data.normal_()
    x = torch.randn(3, 64, requires_grad=True)
    out = layer(x)
    w = layer.get_base_layer().weight
    effective = w + layer.get_delta_weight("default")
    assert torch.allclose(out, x @ effective.T, atol=1e-5)
    # gradients equal those of the explicit masked formulation
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    out.sum().backward()
    ga, gb, gx = a.grad.clone(), b.grad.clone(), x.grad.clone()
    a2, b2, x2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref = x2 @ (w + (w != 0) * (b2 @ a2) * layer.scaling["default"]).T
    ref.sum().backward()
    assert torch.allclose(ga, a2.grad, atol=1e-5) and torch.allclose(gb, b2.grad, atol=1e-5)
    assert torch.allclose(gx, x2.grad, atol=1e-5)


@pytest.mark.parametrize("setting", SETTINGS, ids=["2:4", "60%"])
def test_adapter_round_trip_keeps_masking(tmp_path, calibration_ids, setting):
    model = _pruned(setting, calibration_ids)
    base_copy = _pruned(setting, calibration_ids)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    _, batch = _train(peft_model, steps=5)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=batch).logits
    loaded = PeftModel.from_pretrained(base_copy, tmp_path / "adapter")
    n_sparse = sum(isinstance(m, SparseLoraLinear) for m in loaded.modules())
    assert n_sparse == len(get_pruning_state(base_copy).module_sparsity)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch).logits, expected, atol=1e-5)
    # the loaded adapter keeps training masked, and merges into the same mask
    masks = _masks(base_copy)
    for name, p in loaded.named_parameters():
        p.requires_grad_("lora_A" in name or "lora_B" in name)
    _train(loaded, steps=3)
    modules = dict(loaded.merge_and_unload().named_modules())
    assert all(torch.equal(modules[n].weight != 0, m) for n, m in masks.items())


@pytest.mark.parametrize("setting", SETTINGS, ids=["2:4", "60%"])
def test_compressed_save_and_fresh_process_reload_bit_equal(tmp_path, calibration_ids, setting):
    from export_utils import run_python
    from safetensors.torch import load_file

    model = _pruned(setting, calibration_ids)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    _train(peft_model, steps=5)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "recovered")
    card = (tmp_path / "recovered" / "README.md").read_text()
    assert "recovery" in card and "masked LoRA" in card and '"r": 8' in card
    assert "model.safetensors" in {p.name for p in (tmp_path / "recovered").iterdir()}
    code = (
        "import hf_prune, torch\n"
        "from safetensors.torch import save_file\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'recovered')!r})\n"
        "assert hf_prune.get_pruning_state(m) is not None\n"
        f"save_file({{k: v.contiguous() for k, v in m.state_dict().items() if k != 'lm_head.weight'}}, "
        f"{str(tmp_path / 'dense.safetensors')!r})\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reloaded = load_file(tmp_path / "dense.safetensors")
    expected = {k: v for k, v in merged.state_dict().items() if k != "lm_head.weight"}
    assert set(reloaded) == set(expected)
    for name, p in expected.items():
        assert torch.equal(p, reloaded[name]), name


def test_bad_inputs(calibration_ids):
    with pytest.raises(ValueError, match="no hf_prune PruningState.*peft.get_peft_model"):
        hf_prune.get_sparse_peft_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    model = _pruned(dict(pattern="2:4"), calibration_ids)
    with pytest.raises(ValueError, match="target_modules=.*matches no module"):
        hf_prune.get_sparse_peft_model(model, LoraConfig(target_modules=["nonexistent_proj"]))
    with pytest.raises(ValueError, match="use_dora.*DoRA"):
        hf_prune.get_sparse_peft_model(model, LoraConfig(target_modules="all-linear", use_dora=True))
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        hf_prune.get_sparse_peft_model(model, LoraConfig(target_modules="all-linear", init_lora_weights="pissa"))


@pytest.mark.parametrize("trainer_kind", ["stock", "pruning"])
def test_trainers_train_masked_lora(tmp_path, calibration_ids, trainer_kind):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hf_prune import PruningTrainer

    model = _pruned(dict(pattern="2:4"), calibration_ids)
    masks = _masks(model)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    ids = torch.randint(0, VOCAB, (16, 32), generator=torch.Generator().manual_seed(3))
    train = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(tmp_path / "run", max_steps=10, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True)
    if trainer_kind == "stock":
        trainer = Trainer(model=peft_model, args=args, train_dataset=train)
    else:
        trainer = PruningTrainer(model=peft_model, args=args, train_dataset=train, pruning_config=None)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < losses[0]  # Trainer logging intact: one entry per step
    merged = trainer.export_pruned_model() if trainer_kind == "pruning" else trainer.model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    modules = dict(merged.named_modules())
    assert all(torch.equal(modules[n].weight != 0, m) for n, m in masks.items())


def test_pruning_trainer_refuses_a_method_on_a_peft_model(tmp_path, calibration_ids):
    from transformers import TrainingArguments

    from hf_prune import DynSparseConfig, PruningTrainer

    peft_model = hf_prune.get_sparse_peft_model(_pruned(dict(pattern="2:4"), calibration_ids),
                                                LoraConfig(r=4, target_modules="all-linear"))
    args = TrainingArguments(tmp_path / "run", max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="peft model.*pruning_config=None"):
        PruningTrainer(model=peft_model, args=args, pruning_config=DynSparseConfig(sparsity=0.5))
    # a teacher with no method distils into the (masked) adapters; the exported model is merged, mask kept
    trainer = PruningTrainer(model=peft_model, args=args, pruning_config=None, teacher_model=tiny_llama())
    assert type(trainer.pruning_plugin).__name__ == "DistillationPlugin"


def test_dynsparse_block_layout_keeps_its_blocks():
    from hf_prune import DynSparseConfig, attach

    torch.manual_seed(0)
    model = attach(tiny_llama(), DynSparseConfig(sparsity=0.75, block_size=16), total_steps=10).finalize()
    state = get_pruning_state(model)
    assert state.layout == "block:16x16"
    masks = _masks(model)
    peft_model = hf_prune.get_sparse_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    assert sum(isinstance(m, SparseLoraLinear) for m in peft_model.modules()) == len(masks)
    losses, _ = _train(peft_model, steps=10)
    assert losses[-1] < losses[0]
    modules = dict(peft_model.merge_and_unload().named_modules())
    for name, mask in masks.items():
        w = modules[name].weight
        assert torch.equal(w != 0, mask), name
        blocks = (w != 0).view(w.shape[0] // 16, 16, w.shape[1] // 16, 16).any(3).any(1)
        assert blocks.float().mean().item() == pytest.approx(0.25, abs=1e-6), name


@pytest.mark.parametrize("field, value, name", [
    ("use_dora", True, "DoRA"), ("lora_bias", True, "LoRA bias"), ("layer_replication", [[0, 1]], "layer replication"),
])
def test_unsupported_lora_variants_refused_by_name(calibration_ids, field, value, name):
    model = _pruned(dict(pattern="2:4"), calibration_ids)
    with pytest.raises(ValueError, match=f"LoraConfig.{field} .*{name}.*not supported"):
        hf_prune.get_sparse_peft_model(model, LoraConfig(target_modules="all-linear", **{field: value}))
    assert not any(isinstance(m, SparseLoraLinear) for m in model.modules())  # refused before any change


# ------------------------------------------------------------------ class 17: pruning through adapters is refused
@pytest.mark.parametrize("wrap", ["sparse_peft", "plain_peft", "injected"])
def test_oneshot_refuses_adapter_models_naming_the_fix(wrap, calibration_ids):
    from hf_prune import MagnitudeConfig

    if wrap == "sparse_peft":
        model = hf_prune.get_sparse_peft_model(_pruned(dict(sparsity=0.5), calibration_ids),
                                               LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    elif wrap == "plain_peft":
        model = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    else:
        model = peft.inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"), tiny_llama())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"oneshot\(\) got a (peft PeftModel|model with peft adapter layers).*lora_A, "
                                         r"lora_B.*Prune the base model before wrapping it.*merge_and_unload\(\)"):
        oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False, allow_repruning=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_merged_model_may_be_repruned_on_purpose(calibration_ids):
    from hf_prune import MagnitudeConfig

    peft_model = hf_prune.get_sparse_peft_model(_pruned(dict(sparsity=0.5), calibration_ids), LoraConfig(r=4, target_modules="all-linear"))
    merged = peft_model.merge_and_unload()
    with pytest.raises(ValueError, match="already pruned"):
        oneshot(merged, MagnitudeConfig(sparsity=0.7), show_progress=False)
    oneshot(merged, MagnitudeConfig(sparsity=0.7), show_progress=False, allow_repruning=True)
    assert abs(get_pruning_state(merged).overall_sparsity - 0.7) < 1e-3


def test_dynsparse_and_cofi_refuse_peft_models_and_oneshot_refuses_mid_training():
    from hf_prune import DynSparseConfig, MagnitudeConfig, attach
    from hf_prune.methods.dynsparse.updater import DynSparseUpdater

    wrapped = peft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"DynSparse got a peft PeftModel.*merge_and_unload"):
        DynSparseUpdater(wrapped, DynSparseConfig(sparsity=0.5))
    from cofi_helpers import tiny_bert
    from hf_prune import CoFiConfig
    from hf_prune.methods.cofi.plugin import CoFiPlugin

    with pytest.raises(ValueError, match=r"CoFi got a peft PeftModel"):
        CoFiPlugin(CoFiConfig(target_sparsity=0.5), peft.get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"])))
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = attach(model, DynSparseConfig(sparsity=0.5), optimizer=opt, total_steps=4)
    with pytest.raises(ValueError, match=r"in the middle of DynSparse training-time pruning.*pruner.finalize\(\)"):
        oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False, allow_repruning=True)
    pruner.finalize()
    oneshot(model, MagnitudeConfig(sparsity=0.8), show_progress=False, allow_repruning=True)
    gated = tiny_bert()
    CoFiPlugin(CoFiConfig(target_sparsity=0.5), gated)
    with pytest.raises(ValueError, match=r"in the middle of CoFi training-time pruning"):
        oneshot(gated, MagnitudeConfig(sparsity=0.5), show_progress=False)
