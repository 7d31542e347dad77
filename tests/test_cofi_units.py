"""CoFi building blocks: gates, size formula, layer matching, config validation, masked vs exported model."""

import math

import pytest
import torch

from hf_prune import CoFiConfig
from hf_prune.methods.cofi.arch import get_adapter
from hf_prune.methods.cofi.distill import match_layers
from hf_prune.methods.cofi.gates import deterministic_gates, keep_probability, sample_gates
from hf_prune.methods.cofi.plugin import CoFiPlugin
from hf_prune.methods.cofi.sparsity import expected_params, expected_sparsity
from hf_prune.methods.cofi.structure import describe_structure

from cofi_helpers import random_gates as _random_gates, tiny_bert


def test_gate_samples_in_unit_interval_with_keep_probability():
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])
    n = 20000
    z = torch.stack([sample_gates(log_alpha) for _ in range(n)])
    assert z.min() >= 0.0 and z.max() <= 1.0
    assert (z == 0).any() and (z == 1).any()  # hard concrete: point masses at both ends
    kept = (z > 0).float().mean(0)
    p = keep_probability(log_alpha)
    # closed form check of one value: log_alpha = 0 -> 1 - sigmoid(2/3 log(0.1/1.1))
    assert p[2].item() == pytest.approx(1 - 1 / (1 + math.exp(-(2 / 3) * math.log(0.1 / 1.1))), abs=1e-6)
    tol = 4 * torch.sqrt(p * (1 - p) / n)  # 4 standard errors
    assert torch.all((kept - p).abs() < tol), (kept, p)


def test_deterministic_gates_keep_expected_number_highest_first():
    log_alpha = torch.tensor([[2.0, -4.0, 0.5, 3.0, -2.0, 1.0]])
    m = deterministic_gates(log_alpha)
    k = round(keep_probability(log_alpha).sum().item())
    assert int((m != 0).sum()) == k
    kept = set(torch.nonzero(m[0]).flatten().tolist())
    assert kept == set(torch.argsort(log_alpha[0], descending=True)[:k].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_size_formula_equals_direct_count_for_deterministic_masks(seed):
    model = tiny_bert(seed)
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=1), model)  # no alignment: units as the paper
    _random_gates(plugin, seed)
    masks = {k: (v != 0).float() for k, v in plugin.gates.deterministic_masks().items()}
    formula = expected_params(plugin.adapter.dims, **masks).item()
    small = plugin.export(model)
    direct = get_adapter(small).prunable_weight_count()
    assert formula == direct
    assert small.hf_prune_state.metrics["sparsity"] == pytest.approx(1 - direct / plugin.adapter.dims.full_params)
    dense_direct = get_adapter(tiny_bert(seed)).prunable_weight_count()
    assert plugin.adapter.dims.full_params == dense_direct
    assert expected_sparsity(plugin.adapter.dims, **masks).item() == pytest.approx(1 - direct / dense_direct)


@pytest.mark.parametrize("target", [0.3, 0.6, 0.9])
def test_freeze_matches_target_sparsity_and_keeps_the_ranking(target):
    model = tiny_bert(0)
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=target, multiple_of=1), model)
    _random_gates(plugin, 3)
    dims = plugin.adapter.dims
    plain = {k: (v != 0).float() for k, v in plugin.gates.deterministic_masks().items()}
    plain_sparsity = expected_sparsity(dims, **plain).item()
    offset = plugin.gates.freeze(target)
    fixed = {k: (v != 0).float() for k, v in plugin.gates.deterministic_masks().items()}
    got = expected_sparsity(dims, **fixed).item()
    # the shifted masks are never further from the target than the plain ones, and land within 0.03 of it (a few
    # FFN neurons of the tiny model; a head or a hidden dim is a coarser step)
    assert abs(got - target) <= abs(plain_sparsity - target) + 1e-12
    assert abs(got - target) < 0.03, (got, target, offset)
    if abs(plain_sparsity - target) > 0.05:  # 0.3 and 0.9 for these logits (plain: 0.59)
        assert offset != 0.0
    # a common offset never reorders units: every row keeps a prefix of its logit ranking
    for name, gate in plugin.gates.gates.items():
        la = gate.log_alpha.detach().reshape(-1, gate.log_alpha.shape[-1])
        m = fixed[name].reshape(la.shape)
        for row_la, row_m in zip(la, m):
            k = int(row_m.sum())
            assert set(torch.nonzero(row_m).flatten().tolist()) == set(torch.argsort(row_la, descending=True)[:k].tolist())
    # the masks are the exported structure
    small = plugin.export(model)
    assert small.hf_prune_state.metrics["sparsity"] == pytest.approx(got)


def test_freeze_without_target_keeps_plain_deterministic_masks():
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, match_target_on_freeze=False), tiny_bert(0))
    _random_gates(plugin, 3)
    plain = {k: v.clone() for k, v in plugin.gates.deterministic_masks().items()}
    assert plugin.gates.freeze() == 0.0
    for k, v in plugin.gates.deterministic_masks().items():
        assert torch.equal(v, plain[k])


def test_layer_matching_respects_order_constraint():
    # 3 teacher layers x 4 student layers; unconstrained argmin per row would be [3, 3, 0]
    costs = torch.tensor([[5.0, 1.0, 4.0, 0.5], [3.0, 2.0, 1.5, 0.1], [9.0, 9.0, 9.0, 0.2]])
    pairs = match_layers(costs)
    assert pairs == [(2, 3), (1, 2), (0, 1)]
    js = [j for _, j in pairs]
    assert all(a > b for a, b in zip(js, js[1:]))  # each teacher layer below the one matched above it
    # unavailable student layers (pruned FFN) are skipped; teacher layers with no candidate left stay unmatched
    pairs = match_layers(costs, torch.tensor([True, False, False, True]))
    assert pairs == [(2, 3), (1, 0)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_sparsity": 1.0}, "target_sparsity"),
        ({"target_sparsity": -0.1}, "target_sparsity"),
        (
            {"prune_layers": False, "prune_heads": False, "prune_neurons": False, "prune_hidden": False},
            "every unit is disabled",
        ),
        ({"gate_learning_rate": 0.0}, "gate_learning_rate"),
        ({"finetune_steps": 1.5}, "finetune_steps"),
        ({"teacher_layers": [4, 2]}, "teacher_layers"),
        ({"multiple_of": 0}, "multiple_of must be an integer >= 1"),
    ],
)
def test_bad_configs_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CoFiConfig(**kwargs)


def test_config_json_round_trip():
    cfg = CoFiConfig(target_sparsity=0.9, prune_hidden=False, teacher_layers=[2, 4])
    from hf_prune import PruningConfig

    assert PruningConfig.from_dict(cfg.to_dict()) == cfg


def test_teacher_with_different_label_count_is_refused():
    with pytest.raises(ValueError, match="teacher_model has 3 labels"):
        CoFiPlugin(CoFiConfig(), tiny_bert(0), teacher_model=tiny_bert(1, num_labels=3))


def test_unsupported_architecture_is_refused():
    from transformers import BertForMaskedLM, GPT2Config, GPT2ForSequenceClassification

    with pytest.raises(ValueError, match="does not support this architecture.*GPT2ForSequenceClassification"):
        CoFiPlugin(CoFiConfig(), GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2)))
    with pytest.raises(ValueError, match="does not support this architecture.*BertForMaskedLM"):
        CoFiPlugin(CoFiConfig(), BertForMaskedLM(tiny_bert(0).config))


def _inputs(vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (5, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("arch", ["bert", "roberta"])
@pytest.mark.parametrize("seed", [0, 3])
def test_export_equals_masked_model(arch, seed):
    if arch == "bert":
        model = tiny_bert(seed)
    else:
        from transformers import RobertaConfig, RobertaForSequenceClassification

        torch.manual_seed(seed)
        cfg = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=40, num_labels=2, pad_token_id=1)
        model = RobertaForSequenceClassification(cfg)
    model.eval()
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5), model)
    _random_gates(plugin, seed)
    inputs = _inputs()
    with torch.no_grad():
        masked = model(**inputs).logits
        small = plugin.export(model)
        exported = small(**inputs).logits
    structure = describe_structure(small)
    assert structure["hidden_size"] < 32
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in tiny_bert(0).parameters())
    torch.testing.assert_close(exported, masked, atol=1e-4, rtol=0)
    # masks really matter: the masked model differs from the dense one
    dense = type(model)(model.config).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("hf_prune_cofi")})
    with torch.no_grad():
        assert (dense(**inputs).logits - masked).abs().max() > 1e-3


def test_export_folds_fractional_layer_gates_once():
    """Deterministic gate values strictly inside (0, 1) (layer, head, neuron, hidden) fold into the weights exactly once.

    Weights are drawn large so every sublayer moves the residual stream by O(1): an error in the folding is then
    visible in the hidden states, not hidden under the small outputs of a default-initialised tiny model.
    """
    torch.manual_seed(0)
    model = tiny_bert(0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embeddings" not in name:
                p.normal_(0.0, 0.3)
    plugin = CoFiPlugin(CoFiConfig(), model)
    with torch.no_grad():
        g = plugin.gates.gates
        for gate in g.values():
            gate.log_alpha.uniform_(0.3, 1.5)  # test-time values 0.60-0.88: kept, but not 1
    masks = plugin.gates.deterministic_masks()
    assert all(((m == 0) | ((m > 0.5) & (m < 0.95))).all() for m in masks.values())
    assert (masks["mha"] > 0).all() and (masks["ffn"] > 0).all()  # every sublayer kept, with its gate below 1
    inputs = _inputs()
    with torch.no_grad():
        masked = model(**inputs, output_hidden_states=True)
        small = plugin.export(model)
        exported = small(**inputs, output_hidden_states=True)
    kept = torch.nonzero(masks["hidden"]).flatten()
    assert len(masked.hidden_states) == len(exported.hidden_states) == 5
    for h_masked, h_small in zip(masked.hidden_states, exported.hidden_states):
        assert h_masked.abs().max() > 0.1
        torch.testing.assert_close(h_small, h_masked[..., kept], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(exported.logits, masked.logits, atol=1e-4, rtol=1e-4)


def test_export_with_fixed_structure_has_heterogeneous_layers_and_removed_sublayers(tmp_path):
    model = tiny_bert(0).eval()
    plugin = CoFiPlugin(CoFiConfig(multiple_of=1), model)
    with torch.no_grad():
        g = plugin.gates.gates
        g["mha"].log_alpha.copy_(torch.tensor([5.0, -9.0, 5.0, 5.0]))  # layer 1 attention removed
        g["ffn"].log_alpha.copy_(torch.tensor([5.0, 5.0, 5.0, -9.0]))  # layer 3 FFN removed
        g["head"].log_alpha.fill_(5.0)
        g["head"].log_alpha[0, :3] = -9.0  # layer 0 keeps one head
        g["neuron"].log_alpha.fill_(5.0)
        g["neuron"].log_alpha[2, :40] = -9.0  # layer 2 keeps 8 neurons
        g["hidden"].log_alpha.fill_(5.0)
        g["hidden"].log_alpha[:4] = -9.0
    inputs = _inputs()
    with torch.no_grad():
        masked = model(**inputs).logits
        small = plugin.export(model)
        torch.testing.assert_close(small(**inputs).logits, masked, atol=1e-4, rtol=0)
    layers = describe_structure(small)["layers"]
    assert [layer["heads"] for layer in layers] == [1, 0, 4, 4]
    assert [layer["intermediate_size"] for layer in layers] == [48, 48, 8, 0]
    assert layers[1]["attention_removed"] and layers[3]["ffn_removed"]
    assert describe_structure(small)["hidden_size"] == 28
    # removed sublayers are parameter-free identity stand-ins, also after a save/load round trip
    from transformers import AutoModelForSequenceClassification

    from hf_prune import save_pruned
    from hf_prune.methods.cofi.structure import RemovedAttention, RemovedFFNOutput, RemovedIntermediate

    out = tmp_path / "small"
    save_pruned(small, str(out))
    loaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    for m in (small, loaded):
        enc = m.bert.encoder.layer
        assert isinstance(enc[1].attention, RemovedAttention) and not isinstance(enc[0].attention, RemovedAttention)
        assert isinstance(enc[3].intermediate, RemovedIntermediate) and isinstance(enc[3].output, RemovedFFNOutput)
        assert not isinstance(enc[2].output, RemovedFFNOutput)
        keys = set(m.state_dict())
        assert not any(k.startswith(("bert.encoder.layer.1.attention.", "bert.encoder.layer.3.intermediate.",
                                     "bert.encoder.layer.3.output.")) for k in keys)
        assert "bert.encoder.layer.3.attention.output.LayerNorm.weight" in keys
        # layers with a removed sublayer skip it (a subclass of the stock layer); full layers stay stock
        assert [type(module).__name__ for module in enc] == ["BertLayer", "CoFiPrunedBertLayer", "BertLayer",
                                                   "CoFiPrunedBertLayer"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, masked, atol=1e-4, rtol=0)
        loaded.train()  # the stand-ins are the identity in training mode too (dropout is 0 in this config)
        torch.testing.assert_close(loaded(**inputs).logits, masked, atol=1e-4, rtol=0)


def test_export_layer_with_every_sublayer_removed_is_skipped():
    """A layer with neither attention nor FFN left is the identity; its stand-ins are never called."""
    import copy
    import pickle

    from transformers.models.bert.modeling_bert import BertLayer

    model = tiny_bert(0).eval()
    plugin = CoFiPlugin(CoFiConfig(multiple_of=1), model)
    with torch.no_grad():
        for gate in plugin.gates.gates.values():
            gate.log_alpha.fill_(5.0)
        plugin.gates.gates["mha"].log_alpha[1] = -9.0
        plugin.gates.gates["ffn"].log_alpha[1] = -9.0
        plugin.gates.gates["neuron"].log_alpha[2] = -9.0  # layer 2: FFN removed by its neurons
    inputs = _inputs()
    with torch.no_grad():
        masked = model(**inputs, output_hidden_states=True)
        small = plugin.export(model)
        enc = small.bert.encoder.layer
        calls = []
        for sub in (enc[1].attention, enc[1].intermediate, enc[1].output, enc[2].intermediate, enc[2].output):
            sub.register_forward_hook(lambda *a: calls.append(1))
        out = small(**inputs, output_hidden_states=True)
        assert calls == []
        assert isinstance(enc[1], BertLayer) and isinstance(enc[2], BertLayer)
        # hidden states are still recorded per layer (transformers finds layers by class), equal to the masked model's
        assert len(out.hidden_states) == len(masked.hidden_states) == 5
        torch.testing.assert_close(out.hidden_states[2], out.hidden_states[1], atol=0, rtol=0)
        for a, b in zip(out.hidden_states, masked.hidden_states):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        assert pickle.loads(pickle.dumps(type(enc[1]))) is type(enc[1])  # importable by name
        dup = copy.deepcopy(small)
        torch.testing.assert_close(dup(**inputs).logits, masked.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("train", [False, True])
def test_masked_model_removed_sublayer_is_identity(train):
    """A sublayer whose layer gate is 0, or with no head / neuron left, passes its input through (no LayerNorm)."""
    from hf_prune.methods.cofi.arch import get_adapter

    torch.manual_seed(0)
    model = tiny_bert(0)
    plugin = CoFiPlugin(CoFiConfig(), model)
    with torch.no_grad():
        g = plugin.gates.gates
        for gate in g.values():
            gate.log_alpha.fill_(5.0)
        g["mha"].log_alpha[1] = -20.0  # layer 1 attention: layer gate 0 (also when sampled)
        g["neuron"].log_alpha[2] = -20.0  # layer 2 FFN: no neuron left, its layer gate is open
    ad = get_adapter(model)
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            seen[name] = (args[1], out)

        return hook

    handles = [ad.attn_block(i).register_forward_hook(keep(f"attn{i}")) for i in range(4)]
    handles += [ad.ffn_block(i).register_forward_hook(keep(f"ffn{i}")) for i in range(4)]
    model.train(train)
    model(**_inputs())
    for h in handles:
        h.remove()
    for name in ("attn1", "ffn2"):
        residual, out = seen[name]
        assert torch.equal(out, residual), name
    for name in ("attn0", "attn2", "ffn1", "ffn3"):
        residual, out = seen[name]
        assert (out - residual).abs().max() > 1e-2, name  # a kept sublayer changes the stream


def test_model_card_of_structured_export_reports_removed_units():
    from hf_prune.export.card import build_model_card

    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=1), tiny_bert(0))
    _random_gates(plugin, 3)
    small = plugin.export(plugin.model)
    text = str(build_model_card(small))
    metrics = small.hf_prune_state.metrics
    assert f"{100 * metrics['sparsity']:.1f} % of the prunable encoder weights removed physically" in text
    assert f"from {metrics['params_before']:,} before pruning" in text
    structure = describe_structure(small)
    assert f"hidden size 32 → {structure['hidden_size']}" in text
    for i, layer in enumerate(structure["layers"]):
        assert f"| {i} | {layer['heads']} / 4 | {layer['intermediate_size']} / 48 |" in text
    assert "0.0 % sparse" not in text and "| structure |" not in text


def test_model_card_speed_line_keeps_to_speedups_and_table_keeps_everything():
    from hf_prune.export.card import build_model_card

    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5), tiny_bert(0))
    _random_gates(plugin, 3)
    small = plugin.export(plugin.model)
    small.hf_prune_state.metrics.update(latency_b1_eager_1t_ms=3.968, speedup_b1_eager_1t=6.456)
    text = str(build_model_card(small))
    speed_line = next(line for line in text.splitlines() if line.startswith("- **Measured speed**"))
    assert speed_line == "- **Measured speed**: speedup_b1_eager_1t: 6.456"
    assert "| latency_b1_eager_1t_ms | 3.968 |" in text and "| speedup_b1_eager_1t | 6.456 |" in text


def test_structure_of_the_old_format_is_refused_naming_it():
    """A /1 checkpoint (removed sublayers kept their LayerNorm) would load with other semantics: refused, not guessed."""
    from hf_prune.methods.cofi.structure import apply_structure

    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5), tiny_bert(0))
    _random_gates(plugin, 3)
    structure = dict(describe_structure(plugin.export(plugin.model)), format="hf_prune.cofi.structure/1")
    with pytest.raises(ValueError, match=r"structure/1.*identity.*Re-run the CoFi export"):
        apply_structure(tiny_bert(0), structure)


def test_align_rounds_to_the_nearest_fillable_multiple():
    from hf_prune.methods.cofi.gates import _align

    keep = torch.tensor([325, 330, 3, 100, 90, 384, 41])
    available = torch.tensor([384, 330, 384, 100, 95, 384, 41])
    # 325 -> 320 (nearest); 330 -> 336 unfillable (330 non-zero gates) -> 320; below one multiple and a row kept whole
    # stay; 100 -> 96; 90 -> 96 unfillable -> 80; 41 -> 48 unfillable -> 32
    assert _align(keep, available, 16, 384).tolist() == [320, 320, 3, 96, 80, 384, 32]
    la = torch.randn(2, 384, generator=torch.Generator().manual_seed(0)) + 1.5
    for row, k in zip(deterministic_gates(la, multiple_of=16), torch.round(keep_probability(la).sum(-1))):
        n = int((row != 0).sum())
        assert n % 16 == 0 and abs(n - k) <= 8, (n, k)


def test_multiple_of_aligns_hidden_and_pads_ffn_with_zero_neurons():
    model = tiny_bert(1, hidden_size=64, intermediate_size=96).eval()
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=8), model)
    _random_gates(plugin, 5, scale=2.0)
    masks = plugin.gates.deterministic_masks()
    kept_hidden = int((masks["hidden"] != 0).sum())
    assert kept_hidden % 8 == 0 and 0 < kept_hidden < 64
    neurons = (masks["neuron"] * masks["ffn"].unsqueeze(-1) != 0).sum(-1).tolist()
    assert any(n % 8 for n in neurons), neurons  # the FFN widths themselves are not aligned by the masks
    inputs = _inputs()
    with torch.no_grad():
        masked = model(**inputs).logits
        small = plugin.export(model)
        torch.testing.assert_close(small(**inputs).logits, masked, atol=1e-4, rtol=0)
    s = describe_structure(small)
    assert s["hidden_size"] == kept_hidden
    widths = [layer["intermediate_size"] for layer in s["layers"]]
    assert widths == [min(96, -(-n // 8) * 8) if n else 0 for n in neurons]
    metrics = small.hf_prune_state.metrics
    assert metrics["kept_neurons_per_layer"] == neurons
    # the padding neurons are zero and counted in the stored size (the sparsity is that of the stored weights)
    for layer, (n, w) in enumerate(zip(neurons, widths)):
        if n:
            enc = small.bert.encoder.layer[layer]
            assert enc.intermediate.dense.weight[n:].abs().sum() == 0 and enc.intermediate.dense.bias[n:].abs().sum() == 0
            assert enc.output.dense.weight[:, n:].abs().sum() == 0
    padding = sum((w - n) * 2 * kept_hidden for n, w in zip(neurons, widths))
    unpadded = expected_params(plugin.adapter.dims, **{k: (v != 0).float() for k, v in masks.items()}).item()
    assert get_adapter(small).prunable_weight_count() == unpadded + padding
    assert metrics["sparsity"] == pytest.approx(1 - (unpadded + padding) / plugin.adapter.dims.full_params)
    from hf_prune.export.card import build_model_card

    text = str(build_model_card(small))
    layer, (n, w) = next((i, nw) for i, nw in enumerate(zip(neurons, widths)) if nw[1] > nw[0])
    assert f"{w} / 96 ({n} kept + {w - n} zero padding)" in text
