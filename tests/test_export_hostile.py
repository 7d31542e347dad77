"""Hostile or malformed checkpoints (issue 27, classes 1-6 and 11): every reader (`from_pretrained`,
`load_compressed_state_dict`, `hf-prune info`) refuses them through the same checks, naming the file and the field or
tensor, before anything big is allocated; a load while another process saves returns one export or says it changed."""

from __future__ import annotations

import ast
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from export_utils import prune, rewrite_with_checksums, tiny_model
from hf_prune.cli import main
from hf_prune.export import CorruptCheckpointError, describe_export, load_compressed_state_dict
from hf_prune.export.info import check_compressed_headers
from hf_prune.export.integrity import CHECKSUM_KEY, EXPORT_ID_META, MANIFEST_NAME, checksum_metadata

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def model():
    return prune(tiny_model("llama"), "block:16x16", 0.75)


def _save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def _refused_everywhere(out: Path, message: str, *, loader: bool | str = True) -> None:
    """`load_compressed_state_dict` and `info` refuse with `message`; so does `from_pretrained` (`loader`; a string:
    transformers refuses it first, with an error matching that string)."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(CorruptCheckpointError, match=message) as err:
        load_compressed_state_dict(out)
    assert len(str(err.value)) < 1500
    desc = describe_export(out)
    assert desc["verified"] is False and re.search(message, desc["errors"][0]), desc["errors"]
    if isinstance(loader, str):
        with pytest.raises(ValueError, match=loader):
            AutoModelForCausalLM.from_pretrained(out)
    elif loader:
        with pytest.raises(CorruptCheckpointError, match=message):
            AutoModelForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------------------------- 1. containment
@pytest.mark.parametrize("entry, why", [
    ("/etc/passwd", "is an absolute path"),
    ("../../../../etc/passwd", r"leaves the directory \('..'\)"),
    ("/dev/zero", "is an absolute path"),
    (".", "is not a regular file"),
    ("sub", "is not a regular file"),
    (["model-00001-of-00002.safetensors"], r"is not a file name \(a list\)"),
    (7, r"is not a file name \(a int\)"),
    ("link.safetensors", r"resolves outside it"),
    ("../outside/x.safetensors", r"leaves the directory"),
])
def test_index_entries_outside_the_directory_are_refused_by_every_reader(model, tmp_path, entry, why):
    out = _save(model, tmp_path / "out", max_shard_size="150KB")
    index = json.loads((out / INDEX).read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (out / "sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes((out / victim).read_bytes())  # a valid shard, outside
    (out / "link.safetensors").symlink_to(outside / "x.safetensors")
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == victim)
    index["weight_map"][key] = entry
    (out / INDEX).write_text(json.dumps(index))
    message = rf"{INDEX} names the file {re.escape(repr(entry))} \(for '{re.escape(key)}'\), which {why}"
    _refused_everywhere(out, message)


def test_a_valid_export_loads_from_a_hub_like_snapshot_of_symlinks(model, tmp_path):
    """Symlinks are refused only when they leave the directory (the Hub cache's snapshots -> blobs is allowed)."""
    out = _save(model, tmp_path / "out")
    snapshot = tmp_path / "models--me--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--me--x" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for path in out.iterdir():
        (blobs / path.name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
    dense = load_compressed_state_dict(snapshot)
    assert torch.equal(dense["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"])


# ----------------------------------------------------------------------------- 2-4. groups and bounds
BLOCK = "model.layers.0.mlp.down_proj.weight"  # dense [128, 256], block codec in this export


def _replace_group(out: Path, base: str, group: dict) -> Path:
    path = out / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(base)}
    tensors.update({base + suffix: t for suffix, t in group.items()})
    rewrite_with_checksums(path, tensors)  # a consistent but hostile file: only the structural checks can refuse it
    return path


@pytest.mark.parametrize("group, message", [
    ({"": torch.zeros(0, 2**14, 2**14, dtype=torch.float16), "_hf_prune_blockmask": torch.zeros(1, 1, dtype=torch.uint8),
      "_hf_prune_meta": torch.tensor([2**14] * 4)},
     r"meta declares the dense shape \[16384, 16384\], the model's config declares \[128, 256\]"),
    ({"": torch.zeros(0, 2**20, 2**20, dtype=torch.float16), "_hf_prune_blockmask": torch.zeros(1, 1, dtype=torch.uint8),
      "_hf_prune_meta": torch.tensor([2**20] * 4)},
     r"meta declares the dense shape \[1048576, 1048576\]"),
    ({"": torch.zeros(0, dtype=torch.float16), "_hf_prune_bitmask": torch.zeros(0, 2**59, dtype=torch.uint8),
      "_hf_prune_meta": torch.tensor([0, 2**62])},
     r"meta declares a dense shape \[0, 4611686018427387904\]; each dimension must be in \[1, 2147483647\]"),
])
def test_decompression_bombs_are_refused_before_allocating(model, tmp_path, group, message):
    out = _save(model, tmp_path / "out")
    path = _replace_group(out, BLOCK, group)
    _refused_everywhere(out, rf"model.safetensors: corrupted compressed weight '{BLOCK}': {message}")
    # without a model config (a single file read alone), the bytes stored bound the decoded size
    with pytest.raises(CorruptCheckpointError, match=r"more than any compressed weight decodes to|each dimension"):
        check_compressed_headers([path])


@pytest.mark.parametrize("meta, message", [
    (torch.tensor([128, 256, 16, 16, 7]), None),  # replaced below by an N:M group with dim=7
    (torch.tensor([128.0, 256.0, 16.0, 16.0], dtype=torch.float64), r"_hf_prune_meta must be a 1-D I64 tensor .*got F64 \[4\]"),
    (torch.tensor([128, 256, 16, 16], dtype=torch.int32), r"_hf_prune_meta must be a 1-D I64 tensor .*got I32 \[4\]"),
    (torch.zeros(10**7, dtype=torch.int64), r"_hf_prune_meta must be a 1-D I64 tensor of at most 8 entries, got I64 \[10000000\]"),
    (torch.tensor([[128, 256, 16, 16]]), r"_hf_prune_meta must be a 1-D I64 tensor .*got I64 \[1, 4\]"),
])
def test_codec_meta_is_checked_fully_before_loading(model, tmp_path, meta, message):
    out = _save(model, tmp_path / "out")
    tensors = load_file(out / "model.safetensors")
    group = {s: tensors[BLOCK + s] for s in ("", "_hf_prune_blockmask")}
    if message is None:  # an N:M meta with dim=7
        group = {"": torch.zeros(128, 128, dtype=torch.float16), "_hf_prune_nm": torch.zeros(128, 22, dtype=torch.uint8),
                 "_hf_prune_meta": torch.tensor([128, 256, 2, 4, 7])}
        message = r"invalid N:M parameters N=2 M=4 dim=7"
    else:
        group["_hf_prune_meta"] = meta
    _replace_group(out, BLOCK, group)
    _refused_everywhere(out, rf"model.safetensors: corrupted compressed weight '{BLOCK}': {message}")


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


@pytest.mark.parametrize("header, message", [
    (b'{"a": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", r"safetensors header is nested 200001 levels deep"),
    (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": ["0", "4"]}}', r"data_offsets \['0', '4'\]"),
    (b'{"a": {"dtype": "F16", "shape": "2", "data_offsets": [0, 4]}}', r"has shape '2'"),
    (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "__metadata__": {"x": 1}}',
     r"__metadata__ must map strings to strings"),
    (b'{"a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}, "b": {"dtype": "F16", "shape": [2], '
     b'"data_offsets": [2, 6]}}', r"overlapping or gapped"),
])
def test_malformed_safetensors_headers_are_named_without_recursion(model, tmp_path, header, message):
    out = _save(model, tmp_path / "out")
    _raw_safetensors(out / "model.safetensors", header, b"\0" * 8)
    _refused_everywhere(out, rf"model.safetensors.*{message}", loader=False)


def test_deep_config_json_is_a_clear_error(model, tmp_path, capsys):
    out = _save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}"
    (out / "config.json").write_text(text)
    with pytest.raises(CorruptCheckpointError, match=r"config.json: JSON is nested 200001 levels deep"):
        load_compressed_state_dict(out)
    assert main(["info", str(out)]) == 2
    assert "nested 200001 levels deep" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- 5. the schema
@pytest.mark.parametrize("edit, field, loader", [
    (lambda qc: qc.update(format=3), r"quantization_config.format must be a string, got 3", True),
    (lambda qc: qc.update(layout=["2:4"]), r"quantization_config.layout must be a string", True),
    (lambda qc: qc.update(format_config=[1]), r"quantization_config.format_config must be a JSON object", True),
    (lambda qc: qc.update(pruning=5), r"quantization_config.pruning must be a JSON object or null, got 5", True),
    (lambda qc: qc["pruning"].update(config="magnitude"), r"quantization_config.pruning.config must be a JSON object", True),
    (lambda qc: qc["pruning"].update(module_sparsity=[0.5]), r"pruning.module_sparsity must be a JSON object", True),
    (lambda qc: qc["pruning"]["module_sparsity"].update({"model.layers.0.mlp.up_proj": "half"}),
     r"pruning.module_sparsity\['model.layers.0.mlp.up_proj'\] must be a number in \[0, 1\], got 'half'", True),
    (lambda qc: qc["pruning"].update(metrics="fast"), r"quantization_config.pruning.metrics must be a JSON object", True),
    (lambda qc: qc["pruning"]["metrics"].update(perplexity_after="low"),
     r"pruning.metrics\['perplexity_after'\] must be a number", True),
    (lambda qc: qc["pruning"].update(base_model=["x"]), r"quantization_config.pruning.base_model must be a string", True),
    (lambda qc: qc.update(export_id=12), r"quantization_config.export_id must be 32 lowercase hex digits", True),
])
def test_wrong_json_types_in_quantization_config_name_file_and_field(model, tmp_path, capsys, edit, field, loader):
    from transformers import AutoModelForCausalLM

    out = _save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))
    message = rf"config.json: quantization_config.{field.removeprefix('quantization_config.')}"
    with pytest.raises(CorruptCheckpointError, match=message):
        load_compressed_state_dict(out)
    desc = describe_export(out)
    assert desc["verified"] is False and re.search(message, desc["errors"][0])
    assert main(["info", str(out)]) == 1 and re.search(message, capsys.readouterr().out)
    if loader:
        with pytest.raises(ValueError, match=field):
            AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("value", ["hf_prune", ["hf_prune"], 3])
def test_quantization_config_of_the_wrong_type_is_named(model, tmp_path, value):
    out = _save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = value
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptCheckpointError, match=r"config.json: quantization_config must be a JSON object"):
        load_compressed_state_dict(out)


# ----------------------------------------------------------------------------------- 6. the manifest
def test_a_deleted_shard_with_its_index_entries_is_named(model, tmp_path):
    out = _save(model, tmp_path / "out", max_shard_size="60KB")
    index = json.loads((out / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4
    victim = shards[2]
    lost = sorted(k for k, v in index["weight_map"].items() if v == victim)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != victim}
    (out / INDEX).write_text(json.dumps(index))
    (out / victim).unlink()
    message = rf"\S*{MANIFEST_NAME} lists file\(s\) that are not part of the checkpoint read: {victim}, holding " \
              rf"{len(lost)} tensor\(s\): {re.escape(lost[0])}"
    _refused_everywhere(out, message)


def test_a_deleted_compressed_group_with_its_checksums_is_named(model, tmp_path):
    out = _save(model, tmp_path / "out")
    path = out / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {k: v for k, v in load_file(path).items() if not k.startswith(BLOCK)}
    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})  # checksums agree, manifest not
    _refused_everywhere(out, rf"model.safetensors lacks tensor\(s\) that \S*{MANIFEST_NAME} lists: {re.escape(BLOCK)}, ")


def test_version_2_without_manifest_or_export_id_still_loads(model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _save(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    del config["quantization_config"]["export_id"]
    (out / "config.json").write_text(json.dumps(config))
    (out / MANIFEST_NAME).unlink()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != EXPORT_ID_META}
    save_file(load_file(out / "model.safetensors"), str(out / "model.safetensors"), metadata=metadata)
    assert CHECKSUM_KEY in metadata
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    assert describe_export(out)["verified"] is True


# ------------------------------------------------------------------------ 11. loading while another saves
_SAVER = """
import sys, time, torch
from pathlib import Path
from export_utils import prune, tiny_model
out, stop = Path(sys.argv[1]), time.monotonic() + float(sys.argv[2])
models = [prune(tiny_model("llama", seed=s), "unstructured", 0.5) for s in (1, 2)]
i = 0
while time.monotonic() < stop:
    models[i % 2].save_pretrained(out, overwrite=True, max_shard_size="60KB")
    i += 1
Path(sys.argv[3]).write_text(str(i))
"""

_LOADER = """
import sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from hf_prune.export import load_compressed_state_dict
from hf_prune.export.integrity import ExportChangedError
import transformers; transformers.logging.set_verbosity_error()
out, done = Path(sys.argv[1]), Path(sys.argv[3])
refs = [load_file(sys.argv[4]), load_file(sys.argv[5])]
counts = {"a": 0, "b": 0, "changed": 0}
n = 0
while not done.exists():
    try:
        if n % 2:
            sd = {k: v for k, v in AutoModelForCausalLM.from_pretrained(out).state_dict().items() if k in refs[0]}
        else:
            sd = load_compressed_state_dict(out)
    except ExportChangedError:
        counts["changed"] += 1
    except Exception as err:
        print("OTHER", type(err).__name__, str(err)[:300]); sys.exit(1)
    else:
        match = [all(k in sd and torch.equal(sd[k], r[k]) for k in r) for r in refs]
        if not any(match):
            print("MIXED"); sys.exit(1)
        counts["a" if match[0] else "b"] += 1
    n += 1
print("COUNTS", counts)
"""


def test_a_load_during_overwrites_returns_one_export_or_says_it_changed(tmp_path):
    """Several rounds of a saver overwriting a sharded export while a loader loads it (bounded: 8 s of saving)."""
    import subprocess

    from export_utils import REPO_ROOT, TESTS_DIR

    refs = []
    for seed in (1, 2):  # what each export holds, as load_compressed_state_dict returns it
        m = prune(tiny_model("llama", seed=seed), "unstructured", 0.5)
        m.save_pretrained(tmp_path / f"ref{seed}")
        refs.append(tmp_path / f"ref{seed}.safetensors")
        save_file(load_compressed_state_dict(tmp_path / f"ref{seed}"), str(refs[-1]))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(load_file(refs[0])[key], load_file(refs[1])[key])  # a mix would be told apart
    out, done = tmp_path / "out", tmp_path / "done"
    prune(tiny_model("llama", seed=1), "unstructured", 0.5).save_pretrained(out, max_shard_size="60KB")
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{TESTS_DIR}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(out), "8", str(done)], env=env, cwd=str(REPO_ROOT))
    loader = subprocess.run([sys.executable, "-c", _LOADER, str(out), "0", str(done), str(refs[0]), str(refs[1])],
                            env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=120)
    assert saver.wait(timeout=60) == 0
    assert loader.returncode == 0, loader.stdout[-2000:] + loader.stderr[-2000:]
    counts = ast.literal_eval(loader.stdout.split("COUNTS", 1)[1].strip())
    print("saves", done.read_text(), "loads", counts)
    assert int(done.read_text()) >= 4, "the saver overwrote the export too few times to test anything"
    assert counts["a"] + counts["b"] + counts["changed"] >= 4, counts
    assert counts["a"] + counts["b"] >= 1, counts
