"""CoFi's layer-count constraints (`target_attention_layers` / `target_ffn_layers`): formula, masks, training, export."""

import pytest
import torch

from hf_prune import CoFiConfig, PruningTrainer
from hf_prune.methods.cofi.plugin import CoFiPlugin
from hf_prune.methods.cofi.sparsity import expected_sparsity, expected_sublayers, layer_target_at
from hf_prune.methods.cofi.structure import describe_structure

from cofi_helpers import ToyDataset, random_gates as _random_gates, tiny_bert, training_args as _args


def _kept_sublayers(model):
    layers = describe_structure(model)["layers"]
    return sum(not layer["attention_removed"] for layer in layers), sum(not layer["ffn_removed"] for layer in layers)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_attention_layers": -1}, "target_attention_layers must be an integer >= 0"),
        ({"target_ffn_layers": 1.5}, "target_ffn_layers must be an integer or None, got 1.5"),
        ({"target_attention_layers": True}, "target_attention_layers must be an integer or None, got True"),
        ({"target_attention_layers": 2, "prune_layers": False}, "target_attention_layers=2 needs prune_layers=True"),
    ],
)
def test_bad_layer_targets_raise_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoFiConfig(**kwargs)


def test_layer_target_beyond_the_model_is_refused_before_training():
    with pytest.raises(ValueError, match="target_ffn_layers=5 is more than the model's 4 layers"):
        CoFiPlugin(CoFiConfig(target_ffn_layers=5), tiny_bert(0))


def test_layer_targets_that_cannot_keep_enough_parameters_are_refused():
    # tiny BERT: 4 x 4096 attention + 4 x 3072 FFN weights; no attention and one FFN keep 3072 / 28672 = 10.7 %
    with pytest.raises(ValueError, match=r"target_attention_layers=0, target_ffn_layers=1 leave at most 10.7% .*"
                                         r"target_sparsity=0.6 keeps 40.0%"):
        CoFiPlugin(CoFiConfig(target_sparsity=0.6, target_attention_layers=0, target_ffn_layers=1), tiny_bert(0))
    CoFiPlugin(CoFiConfig(target_sparsity=0.9, target_attention_layers=0, target_ffn_layers=1), tiny_bert(0))


def test_expected_sublayers_formula():
    # layer keep probabilities times P(at least one unit kept)
    mha = torch.tensor([1.0, 0.5, 0.0])
    head = torch.tensor([[0.5, 0.5], [1.0, 0.0], [1.0, 1.0]])
    got = expected_sublayers(mha=mha, head=head)
    assert got["attention"].item() == pytest.approx(1.0 * 0.75 + 0.5 * 1.0 + 0.0)
    assert got["ffn"] is None
    # 0/1 masks: an exact count, a sublayer with no unit left counts as removed
    got = expected_sublayers(ffn=torch.tensor([1.0, 1.0, 0.0]), neuron=torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    assert got["ffn"].item() == 1.0
    assert layer_target_at(0, 6, 2, 10) == 6 and layer_target_at(5, 6, 2, 10) == 4 and layer_target_at(99, 6, 2, 10) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_attn, n_ffn", [(1, 2), (0, None), (2, 1)])
def test_fixed_masks_keep_at_most_the_target_and_match_sparsity(seed, n_attn, n_ffn):
    model = tiny_bert(seed)
    cfg = CoFiConfig(target_sparsity=0.7, multiple_of=1, target_attention_layers=n_attn, target_ffn_layers=n_ffn)
    plugin = CoFiPlugin(cfg, model)
    _random_gates(plugin, seed, scale=1.0)
    with torch.no_grad():  # every sublayer alive, layer logits distinct: the cap has to choose
        plugin.gates.gates["mha"].log_alpha.copy_(torch.tensor([3.0, 1.0, 4.0, 2.0]))
        plugin.gates.gates["ffn"].log_alpha.copy_(torch.tensor([2.0, 4.0, 1.0, 3.0]))
    plugin.gates.freeze(cfg.target_sparsity)
    masks = plugin.gates.deterministic_masks()
    kept_attn = torch.nonzero((masks["mha"] != 0) & (masks["head"] != 0).any(-1)).flatten().tolist()
    assert len(kept_attn) <= n_attn
    # the survivors are the highest layer logits among the alive sublayers ([3.0, 1.0, 4.0, 2.0] -> 2, 0, 3, 1)
    assert set(kept_attn) <= set([2, 0, 3, 1][:n_attn])
    if n_ffn is not None:
        kept_ffn = torch.nonzero((masks["ffn"] != 0) & (masks["neuron"] != 0).any(-1)).flatten().tolist()
        assert len(kept_ffn) <= n_ffn and set(kept_ffn) <= set([1, 3, 0, 2][:n_ffn])
    # the sparsity target is still met as closely as whole units allow, with the freed budget spent elsewhere
    got = expected_sparsity(plugin.adapter.dims, **{k: (v != 0).float() for k, v in masks.items()}).item()
    assert abs(got - 0.7) < 0.05, got
    # and the export has exactly that structure
    small = plugin.export(model)
    attn, ffn = _kept_sublayers(small)
    assert attn == len(kept_attn)
    assert ffn <= (n_ffn if n_ffn is not None else 4)


def _train(tmp_path, name, target_attention_layers):
    student, teacher = tiny_bert(0), tiny_bert(0)
    cfg = CoFiConfig(target_sparsity=0.45, sparsity_warmup_steps=0, finetune_steps=4, gate_learning_rate=0.05,
                     lagrangian_learning_rate=0.05, gate_init_droprate=0.05,
                     target_attention_layers=target_attention_layers)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / name, max_steps=160),
                             pruning_config=cfg, train_dataset=ToyDataset())
    trainer.train()
    return trainer


def test_layer_constraint_keeps_fewer_attention_sublayers_and_export_obeys(tmp_path):
    free, capped = _train(tmp_path, "free", None), _train(tmp_path, "capped", 1)

    def last_pruning_log(trainer):
        return [h for h in trainer.state.log_history if h.get("masks_frozen") == 0.0][-1]

    def expected_attention(trainer):  # from the gates at the end of the pruning phase, same formula for both runs
        return last_pruning_log(trainer)["expected_mha_layers"]

    # Same run otherwise: without the constraint the sparsity target alone is met with ~3 of the 4 attention
    # sublayers expected to stay; the constraint pulls that count toward 1 (measured: 3.2 vs 0.1)
    assert expected_attention(free) > 2.5, last_pruning_log(free)
    assert expected_attention(capped) < 1.5, last_pruning_log(capped)
    log = last_pruning_log(capped)
    for key in ("expected_attention_sublayers", "target_attention_sublayers", "lambda_attention_layers"):
        assert key in log, key
    assert log["target_attention_sublayers"] == 1.0 and log["lambda_attention_layers"] > 0
    assert "expected_ffn_sublayers" not in log
    assert [h for h in capped.state.log_history if "masks_frozen" in h][-1]["expected_attention_sublayers"] == 1.0
    assert _kept_sublayers(capped.export_pruned_model())[0] == 1
    assert _kept_sublayers(free.export_pruned_model())[0] >= 2
