"""Decoder CoFi exports pushed to a Hub-compatible server on loopback, then `from_pretrained(repo_id)` against it:
the uniform export (a plain LLaMA config) and a heterogeneous one (the structure record) come back as the same model,
generate the same tokens with the KV cache, and carry the structured card."""

import json

from export_utils import run_python

PUSH_AND_LOAD = r"""
import json, torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
import hf_prune
from hf_prune.methods.cofi.structure import describe_structure
from cofi_helpers import tiny_llama
from test_cofi_decoder import frozen_plugin

ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
gen_kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
out = {}
for repo, uniform in (("me/cofi-decoder", True), ("me/cofi-decoder-het", False)):
    model = tiny_llama(1)
    small = frozen_plugin(model, uniform, 1).export(model)
    with torch.no_grad():
        ref = small(input_ids=ids).logits
    small.push_to_hub(repo)
    loaded = AutoModelForCausalLM.from_pretrained(repo)
    with torch.no_grad():
        out[repo + ":max_diff"] = float((loaded(input_ids=ids).logits - ref).abs().max())
    out[repo + ":generate_equal"] = bool(torch.equal(loaded.generate(ids, **gen_kw), small.generate(ids, **gen_kw)))
    out[repo + ":plain"] = describe_structure(loaded)["plain"]
    out[repo + ":card"] = str(ModelCard.load(repo))
print("REPORT" + json.dumps(out))
"""


def test_decoder_cofi_exports_push_and_load_back_from_the_hub(hub, tmp_path):
    proc = run_python(PUSH_AND_LOAD, env=hub.client_env(tmp_path / "hf_home"), timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("REPORT", 1)[1])
    for repo, plain in (("me/cofi-decoder", True), ("me/cofi-decoder-het", False)):
        assert out[repo + ":max_diff"] == 0.0, repo  # the same weights: bit-identical logits
        assert out[repo + ":generate_equal"], repo
        assert out[repo + ":plain"] is plain
        card = out[repo + ":card"]
        assert "hf_prune:model-card" in card and "structured pruning" in card and "cofi" in card
        files = set(hub.repos[repo].branches["main"])
        assert {"config.json", "model.safetensors", "README.md"} <= files
        config = json.loads(hub.file(repo, "config.json"))
        assert config["quantization_config"]["format"] == "structured"
        structure = config["quantization_config"]["format_config"]["structure"]
        assert structure["plain"] is plain
        assert config["num_hidden_layers"] == (3 if plain else 4)  # a plain config says the pruned shape itself
