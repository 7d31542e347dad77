"""Format version 2: per-tensor checksums catch corruption that keeps the structure, in every codec and in dense
tensors; the loader, `load_compressed_state_dict` and `hf-prune info` agree; version 1 is still read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from export_utils import prune, run_python, tiny_model
from hf_prune.cli import main
from hf_prune.export import CorruptCheckpointError, describe_export, load_compressed_state_dict
from hf_prune.export.info import read_safetensors_header
from hf_prune.export.integrity import CHECKSUM_KEY, verify_checksums
from hf_prune.export.quantizer import FORMAT_VERSION


def _export(tmp_path, layout: str, name: str = "out") -> Path:
    sparsity = 0.75 if layout.startswith("block") else 0.5
    model = prune(tiny_model("llama"), layout, sparsity)
    out = tmp_path / name
    model.save_pretrained(out)
    return out


def _edit_bytes(path: Path, key: str, edit) -> None:
    """Changes the stored bytes of tensor `key` in place (header untouched), as bit rot would."""
    header, start = read_safetensors_header(path)
    begin, end = header[key]["data_offsets"]
    raw = bytearray(path.read_bytes())
    chunk = bytearray(raw[start + begin : start + end])
    edit(chunk)
    raw[start + begin : start + end] = chunk
    path.write_bytes(bytes(raw))


def _swap_two_bits(chunk: bytearray) -> None:
    """Moves one set bit to an unset position of the same byte: the popcount, so every shape check, is unchanged."""
    for i, byte in enumerate(chunk):
        if 0 < byte < 255:
            low_set = next(b for b in range(8) if byte >> b & 1)
            unset = next(b for b in range(8) if not byte >> b & 1)
            chunk[i] = byte & ~(1 << low_set) | (1 << unset)
            return
    raise AssertionError("no byte with both a set and an unset bit")


def _next_nm_rank(chunk: bytearray) -> None:
    """2:4 packs 3 groups per byte in base 6 (values < 216): another valid combination for the first group."""
    chunk[0] = (chunk[0] // 6) * 6 + (chunk[0] % 6 + 1) % 6


def _flip_low_bit(chunk: bytearray) -> None:
    chunk[0] ^= 1


CORRUPTIONS = [
    ("unstructured", "model.layers.0.mlp.up_proj.weight_hf_prune_bitmask", _swap_two_bits),
    ("2:4", "model.layers.1.self_attn.q_proj.weight_hf_prune_nm", _next_nm_rank),
    ("block:16x16", "model.layers.0.mlp.down_proj.weight_hf_prune_blockmask", _swap_two_bits),
    ("unstructured", "model.layers.1.mlp.gate_proj.weight", _flip_low_bit),  # kept values
    ("2:4", "model.layers.0.input_layernorm.weight", _flip_low_bit),  # a dense tensor
    ("2:4", "model.embed_tokens.weight", _flip_low_bit),
]


@pytest.mark.parametrize("layout, key, edit", CORRUPTIONS, ids=[c[1].rsplit(".", 1)[-1] + "-" + c[0] for c in CORRUPTIONS])
def test_corruption_that_keeps_the_structure_is_refused_everywhere(tmp_path, capsys, layout, key, edit):
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, layout)
    weights = out / "model.safetensors"
    _edit_bytes(weights, key, edit)
    message = rf"model.safetensors is corrupted: the bytes of 1 tensor\(s\) do not match their xxh3_64 checksums: {key}"
    with pytest.raises(CorruptCheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(CorruptCheckpointError, match=message):
        load_compressed_state_dict(out)
    desc = describe_export(out)
    assert desc["verified"] is False and key in desc["errors"][0]
    assert main(["info", str(out)]) == 1
    assert "Files verified: NO" in capsys.readouterr().out


def test_clean_export_verifies_every_tensor(tmp_path, capsys):
    out = _export(tmp_path, "2:4")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        recorded = json.loads(f.metadata()[CHECKSUM_KEY])
    assert set(recorded) == keys and len(keys) > 20
    assert set(verify_checksums([out / "model.safetensors"], required=True)) == keys
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format_version"] == FORMAT_VERSION == 3
    assert main(["info", str(out)]) == 0
    assert f"Files verified: yes ({len(keys)} tensor checksums match)" in capsys.readouterr().out


def _as_version_1(out: Path) -> None:
    """What hf_prune 0.1 wrote: no checksums in the metadata, format_version 1."""
    tensors = load_file(out / "model.safetensors")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(config))


def test_version_1_still_loads_and_info_says_structure_only(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, "unstructured")
    expected = AutoModelForCausalLM.from_pretrained(out).state_dict()
    _as_version_1(out)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    assert main(["info", str(out)]) == 0
    assert "Files verified: yes (structure only: this checkpoint has no checksums)" in capsys.readouterr().out
    # and a re-save writes the current version with checksums
    loaded.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]["format_version"] == 3
    verify_checksums([tmp_path / "resaved" / "model.safetensors"], required=True)


def test_version_2_without_checksums_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, "unstructured")
    save_file(load_file(out / "model.safetensors"), out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match=r"has no 'hf_prune_checksums' in its metadata, which format version >= 2"):
        AutoModelForCausalLM.from_pretrained(out)
    assert describe_export(out)["verified"] is False


@pytest.mark.parametrize("version, message", [
    (99, r"uses hf_prune export format version 99; this hf_prune .* reads versions <= 3"),
    (0, r"format_version must be an integer 1..3, got 0"),
    ("2", r"format_version must be an integer 1..3, got '2'"),
    (True, r"format_version must be an integer 1..3, got True"),
])
def test_info_refuses_exactly_what_the_loader_refuses(tmp_path, capsys, version, message):
    from transformers import AutoModelForCausalLM

    out = _export(tmp_path, "unstructured")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(out)
    for verify in (True, False):
        desc = describe_export(out, verify=verify)
        assert desc["verified"] is False and any(__import__("re").search(message, e) for e in desc["errors"])
    assert main(["info", str(out)]) == 1 and main(["info", str(out), "--no-verify"]) == 1
    capsys.readouterr()


def test_unknown_format_refused_by_info_too(tmp_path):
    out = _export(tmp_path, "unstructured")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format"] = "from_a_plugin"
    (out / "config.json").write_text(json.dumps(config))
    desc = describe_export(out)
    assert desc["verified"] is False and "Unknown hf_prune export format 'from_a_plugin'" in desc["errors"][0]


def test_corrupt_config_json_is_named_with_its_line(tmp_path, capsys):
    out = _export(tmp_path, "unstructured")
    (out / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n  oops\n}')
    assert main(["info", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.json is not valid JSON (line 3, column 3" in err and str(out) in err


def _rewrite_keeping_checksums(path: Path, change) -> None:
    """Rewrites the file with its tensors changed by `change(tensors)` and the old metadata (checksums) kept."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=metadata)


def test_a_tensor_lost_from_the_files_is_named(tmp_path):
    path = _export(tmp_path, "unstructured") / "model.safetensors"
    _rewrite_keeping_checksums(path, lambda tensors: tensors.pop("model.norm.weight"))  # the checksums still list it
    with pytest.raises(CorruptCheckpointError, match=r"listed in the checksums are in none of the files: model.norm.weight"):
        verify_checksums([path], required=True)


def test_a_tensor_added_without_checksum_is_named(tmp_path):
    path = _export(tmp_path, "unstructured") / "model.safetensors"
    _rewrite_keeping_checksums(path, lambda tensors: tensors.update({"extra.weight": torch.zeros(3)}))
    with pytest.raises(CorruptCheckpointError, match=r"holds tensor\(s\) with no checksum: extra.weight"):
        verify_checksums([path], required=True)


def test_fresh_process_loads_a_verified_export(tmp_path):
    """Verification in a fresh process, as a user loads it (nothing shared with the saving process)."""
    out = _export(tmp_path, "2:4")
    proc = run_python(f"""
import hf_prune
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r})
w = m.model.layers[0].mlp.up_proj.weight
print("NM_OK", bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all()))
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NM_OK True" in proc.stdout
