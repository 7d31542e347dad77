"""`hf-prune info` output: natural module order, one row per block (or one line per module), recorded results."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_prune import MagnitudeConfig, get_pruning_state, oneshot, save_pruned
from hf_prune.cli import main
from hf_prune.export.summary import natural_key, split_block

LAYERS = 12
# config.json stores module names sorted as text, so within a block the kinds come in that order
KINDS = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj",
         "self_attn.v_proj"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=32)
    model = oneshot(AutoModelForCausalLM.from_config(cfg), MagnitudeConfig(sparsity=0.5))
    state = get_pruning_state(model)
    state.metrics.update(perplexity_before=24.481, perplexity_after=40.27, latency_b1_ms=3.25, speedup_b1=1.8)
    out = tmp_path_factory.mktemp("info") / "export"
    save_pruned(model, out, eval_results=[dict(
        task_type="text-generation", dataset_type="wikipedia", dataset_name="Wikipedia held out",
        metric_type="perplexity", metric_value=40.27)])
    return out


def test_natural_key_orders_numbers_as_numbers():
    names = ["layers.10.q", "layers.2.q", "layers.1.q", "lm_head", "layers.2.k"]
    assert sorted(names, key=natural_key) == ["layers.1.q", "layers.2.k", "layers.2.q", "layers.10.q", "lm_head"]
    assert split_block("model.layers.3.mlp.experts.7.up_proj") == ("model.layers.3", "mlp.experts.7.up_proj")
    assert split_block("lm_head") == (None, "lm_head")


def test_info_one_row_per_block_in_numeric_order(export, capsys):
    assert main(["info", str(export)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("Sparsity per block"))
    assert f"({LAYERS * len(KINDS)} modules in {LAYERS} blocks" in lines[header]
    assert lines[header + 1].split() == ["block"] + KINDS
    rows = lines[header + 2: header + 2 + LAYERS]
    assert [row.split()[0] for row in rows] == [f"model.layers.{i}" for i in range(LAYERS)]
    assert all(row.split()[1:] == ["0.5000"] * len(KINDS) for row in rows)
    assert "model.layers.0.self_attn.q_proj" not in text  # grouped, not one line per module


def test_info_per_module_in_numeric_order(export, capsys):
    assert main(["info", str(export), "--per-module"]) == 0
    lines = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.startswith("  model.layers.")]
    assert lines == [f"model.layers.{i}.{k}" for i in range(LAYERS) for k in KINDS]


def test_info_shows_measured_where_it_differs_from_recorded(export, tmp_path, capsys):
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(export, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["pruning"]["module_sparsity"]["model.layers.10.mlp.up_proj"] = 0.25
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["info", str(copy)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  model.layers.10 "))
    assert row.split()[1:] == ["0.5000"] * 2 + ["0.2500/0.5000"] + ["0.5000"] * 4


def test_info_recorded_results_in_text_and_json(export, capsys):
    assert main(["info", str(export)]) == 0
    text = capsys.readouterr().out
    section = text[text.index("Recorded results:"):text.index("Files verified")]
    assert "    perplexity: 40.27 on Wikipedia held out (text-generation)" in section  # the card's model-index
    assert "    perplexity: 24.481 -> 40.27 (before -> after)" in section
    assert "  speed:\n    latency_b1_ms: 3.25\n    speedup_b1: 1.8" in section
    assert main(["info", str(export), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["recorded_results"]
    assert results["quality"] == {"perplexity_before": 24.481, "perplexity_after": 40.27}
    assert results["speed"] == {"latency_b1_ms": 3.25, "speedup_b1": 1.8}
    (entry,) = results["evaluation"]
    assert entry["metric_type"] == "perplexity" and entry["metric_value"] == 40.27
    assert entry["dataset_name"] == "Wikipedia held out" and entry["task_type"] == "text-generation"


def test_info_without_recorded_results_says_none(export, tmp_path, capsys):
    import shutil

    copy = tmp_path / "bare"
    shutil.copytree(export, copy)
    (copy / "README.md").unlink()
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["pruning"]["metrics"] = {}
    (copy / "config.json").write_text(json.dumps(config))
    assert main(["info", str(copy)]) == 0
    assert "Recorded results: none" in capsys.readouterr().out
