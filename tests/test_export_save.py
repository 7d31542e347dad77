"""Atomic save, overwrite rules, README handling, crashes mid-save, corrupted files, loading without hf_prune,
the dense-compatible export, the model card and describe_export."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import hf_prune
from export_utils import prune, rewrite_with_checksums, run_python, tiny_model
from hf_prune.export import CorruptCheckpointError, describe_export, format_description, load_compressed_state_dict


@pytest.fixture(scope="module")
def pruned():
    return prune(tiny_model("llama"), "2:4", 0.5)


def _complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def test_existing_model_dir_is_an_error_unless_overwrite(pruned, tmp_path):
    out = tmp_path / "out"
    pruned.save_pretrained(out)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pruned.save_pretrained(out)
    (out / "tokenizer.json").write_text("{}")
    pruned.save_pretrained(out, overwrite=True)
    assert _complete(out) and (out / "tokenizer.json").is_file()  # unrelated files are kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_user_readme_is_kept_unless_asked(pruned, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my own card")
    (out / "checkpoint-1").mkdir()  # e.g. Trainer's output directory
    hf_prune.save_pruned(pruned, out)
    assert (out / "README.md").read_text() == "my own card" and (out / "checkpoint-1").is_dir() and _complete(out)
    hf_prune.save_pruned(pruned, out, overwrite=True, replace_readme=True)
    assert "hf_prune:model-card" in (out / "README.md").read_text()


def test_raise_mid_save_leaves_nothing(pruned, tmp_path, monkeypatch):
    import hf_prune.export.shards as shards

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(shards, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        pruned.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_kill_mid_save_leaves_no_complete_looking_dir(tmp_path):
    code = f"""
import os, signal
import hf_prune.export.shards as shards
from export_utils import prune, tiny_model
model = prune(tiny_model("llama"), "unstructured", 0.5)
real = shards.save_file
def dying(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the weights are written, before the export is finished
shards.save_file = dying
model.save_pretrained({str(tmp_path / 'out')!r})
"""
    proc = run_python(code)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    assert not any(_complete(p) for p in tmp_path.iterdir() if not p.name.startswith("."))


def test_truncated_file_gives_clear_error(pruned, tmp_path):
    out = tmp_path / "out"
    pruned.save_pretrained(out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    from transformers import AutoModelForCausalLM

    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors is truncated"):
        AutoModelForCausalLM.from_pretrained(out)
    assert describe_export(out)["verified"] is False


def test_wrong_bitmask_length_gives_clear_error(tmp_path):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    out = tmp_path / "out"
    model.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_hf_prune_bitmask"
    tensors[key] = tensors[key][:-1].contiguous()
    rewrite_with_checksums(out / "model.safetensors", tensors)  # a consistent but wrong writer, not bit rot
    from transformers import AutoModelForCausalLM

    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors: corrupted compressed weight 'model.layers.0.mlp.up_proj.weight': bitmask must be uint8 "
                       r"of shape \(256, 16\), got torch.uint8 \(255, 16\)"):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(CorruptCheckpointError):
        load_compressed_state_dict(out)
    # Values that do not match the mask: caught by the decoder, reported by the loader, never loaded.
    out = tmp_path / "out2"
    model.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    tensors[key][0, 0] ^= 1  # one more or one fewer kept entry than there are values
    rewrite_with_checksums(out / "model.safetensors", tensors)
    desc = describe_export(out)
    assert desc["verified"] is False and any("bitmask marks" in e for e in desc["errors"])
    with pytest.raises(RuntimeError):
        AutoModelForCausalLM.from_pretrained(out)


def test_loading_without_hf_prune_fails_naming_it(pruned, tmp_path):
    pruned.save_pretrained(tmp_path / "out")
    code = f"""
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})
print("LOADED")
"""
    proc = run_python(code, block_hf_prune=True)
    assert proc.returncode != 0 and "LOADED" not in proc.stdout
    assert "Unknown quantization type, got hf_prune" in proc.stderr
    assert "_hf_prune_" in proc.stderr  # the load report lists the compressed tensors it cannot read
    assert "ignore_mismatched_sizes" in proc.stderr


def test_dense_export_loads_without_hf_prune(pruned, tmp_path):
    hf_prune.save_pruned(pruned, tmp_path / "dense", dense=True)
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    assert "hf_prune:model-card" in (tmp_path / "dense" / "README.md").read_text()
    # the in-memory model still saves compressed afterwards
    pruned.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert any(k.endswith("_hf_prune_nm") for k in f.keys())
    code = f"""
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'dense')!r})
save_file({{k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}}, {str(tmp_path / 'sd.safetensors')!r})
"""
    proc = run_python(code, block_hf_prune=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded, sd = load_file(tmp_path / "sd.safetensors"), pruned.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.items())


def test_model_card_contents(tmp_path):
    model = prune(tiny_model("llama"), "unstructured", 0.5, base_model="HuggingFaceTB/SmolLM2-135M")
    evals = [{"task_type": "text-generation", "dataset_type": "wikitext", "dataset_name": "WikiText-2",
              "metric_type": "perplexity", "metric_value": 21.5}]
    hf_prune.save_pruned(model, tmp_path / "out", eval_results=evals)
    text = (tmp_path / "out" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["library_name"] == "transformers"
    assert {"pruned", "sparse", "test_export_mask", "hf_prune"} <= set(meta["tags"])
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 21.5
    assert '"sparsity": 0.5' in text and "prune(model, layout='unstructured', sparsity=0.5)" in text
    assert "| Layer | self_attn.q_proj |" in text and "| 1 |" in text  # per-layer table
    assert "50.0 %" in text and "import hf_prune" in text and "wall_time_s" in text
    assert "Weights on disk" in text and "×" in text


def test_describe_export(pruned, tmp_path):
    pruned.save_pretrained(tmp_path / "out")
    desc = describe_export(tmp_path / "out")
    assert desc["compressed"] and desc["verified"] and desc["method"] == "test_export_mask"
    assert desc["layout"] == "2:4" and len(desc["module_sparsity"]) == 14
    assert all(abs(v - 0.5) < 1e-6 for v in desc["measured_sparsity"].values())
    assert set(desc["codecs"].values()) == {"nm"}
    assert desc["file_bytes"] < desc["dense_bytes"]
    text = format_description(desc, per_module=True)
    assert "Files verified: yes" in text and "model.layers.1.mlp.down_proj" in text


def test_unpruned_model_cannot_be_save_pruned(tmp_path):
    with pytest.raises(ValueError, match="no hf_prune PruningState"):
        hf_prune.save_pruned(tiny_model("llama"), tmp_path / "x")


def test_gpt2_conv1d_round_trip(tmp_path):
    model = prune(tiny_model("gpt2", dtype=torch.float32), "2:4", 0.5)
    model.save_pretrained(tmp_path / "g")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "g")
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())


def test_loaded_model_fine_tunes_with_trainer_and_saves(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    prune(tiny_model("llama"), "unstructured", 0.5).save_pretrained(tmp_path / "pruned")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32)
    ids = torch.arange(64).view(8, 8) % 200 + 3
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    Trainer(model=model, args=args).save_model()  # through the model's compressed save_pretrained
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run", dtype=torch.float32)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in reloaded.state_dict().items())
