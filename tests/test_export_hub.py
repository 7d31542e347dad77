"""Push to a Hub-compatible server on loopback, then from_pretrained(repo_id) against it."""

import json

import pytest

from export_utils import run_python
from hub_server import HubServer, client_env

PUSH_AND_LOAD = r"""
import json, os, tempfile, torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM
import hf_prune
from export_utils import prune, tiny_model, sample_inputs
model = prune(tiny_model("llama"), "2:4", 0.5)
with torch.no_grad():
    ref = model(**sample_inputs("llama")).logits
local = tempfile.mkdtemp() + "/export"
model.save_pretrained(local)
model.push_to_hub("me/tiny-24")                       # transformers-style method on the pruned model
hf_prune.push_pruned(local, "me/tiny-24-cli")          # what `hf-prune push DIR REPO_ID` calls
out = {}
for repo in ("me/tiny-24", "me/tiny-24-cli"):
    loaded = AutoModelForCausalLM.from_pretrained(repo)
    with torch.no_grad():
        out[repo + ":logits_equal"] = bool(torch.equal(loaded(**sample_inputs("llama")).logits, ref))
    sd = model.state_dict()
    out[repo + ":weights_equal"] = all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
    out[repo + ":card"] = str(ModelCard.load(repo))
out["local_card"] = open(local + "/README.md").read()
try:
    hf_prune.push_pruned(local, "me/broken")
except hf_prune.export.PushError as err:
    out["push_error"] = str(err)
out["local_intact"] = sorted(os.listdir(local))
print("REPORT" + json.dumps(out))
"""


@pytest.fixture
def hub():
    with HubServer(max_lifetime_s=180) as server:
        yield server


def test_push_then_from_pretrained_gives_same_model_and_our_card(hub, tmp_path):
    hub.fail_next["/api/models/me/broken/commit"] = 500  # not retried by the client
    env = client_env(hub, tmp_path / "hf_home")
    proc = run_python(PUSH_AND_LOAD, env=env, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("REPORT", 1)[1])
    for repo in ("me/tiny-24", "me/tiny-24-cli"):
        assert out[repo + ":logits_equal"] and out[repo + ":weights_equal"], repo
        assert "hf_prune:model-card" in out[repo + ":card"]
        files = set(hub.repos[repo].branches["main"])
        assert {"config.json", "model.safetensors", "README.md"} <= files
        assert not any(name.startswith(".") for name in files)
    # push_pruned uploads the card exactly as written locally
    assert hub.file("me/tiny-24-cli", "README.md").decode() == out["local_card"]
    assert "failed while uploading the files" in out["push_error"] and "intact" in out["push_error"]
    assert "model.safetensors" in out["local_intact"] and "README.md" in out["local_intact"]
