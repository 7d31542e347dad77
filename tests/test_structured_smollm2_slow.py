"""The structured path end to end on the real SmolLM2-135M and Wikipedia text, at a small scale (slow: ~1 min):
one-shot width pruning with reconstruction, a few distillation steps, save, reload without hf_prune."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.slow

_LOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    path, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.load(path + "/prompt.pt", weights_only=True)
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    json.dump({"generated": gen.tolist(), "layers": model.config.num_hidden_layers,
               "hf_prune_imported": any(m.split(".")[0] == "hf_prune" for m in sys.modules)}, open(out, "w"))
    """
)


def test_structured_oneshot_distil_save_and_reload_without_hf_prune(smollm2, tmp_path):
    from hf_prune import StructuredConfig, get_pruning_state, oneshot
    from hf_prune.training.distill import distill

    tok, dense = smollm2.tokenizer, smollm2.model
    grads = [p.requires_grad for p in dense.parameters()]  # the session's model: the teacher's freeze is undone below

    def prune():
        # shape A of benchmarks/structured_smollm2.py: 30 % of the non-embedding parameters (2 of 3 KV groups, FFN 1092).
        # 16 x 128 calibration tokens: with 4 x 128 (fewer tokens than the FFN's 1536 inputs) the refit is
        # underdetermined and overfits (measured once: perplexity 4266 refit vs 116 importance only)
        cfg = StructuredConfig(target_sparsity=0.3, num_calibration_samples=16,
                               max_seq_length=128, calibration_batch_size=4)
        return oneshot(dense, cfg, calibration=smollm2.calibration[:16], tokenizer=tok, show_progress=False)

    try:
        small = prune()
        assert (small.config.num_key_value_heads, small.config.intermediate_size) == (2, 1092)
        small = distill(small, dense, smollm2.calibration[16:24], tok, steps=3, seq_len=64, batch_size=2,
                        learning_rate=5e-5, eval_texts=smollm2.held_out[:2], eval_windows=4, eval_seq_len=128,
                        data_name="8 other Wikipedia calibration articles", teacher_name="SmolLM2-135M")
    finally:
        for p, flag in zip(dense.parameters(), grads):
            p.requires_grad_(flag)
    m = get_pruning_state(small).metrics
    print(f"\nheld-out perplexity (4 x 128 tokens): dense {m['distillation_teacher_perplexity']}, "
          f"importance + refit {m['distillation_perplexity_before']}, after 3 distillation steps "
          f"({m['distillation_tokens']} tokens) {m['distillation_perplexity_after']}")
    assert m["distillation_tokens"] == 3 * 2 * 64 and m["calibration_tokens"] == 16 * 128
    before, after = m["distillation_perplexity_before"], m["distillation_perplexity_after"]
    # measured once (2 slow cores, 1 thread): dense 29.4, importance only 118.7, refit 129.3, distilled 126.1; at this
    # calibration size the refit does not beat importance only yet (it does at 32 x 512, docs/guides/structured.md),
    # so the bound is loose but far below the underdetermined refit's 4266
    assert math.isfinite(after) and after < 1.1 * before and after < 200

    path = tmp_path / "small"
    small.save_pretrained(path)
    card = (path / "README.md").read_text()
    assert f"held-out perplexity {before} → {after}" in card and "**Calibration data**: 16 texts, 16 windows × 128 tokens" in card
    prompt = tok("The history of the city", return_tensors="pt").input_ids
    expected = small.eval().generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                     do_sample=False)
    torch.save(prompt, path / "prompt.pt")
    script, out = tmp_path / "load.py", tmp_path / "out.json"
    script.write_text(_LOAD)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path / "empty"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", str(script), str(path), str(out)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["hf_prune_imported"] is False and res["layers"] == 30
    assert res["generated"] == expected.tolist()
