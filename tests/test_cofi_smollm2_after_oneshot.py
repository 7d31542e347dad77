"""`benchmarks/cofi_smollm2.py --init-oneshot`: the structured one-shot cut, then CoFi the rest of the way to the target
shape, on a tiny LLaMA (the benchmark's own code path, pointed at a tiny saved model and random texts)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from transformers import AutoConfig

from hf_prune.methods.cofi.arch import get_adapter

from cofi_helpers import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tiny "shape B" (CoFi's target): 3 of 4 layers, 2 of 4 KV groups, FFN 16 of 48, hidden 16 of 32 (4 query heads)
TARGET = ["--target-layers", "3", "--target-kv-heads", "2", "--target-intermediate-size", "16",
          "--target-hidden-size", "16"]
RECIPE = ["--train-windows", "8", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4",
          "--eval-windows", "2", "--eval-seq-len", "32", "--save-steps", "0", "--logging-steps", "1", "--quiet"]
TINY = RECIPE + ["--oneshot-windows", "4", "--oneshot-seq-len", "32", "--no-onnx", "--gen-prompt-len", "4",
                 "--gen-new-tokens", "2", "--gen-rounds", "1", "--batches", "1"]


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """The benchmark with the recipe's assets replaced by a tiny saved LLaMA and random texts, and shape A at a tiny
    cut: the KV groups to 2 (CoFi's target), the FFN to 32 (CoFi goes on to 16); layers and hidden size uncut."""
    from conftest import random_texts, tiny_tokenizer

    spec = importlib.util.spec_from_file_location("cofi_smollm2_bench", os.path.join(ROOT, "benchmarks", "cofi_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dense_dir = tmp_path / "dense"
    tiny_llama(3, vocab_size=128).save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    monkeypatch.setattr(module.recipe, "smollm2_path", lambda: str(dense_dir))
    monkeypatch.setattr(module.recipe, "wikipedia_split", lambda: (random_texts(4, seed=1),
                                                                   random_texts(2, words=300, seed=2)))
    monkeypatch.setitem(module.STRUCTURED_SHAPES, "A", {"target_kv_heads": 2, "target_intermediate_size": 32})
    return module


def test_oneshot_then_cofi_ends_at_the_target_shape_and_parameter_count_with_a_plain_config(bench, tmp_path):
    out, stem = tmp_path / "runs", tmp_path / "results" / "r"
    result = bench.main(["--init-oneshot", "A", *TARGET, *TINY, "--output", str(out), "--results", str(stem)])
    run = result["cofi_after_oneshot"]
    assert run["oneshot_shape"] == {"layers": 4, "kv_heads": 2, "intermediate_size": 32, "hidden_size": 32}
    assert run["ungated"] == ["kv_heads"]  # the cut brought the KV groups to the target: CoFi does not gate them
    assert run["config"]["prune_heads"] is False and run["config"]["target_kv_heads"] is None
    assert run["config"]["target_intermediate_size"] == 16 and run["config"]["prune_neurons"] is True
    assert run["oneshot_config"]["target_intermediate_size"] == 32 and run["oneshot_config"]["damping"] == 0.01
    # the export: exactly the target shape, counted against the dense model, as a plain LlamaConfig
    config = AutoConfig.from_pretrained(run["model_dir"])
    assert (config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads,
            config.intermediate_size, config.hidden_size) == (3, 2, 4, 16, 16)
    assert type(config).__name__ == "LlamaConfig" and run["structure"]["plain"] is True  # loads without hf_prune
    kept = 3 * 16 * (8 * (2 * 2 + 2) * 2 + 3 * 16)  # layers x hidden x (head_dim (2 q + k + v + o) KV + 3 FFN)
    full = 4 * 32 * (8 * (2 * 2 + 2) * 4 + 3 * 48)
    assert run["prunable_params"] == run["target_prunable_params"] == kept and run["prunable_params_dense"] == full
    assert run["sparsity"] == pytest.approx(1 - kept / full)
    assert get_adapter(bench.recipe.load_dense(run["model_dir"])).prunable_weight_count() == kept
    assert run["train_steps"] == 4 and run["reloaded_perplexity"] == pytest.approx(run["export_perplexity"], rel=1e-6)
    # its own results file: dense and the new row only
    with open(f"{stem}.json") as fh:
        assert [r["name"] for r in json.load(fh)["rows"]] == ["dense", "cofi after one-shot A"]
    assert (out / "cofi-after-oneshot-A" / "cofi_run.json").exists()


def test_a_cut_below_the_target_or_at_it_is_refused_before_any_work(bench, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.setitem(bench.STRUCTURED_SHAPES, "A", {"target_intermediate_size": 8})
    with pytest.raises(SystemExit, match=r"cuts below CoFi's target shape: intermediate_size 8 < target 16"):
        bench.main(["--init-oneshot", "A", *TARGET, *TINY, "--output", str(out)])
    monkeypatch.setitem(bench.STRUCTURED_SHAPES, "A", {"target_layers": 3, "target_kv_heads": 2,
                                                       "target_intermediate_size": 16, "target_hidden_size": 16})
    with pytest.raises(SystemExit, match="is the target shape already: nothing left for CoFi"):
        bench.main(["--init-oneshot", "A", *TARGET, *TINY, "--output", str(out)])
    assert not (out / "cofi-after-oneshot-A" / "trainer").exists()  # nothing was trained


def test_the_plain_cofi_row_from_the_dense_model_counts_the_same_way(bench, tmp_path):
    args = bench.recipe.parse_args([*TARGET, *RECIPE, "--output", str(tmp_path / "cofi")])
    run = bench.recipe.run_cofi(args)
    kept = 3 * 16 * (8 * (2 * 2 + 2) * 2 + 3 * 16)
    assert run["prunable_params"] == run["target_prunable_params"] == kept
    assert run["prunable_params_dense"] == 4 * 32 * (8 * (2 * 2 + 2) * 4 + 3 * 48)
    assert run["params_dense"] == sum(p.numel() for p in bench.recipe.load_dense(bench.recipe.smollm2_path()).parameters())
    assert run["sparsity"] == pytest.approx(1 - kept / run["prunable_params_dense"]) and "oneshot_shape" not in run
