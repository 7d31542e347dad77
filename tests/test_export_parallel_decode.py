"""Decoding into a given output, populated zero pages, and the parallel decode of `from_pretrained`
(`hf_prune.export.decoding.ParallelDecoder`): same bits as the in-line decode, errors raised before the model is
returned, and a bound on the peak RSS of a compressed load (slow)."""

import json

import pytest
import torch

from export_utils import mask_weight, prune, run_python, tiny_model
from hf_prune.export import codecs
from hf_prune.export.codecs import CorruptCheckpointError, decode, empty_dense
from hf_prune.export.decoding import ParallelDecoder
from hf_prune.export.formats import encode_best

CASES = [("unstructured", 0.5, (64, 320)), ("2:4", 0.5, (64, 320)), ("2:4", 0.5, (64, 62)),  # (64, 62): N:M along dim 0
         ("block:16x16", 0.5, (64, 320))]


def _encoded(layout, sparsity, shape, dtype=torch.float16):
    torch.manual_seed(0)
    w = torch.randn(shape).to(dtype)
    w = w * mask_weight(w, layout, sparsity) if shape[1] % 4 == 0 else (w.t() * mask_weight(w.t(), layout, sparsity)).t()
    enc = encode_best(w.contiguous(), layout)
    assert enc is not None
    return w, enc


@pytest.mark.parametrize("layout,sparsity,shape", CASES)
@pytest.mark.parametrize("populate", [False, True])
def test_decode_into_out_equals_decode(monkeypatch, layout, sparsity, shape, populate):
    monkeypatch.setattr(codecs, "_POPULATE_BYTES", 1 if populate else 1 << 62)
    w, enc = _encoded(layout, sparsity, shape)
    out = empty_dense(*shape, torch.float16)
    assert not out.any()
    result = decode("w", enc.tensors, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out.view(torch.int16), (w + 0.0).view(torch.int16))
    assert torch.equal(decode("w", enc.tensors).view(torch.int16), out.view(torch.int16))


def test_decode_refuses_an_out_of_the_wrong_shape_or_dtype():
    _, enc = _encoded("unstructured", 0.5, (64, 320))
    with pytest.raises(ValueError, match=r"out must be a contiguous CPU torch.float16 tensor of shape \(64, 320\)"):
        decode("w", enc.tensors, out=torch.zeros(64, 321, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        decode("w", enc.tensors, out=torch.zeros(64, 320, dtype=torch.float32))


def test_parallel_decoder_fills_every_weight_and_raises_a_corrupt_one_at_join():
    decoder = ParallelDecoder(2)
    cases = [_encoded(layout, s, shape) for layout, s, shape in CASES] * 3
    outs = [decoder.submit(f"w{i}", enc.tensors) for i, (_, enc) in enumerate(cases)]
    decoder.join()
    for (w, _), out in zip(cases, outs):
        assert torch.equal(out.view(torch.int16), (w + 0.0).view(torch.int16))
    decoder = ParallelDecoder(2)
    _, enc = _encoded("unstructured", 0.5, (64, 320))
    bad = dict(enc.tensors, **{"": enc.tensors[""][:-1]})  # one value short of what the mask marks
    decoder.submit("layer.w", bad)
    with pytest.raises(CorruptCheckpointError, match="'layer.w'.*bitmask marks"):
        decoder.join()
    with pytest.raises(CorruptCheckpointError, match="meta declares a dense shape"):  # checked before any work
        ParallelDecoder(2).submit("w", dict(enc.tensors, _hf_prune_meta=torch.tensor([0, 320])))


LOAD = r"""
import json, sys, torch
torch.set_num_threads(THREADS)
import hf_prune
from hf_prune.export import decoding
used = []
submit = decoding.ParallelDecoder.submit
decoding.ParallelDecoder.submit = lambda self, *a: used.append(1) or submit(self, *a)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(PATH)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, PATH + f".{THREADS}.safetensors")
print(json.dumps({"parallel": len(used)}))
"""


@pytest.mark.parametrize("layout", ["unstructured", "2:4", "block:16x16"])
def test_from_pretrained_decodes_in_parallel_with_the_same_bits(tmp_path, layout):
    from safetensors.torch import load_file

    model = prune(tiny_model("llama"), layout, 0.5)
    path = tmp_path / "export"
    model.save_pretrained(path)
    counts = {}
    for threads in (1, 2):
        proc = run_python(LOAD.replace("THREADS", str(threads)).replace("PATH", repr(str(path))))
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[threads] = json.loads(proc.stdout.strip().splitlines()[-1])["parallel"]
    assert counts == {1: 0, 2: 14}  # one thread: in line; two: every pruned Linear (2 layers x 7) on the workers
    one, two = (load_file(f"{path}.{t}.safetensors") for t in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key].view(torch.uint8), two[key].view(torch.uint8)), key
    expected = model.state_dict()
    for key in one:
        assert torch.equal(one[key], expected[key].to(one[key].dtype)), key


RSS = r"""
import json, os, sys, torch
import hf_prune
from transformers import AutoModelForCausalLM
def hwm():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
start = hwm()
model = AutoModelForCausalLM.from_pretrained(PATH, dtype=torch.float16)
print(json.dumps({"peak_above_start": hwm() - start,
                  "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout,sparsity", [("unstructured", 0.5), ("2:4", 0.5)])
def test_compressed_load_peak_rss_is_bounded(tmp_path, layout, sparsity):
    """The issue's bound: a compressed load's peak RSS (decoded model, file pages and copies in flight) stays within
    1.3x the fp16 model, on a model big enough (~60 M parameters) that the interpreter's own allocations are noise."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=8192, max_position_embeddings=64)
    model = prune(AutoModelForCausalLM.from_config(config, dtype=torch.float16), layout, sparsity)
    model.save_pretrained(tmp_path / "export")
    proc = run_python(RSS.replace("PATH", repr(str(tmp_path / "export"))), env={"OMP_NUM_THREADS": "2"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model_bytes"] > 100e6
    assert result["peak_above_start"] <= 1.3 * result["model_bytes"], result
