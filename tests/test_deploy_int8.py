"""int8 exports that are right on every CPU: no u8 x s8 product can saturate, whatever the machine that runs them.

ONNX Runtime multiplies uint8 activations by int8 weights on x86 CPUs without VNNI with VPMADDUBSW, which adds two
products into a saturating int16. These tests build a model whose activations and weights overflow that int16 with
8-bit weights (checked by emulating the instruction on the real quantized activations), then check the exported
int8 graph: its weights bound every pair below 2**15, and it agrees with PyTorch on this CPU. The emulation makes
the test mean the same on a VNNI machine (where the default would pass by luck) and on an AVX2 one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_prune.deploy import export_onnx
from hf_prune.deploy.quantize import resolve_scheme

from conftest import tiny_llama

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

INT16_MAX = 2**15 - 1


def _saturating_llama() -> torch.nn.Module:
    """A tiny LLaMA whose linear inputs are all positive and spread over [0, max] (so their uint8 codes reach 255)
    and whose weight rows have every entry near the row's largest magnitude (so 8-bit codes sit near +-127):
    adjacent u8 x s8 pairs of the same sign then sum past 32,767. Varied enough that the argmax moves between
    tokens, so agreement is a real check."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.rand(p.shape, generator=g))  # positive: RMSNorm keeps the sign, the inputs stay >= 0
            elif p.dim() == 2:
                sign = torch.randint(0, 2, p.shape, generator=g) * 2 - 1
                p.copy_(sign * (0.8 + 0.2 * torch.rand(p.shape, generator=g)) * 0.05)
    return model


def _dynamic_u8(x: np.ndarray) -> np.ndarray:
    """ONNX `DynamicQuantizeLinear`: the uint8 codes (zero point included) MatMulInteger multiplies."""
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    scale = (hi - lo) / 255
    zero_point = np.clip(np.round(-lo / scale), 0, 255)
    return np.clip(np.round(x / scale) + zero_point, 0, 255)


def _s8_per_channel(w: np.ndarray, qmax: int) -> np.ndarray:
    """Symmetric per-output-channel int8 codes of a `[out, in]` weight with the largest code `qmax`."""
    return np.round(w / (np.abs(w).max(axis=1, keepdims=True) / qmax))


def _largest_pair(u8: np.ndarray, s8: np.ndarray) -> int:
    """The largest |a[k] w[k] + a[k+1] w[k+1]| over adjacent input pairs: what VPMADDUBSW packs into an int16."""
    prod = u8[:, None, :] * s8[None, :, :]  # [tokens, out, in]
    return int(np.abs(prod[..., 0::2] + prod[..., 1::2]).max())


def _q_proj_input(model, ids: torch.Tensor) -> np.ndarray:
    seen = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).numpy()


def _weight_codes(path, op_type: str) -> list[np.ndarray]:
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    return [numpy_helper.to_array(inits[n.input[1]]) for n in graph.node if n.op_type == op_type and n.input[1] in inits]


def test_dynamic_int8_cannot_saturate_where_the_default_would(tmp_path):
    model = _saturating_llama()
    ids = torch.randint(0, model.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(1))
    a = _dynamic_u8(_q_proj_input(model, ids))
    w = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert a.max() == 255 and a.min() == 0  # positive inputs: zero point 0, codes over the whole range
    # the default (8-bit weights) would overflow the int16 of AVX2's u8 x s8 kernel, by far ...
    assert _largest_pair(a, _s8_per_channel(w, 127)) > 1.5 * INT16_MAX

    report = export_onnx(model, tmp_path / "int8", task="text-generation", int8=True, int8_scheme="dynamic")
    codes = _weight_codes(tmp_path / "int8" / "model_quantized.onnx", "MatMulInteger")
    assert len(codes) == 2 * 7 + 1 and all(c.dtype == np.int8 for c in codes)  # every Linear and the LM head
    # ... while the exported 7-bit weights bound every pair of every MatMulInteger below it, on any input
    largest = max(int(np.abs(c.astype(np.int32)).max()) for c in codes)
    assert largest == 64 and 2 * 255 * largest <= INT16_MAX
    assert report.int8_scheme == "dynamic" and report.int8["argmax_agreement"] >= 0.9
    card = (tmp_path / "int8" / "README.md").read_text()
    assert "reduce_range=True" in card and "without VNNI" in card and "verified in ONNX Runtime" in card


def test_decoders_get_weight_only_blockwise_int8(tmp_path):
    model = _saturating_llama()
    report = export_onnx(model, tmp_path / "int8", task="text-generation", int8=True)
    path = tmp_path / "int8" / "model_quantized.onnx"
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert report.int8_scheme == "blockwise"
    assert ops.count("MatMulNBits") == 2 * 7 + 1 and "MatMulInteger" not in ops and "DynamicQuantizeLinear" not in ops
    bits = {a.i for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"}
    assert bits == {8}
    assert report.int8["argmax_agreement"] >= 0.9
    assert "MatMulNBitsQuantizer" in (tmp_path / "int8" / "README.md").read_text()


@pytest.mark.parametrize("decoder,expected", [(True, "blockwise"), (False, "dynamic")])
def test_auto_scheme_follows_the_task(decoder, expected):
    assert resolve_scheme("auto", decoder) == expected
    assert resolve_scheme("dynamic", decoder) == "dynamic"


def test_unknown_scheme_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"int8_scheme must be one of auto, dynamic, blockwise; got 'int4'"):
        export_onnx(tiny_llama(), tmp_path / "out", int8=True, int8_scheme="int4")
    assert not (tmp_path / "out").exists()
