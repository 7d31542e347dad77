"""Sharded compressed checkpoints: `save_pretrained(dir, max_shard_size=...)` writes shards with the standard
`model.safetensors.index.json`, every compressed weight in one shard with its companions; `from_pretrained` (with
`device_map="auto"`), `load_compressed_state_dict` and `hf-prune info` read them; `push_to_hub` uploads them; the
streaming `ShardWriter` API that one-shot pruning uses."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from export_utils import prune, run_python, tiny_model
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

import hf_prune
from hf_prune.export import (
    CorruptCheckpointError,
    describe_export,
    load_compressed_state_dict,
)
from hf_prune.export.formats import compress_tensors, split_key
from hf_prune.export.info import read_safetensors_header
from hf_prune.export.shards import (
    INDEX_NAME,
    ShardWriter,
    default_max_shard_size,
    index_from_files,
    shard_size_bytes,
)

SHARD = 60_000  # bytes: the tiny LLaMA's compressed export (~250 KB) in several shards


def _check_index(out: Path, max_bytes: int) -> dict:
    """The index is transformers' format and agrees with the files; groups are whole; shards respect the limit."""
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    files = sorted(out.glob("model-*-of-*.safetensors"))
    n = len(files)
    assert n >= 3 and [p.name for p in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    held, total = {}, 0
    for path in files:
        header, _ = read_safetensors_header(path)
        keys = [k for k in header if k != "__metadata__"]
        sizes = {k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0] for k in keys}
        total += sum(sizes.values())
        groups = {split_key(k)[0] for k in keys}
        assert sum(sizes.values()) <= max_bytes or len(groups) == 1, path.name  # only a lone big group may exceed
        held.update({k: path.name for k in keys})
        assert set(json.loads(header["__metadata__"]["hf_prune_checksums"])) == set(keys)  # its own tensors' checksums
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == total
    file_of_group = {}
    for key, name in held.items():
        assert file_of_group.setdefault(split_key(key)[0], name) == name, f"{key} is not with its group"
    assert any(split_key(k)[1] for k in held)  # there are compressed groups at all
    return index


@pytest.mark.parametrize("layout,sparsity", [("unstructured", 0.5), ("2:4", 0.5), ("block:16x16", 0.75)])
def test_sharded_round_trip_with_the_index(tmp_path, layout, sparsity):
    model = prune(tiny_model("llama"), layout, sparsity)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size=f"{SHARD // 1000}KB")
    index = _check_index(out, SHARD)
    assert index["metadata"]["total_parameters"] == model.num_parameters()
    reference = model.state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="auto")
    assert loaded.dtype == torch.float16
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {k: v.dtype for k, v in reference.items()}
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    dense = load_compressed_state_dict(out)
    assert all(torch.equal(v, reference[k]) for k, v in dense.items())
    desc = describe_export(out)
    assert desc["verified"] and len(desc["files"]) == len(list(out.glob("model-*.safetensors")))
    # a reloaded sharded model re-saves (sharded again, same tensors)
    loaded.save_pretrained(tmp_path / "again", max_shard_size=SHARD)
    assert json.loads((tmp_path / "again" / INDEX_NAME).read_text())["weight_map"] == index["weight_map"]


def test_default_shard_size_follows_transformers_and_small_models_stay_one_file(tmp_path):
    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert default_max_shard_size() == default
    assert shard_size_bytes(None) == (parse_size_to_int(default) if isinstance(default, str) else default)
    assert shard_size_bytes("200MB") == 200_000_000 and shard_size_bytes(1234) == 1234
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    model.save_pretrained(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "one").glob("model*")) == ["model.safetensors"]


def test_resave_unsharded_over_sharded_leaves_no_stale_shard(tmp_path):
    model = prune(tiny_model("llama"), "2:4", 0.5)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size=SHARD)
    model.save_pretrained(out, overwrite=True)
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    model.save_pretrained(out, overwrite=True, max_shard_size=SHARD)
    assert not (out / "model.safetensors").exists() and _check_index(out, SHARD)


@pytest.mark.parametrize("bad", ["big", "-5MB", 0, -1, True, 1.5e-9])
def test_bad_max_shard_size_is_refused_before_anything_is_written(tmp_path, bad):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    with pytest.raises(ValueError, match="max_shard_size must be a positive number of bytes or a size like '200MB'"):
        model.save_pretrained(tmp_path / "out", max_shard_size=bad)
    assert list(tmp_path.iterdir()) == []


def test_unknown_save_argument_is_named(tmp_path):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    with pytest.raises(TypeError, match=r"unsupported argument\(s\) \['variant'\]"):
        model.save_pretrained(tmp_path / "out", variant="fp16")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupted_shard_is_named(tmp_path):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size=SHARD)
    victim = sorted(out.glob("model-*.safetensors"))[1]
    header, start = read_safetensors_header(victim)
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1] - header[k]["data_offsets"][0])
    raw = bytearray(victim.read_bytes())
    raw[start + header[key]["data_offsets"][0]] ^= 1
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{victim.name} is corrupted: .*{key.replace('.', '[.]')}"):
        AutoModelForCausalLM.from_pretrained(out)
    assert describe_export(out)["verified"] is False


def test_shard_writer_streams_groups_whole_and_merges_indexes(tmp_path):
    """What a streaming pruning run calls: one block at a time, a flush between blocks, then close()."""
    torch.manual_seed(0)
    blocks = []
    for b in range(3):
        w = torch.randn(64, 64).half()
        w[torch.rand(64, 64) < 0.5] = 0
        blocks.append({f"layers.{b}.q.weight": w, f"layers.{b}.norm.weight": torch.ones(64).half()})
    writer = ShardWriter(tmp_path / "s", max_shard_size=10_000, metadata={"note": "streamed"})
    reports = []
    for b, block in enumerate(blocks):
        compressed, report = compress_tensors(block, "unstructured")
        reports.append(report)
        writer.add(compressed)
        if b == 0:
            writer.flush()  # block 0 alone; blocks 1 and 2 (~4.7 KB each) share the next 10 KB shard
    with pytest.raises(ValueError, match="'layers.0.q.weight' was already added"):
        writer.add({"layers.0.q.weight_hf_prune_meta": torch.zeros(2, dtype=torch.int64)})
    files = writer.close(total_parameters=3 * (64 * 64 + 64))
    assert all(r.entries[f"layers.{b}.q.weight"]["codec"] == "bitmask" for b, r in enumerate(reports))
    assert "layers.0.norm.weight" not in reports[0].entries  # 1-D: never a compression candidate
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert [Path(f).name for f in files] == sorted(set(index["weight_map"].values()))
    assert index["metadata"]["total_parameters"] == 3 * (64 * 64 + 64)
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
    dense = hf_prune.export.formats.decompress_state_dict(tensors)
    for block in blocks:
        assert all(torch.equal(dense[k], v) for k, v in block.items())
    assert [sorted({k.split(".")[1] for k in load_file(f)}) for f in files] == [["0"], ["1", "2"]]
    # rebuilding the index from the files on disk gives the same index (merging shards written separately)
    (tmp_path / "s" / INDEX_NAME).unlink()
    index_from_files(tmp_path / "s", total_parameters=3 * (64 * 64 + 64))
    assert json.loads((tmp_path / "s" / INDEX_NAME).read_text()) == index


def test_index_from_files_refuses_a_group_split_across_files(tmp_path):
    from hf_prune.export.shards import write_shard

    w = torch.randn(8, 16).half() * (torch.rand(8, 16) > 0.5)
    compressed, _ = compress_tensors({"a.weight": w}, "unstructured")
    keys = sorted(compressed)
    write_shard(tmp_path / "model-00001-of-00002.safetensors", {k: compressed[k] for k in keys[:1]})
    write_shard(tmp_path / "model-00002-of-00002.safetensors", {k: compressed[k] for k in keys[1:]})
    with pytest.raises(ValueError, match="compressed weight 'a.weight' is split across"):
        index_from_files(tmp_path)


PUSH_SHARDED = r"""
import json, tempfile, torch
from transformers import AutoModelForCausalLM
import hf_prune
from export_utils import prune, tiny_model, sample_inputs
model = prune(tiny_model("llama"), "2:4", 0.5)
with torch.no_grad():
    ref = model(**sample_inputs("llama")).logits
model.push_to_hub("me/tiny-24-sharded", max_shard_size=60_000)
local = tempfile.mkdtemp() + "/export"
model.save_pretrained(local, max_shard_size=60_000)
hf_prune.push_pruned(local, "me/tiny-24-sharded-cli")
out = {}
for repo in ("me/tiny-24-sharded", "me/tiny-24-sharded-cli"):
    loaded = AutoModelForCausalLM.from_pretrained(repo, device_map="auto")
    with torch.no_grad():
        out[repo] = bool(torch.equal(loaded(**sample_inputs("llama")).logits, ref))
    sd = model.state_dict()
    out[repo] &= all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())
out["index"] = json.load(open(local + "/model.safetensors.index.json"))
print("REPORT" + json.dumps(out))
"""


def test_push_sharded_then_from_pretrained(hub, tmp_path):
    proc = run_python(PUSH_SHARDED, env=hub.client_env(tmp_path / "hf_home"), timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("REPORT", 1)[1])
    shards = set(out["index"]["weight_map"].values())
    assert len(shards) >= 3
    for repo in ("me/tiny-24-sharded", "me/tiny-24-sharded-cli"):
        assert out[repo], repo
        files = set(hub.repos[repo].branches["main"])
        assert {"config.json", "README.md", INDEX_NAME} | shards <= files and "model.safetensors" not in files
        assert json.loads(hub.file(repo, INDEX_NAME)) == out["index"]


def test_sharded_checkpoint_loads_with_accelerate_disk_offload(tmp_path):
    """`device_map="auto"` with a memory cap offloads decoded weights to disk through accelerate; same outputs."""
    from export_utils import sample_inputs

    model = prune(tiny_model("llama"), "2:4", 0.5)
    model.save_pretrained(tmp_path / "out", max_shard_size=SHARD)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="auto", max_memory={"cpu": "300KB"},
                                                  offload_folder=tmp_path / "offload")
    assert "disk" in set(loaded.hf_device_map.values())
    with torch.no_grad():
        assert torch.equal(loaded(**sample_inputs("llama")).logits, model(**sample_inputs("llama")).logits)
