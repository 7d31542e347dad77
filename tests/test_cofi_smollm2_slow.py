"""The decoder CoFi recipe end to end on the real SmolLM2-135M and Wikipedia text, shortened (slow: ~1.5-3 min)."""

import json
import math
import os
import sys

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integrations"))

import cofi_smollm2 as recipe  # noqa: E402  (the recipe folder is put on the path above)

SHORT = ["--train-windows", "8", "--seq-len", "32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "4",
         "--eval-windows", "2", "--eval-seq-len", "64", "--save-steps", "2", "--logging-steps", "1", "--quiet"]


def test_recipe_prunes_exports_reloads_generates_and_resumes(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "run")
    run = recipe.main(SHORT + ["--output", out])
    # the target architecture, exactly, as a plain LLaMA config
    assert run["reloaded_config"] == {"num_hidden_layers": 28, "num_attention_heads": 6, "num_key_value_heads": 2,
                                      "intermediate_size": 864, "hidden_size": 528, "head_dim": 64}
    assert run["structure"]["plain"] and run["train_steps"] == 4 and run["train_tokens"] == 4 * 2 * 32
    kept, full = recipe.target_prunable_params(recipe.load_dense(recipe.smollm2_path()), recipe.parse_args(SHORT))
    assert (kept, full) == (28 * 528 * (64 * 8 * 2 + 3 * 864), 30 * 576 * (64 * 8 * 3 + 3 * 1536))
    assert run["prunable_params"] == kept and run["sparsity"] == pytest.approx(1 - kept / full, abs=1e-9)
    # perplexity finite and recorded; the saved and reloaded export is the exported model
    assert math.isfinite(run["reloaded_perplexity"]) and math.isfinite(run["dense_perplexity"])
    assert run["reloaded_perplexity"] == pytest.approx(run["export_perplexity"], rel=1e-6)
    assert run["export_perplexity"] == pytest.approx(run["masked_perplexity"], rel=1e-3)
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["reloaded_perplexity"] == run["reloaded_perplexity"]
    with open(os.path.join(out, "model", "README.md")) as fh:
        assert "perplexity" in fh.read()
    # the export computes the masked model's function
    assert run["export_vs_masked_max_abs_logit_diff_float64"] <= 1e-4
    assert run["export_vs_masked_max_abs_logit_diff"] <= 1e-3, run  # float32 roundings over 28 layers
    # greedy generation with the KV cache equals generation without it
    model = AutoModelForCausalLM.from_pretrained(run["model_dir"]).eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1142]])
    kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
    cached = model.generate(ids, **kw)
    assert cached.shape == (1, 12) and torch.equal(model.generate(ids, **kw, use_cache=False), cached)

    # a second call with the same settings reuses the finished run; other settings with its checkpoint are refused
    capsys.readouterr()
    again = recipe.main(SHORT + ["--output", out])
    assert "cofi: reusing the finished run" in capsys.readouterr().out
    assert again["reloaded_perplexity"] == run["reloaded_perplexity"]
    assert any(n.startswith("checkpoint-") for n in os.listdir(os.path.join(out, "trainer")))
    with pytest.raises(SystemExit, match="holds checkpoints of a run with other settings; pass --overwrite"):
        recipe.main(SHORT + ["--output", out, "--lr", "2e-4"])


def test_recipe_refuses_a_target_the_model_cannot_have_before_training(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=r"target_layers=31 is larger than the model \(num_hidden_layers=30\)"):
        recipe.main(SHORT + ["--output", str(out), "--target-layers", "31"])
    assert not (out / "trainer").exists() and not (out / "dense.json").exists()  # nothing was run
