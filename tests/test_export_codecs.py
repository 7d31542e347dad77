"""Unit tests of the tensor codecs: bit-exact round trips, sizes, pattern detection, corruption errors."""

import pytest
import torch

from export_utils import mask_weight
from hf_prune.export.codecs import CorruptCheckpointError, decode, get_codec, pack_bits, unpack_bits
from hf_prune.export.formats import decompress_state_dict, encode_best


def _sparse(shape, layout, sparsity, dtype, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(shape).to(dtype)
    return w * mask_weight(w, layout, sparsity)


def test_pack_bits_round_trip_and_bit_order():
    mask = torch.rand(5, 13) > 0.5
    packed = pack_bits(mask)
    assert packed.shape == (5, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 13), mask)
    one = torch.zeros(1, 8, dtype=torch.bool)
    one[0, 1] = True
    assert pack_bits(one).item() == 2  # LSB first: entry j is bit j % 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "layout,sparsity,codec",
    [("unstructured", 0.5, "bitmask"), ("unstructured", 0.7, "bitmask"), ("2:4", 0.5, "nm"), ("1:4", 0.75, "nm"),
     ("4:8", 0.5, "nm"), ("block:16x16", 0.5, "block"), ("block:4x8", 0.6, "block")],
)
def test_round_trip_is_bit_exact(dtype, layout, sparsity, codec):
    w = _sparse((64, 320), layout, sparsity, dtype)
    enc = encode_best(w, layout)
    assert enc is not None and enc.codec == codec
    out = decode("w", enc.tensors)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out.view(torch.uint8 if dtype != torch.float32 else torch.uint8), (w + 0.0).view(torch.uint8))


def test_values_shape_never_equals_dense_shape():
    for layout in ("unstructured", "2:4", "block:16x16"):
        w = _sparse((64, 64), layout, 0.5, torch.float16)
        enc = encode_best(w, layout)
        assert tuple(enc.tensors[""].shape) != (64, 64)


def test_nm_along_dim0_for_transposed_weights():
    w = _sparse((64, 32), "2:4", 0.5, torch.float16).t().contiguous()  # groups along dim 0, as in GPT-2 Conv1D
    enc = get_codec("nm").encode(w, n=2, m=4)
    assert enc is not None and enc.tensors["_hf_prune_meta"].tolist()[-1] == 0
    assert torch.equal(decode("w", enc.tensors), w)


def test_sizes_within_bounds_and_nm_beats_bitmask():
    dense = 256 * 576 * 2
    ratios = {}
    for layout, sparsity in (("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5)):
        w = _sparse((256, 576), layout, sparsity, torch.bfloat16)
        ratios[(layout, sparsity)] = encode_best(w, layout).nbytes / dense
    bitmask_24 = get_codec("bitmask").encode(_sparse((256, 576), "2:4", 0.5, torch.bfloat16)).nbytes / dense
    assert ratios[("unstructured", 0.5)] <= 0.57
    assert ratios[("unstructured", 0.7)] <= 0.37
    assert ratios[("2:4", 0.5)] <= 0.545 < bitmask_24


def test_groups_with_fewer_than_n_nonzeros_and_pattern_rejection():
    w = _sparse((16, 32), "2:4", 0.5, torch.float16)
    w[0, :8] = 0  # groups with no non-zero at all
    enc = get_codec("nm").encode(w, n=2, m=4)
    assert torch.equal(decode("w", enc.tensors), w)
    w[1, 0:3] = 1.0  # three non-zeros in a group of four: not 2:4 (along either dim)
    w[1:4, 0] = 1.0
    assert get_codec("nm").encode(w, n=2, m=4) is None
    enc = encode_best(w, "2:4")  # falls back to the bitmask
    assert enc.codec == "bitmask" and torch.equal(decode("w", enc.tensors), w)


def test_dense_weight_is_not_compressed():
    w = torch.randn(32, 32).half()
    assert encode_best(w, "unstructured") is None


def test_signed_zero_decodes_as_zero():
    w = torch.tensor([[1.0, -0.0, 0.0, 2.0]] * 8).half()
    out = decode("w", encode_best(w, "unstructured").tensors)
    assert torch.equal(out, w)


def test_corrupted_groups_raise_clear_errors():
    w = _sparse((32, 64), "unstructured", 0.5, torch.float16)
    tensors = encode_best(w, "unstructured").tensors
    bad = dict(tensors, _hf_prune_bitmask=tensors["_hf_prune_bitmask"][:-1])
    with pytest.raises(CorruptCheckpointError, match=r"'q.weight'.*bitmask must be uint8 of shape"):
        decode("q.weight", bad)
    bad = dict(tensors, **{"": tensors[""][:-3]})
    with pytest.raises(CorruptCheckpointError, match="bitmask marks .* values"):
        decode("q.weight", bad)
    bad = {k: v for k, v in tensors.items() if k != ""}
    with pytest.raises(CorruptCheckpointError, match="values tensor is missing"):
        decode("q.weight", bad)
    nm = encode_best(_sparse((32, 64), "2:4", 0.5, torch.float16), "2:4").tensors
    bad = dict(nm, _hf_prune_nm=torch.full_like(nm["_hf_prune_nm"], 255))
    with pytest.raises(CorruptCheckpointError, match="out of range"):
        decode("k.weight", bad)


def test_decompress_state_dict_mixes_dense_and_compressed():
    w = _sparse((32, 64), "block:16x16", 0.5, torch.float16)
    sd = {f"a.weight{k}": v for k, v in encode_best(w, "block:16x16").tensors.items()}
    sd["b.bias"] = torch.ones(3)
    out = decompress_state_dict(sd)
    assert set(out) == {"a.weight", "b.bias"} and torch.equal(out["a.weight"], w)


@pytest.mark.parametrize("layout", ["2:4", "unstructured"])
def test_compress_tensors_on_threads_writes_the_same_bytes_as_one_weight_at_a_time(layout):
    """A save encodes its weights on the codec threads; the tensors, their order and the report are those of encoding
    each weight alone, in the state dict's order."""
    from hf_prune.export.formats import compress_tensors

    gen = torch.Generator().manual_seed(3)
    tensors = {}
    for i, shape in enumerate([(64, 128), (32, 64), (48, 96), (16, 32)]):
        w = torch.randn(*shape, generator=gen).half()
        tensors[f"l{i}.weight"] = w * mask_weight(w, layout, 0.5)
        tensors[f"l{i}.bias"] = torch.randn(shape[0], generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial, serial_report = compress_tensors(tensors, layout)
        torch.set_num_threads(2)
        parallel, parallel_report = compress_tensors(tensors, layout)
    finally:
        torch.set_num_threads(threads)
    assert list(parallel) == list(serial) and len(serial) == 4 + 4 * 3
    for key, tensor in serial.items():
        assert parallel[key].dtype == tensor.dtype and torch.equal(parallel[key], tensor), key
    assert parallel_report.entries == serial_report.entries
    for name, weight in tensors.items():
        if name.endswith(".weight"):
            enc = encode_best(weight, layout)
            assert all(torch.equal(serial[name + suffix], t) for suffix, t in enc.tensors.items())


@pytest.mark.parametrize("layout,step", [("unstructured", 1), ("unstructured", 100), ("2:4", 1), ("2:4", 100)])
def test_scatter_in_row_blocks_is_bit_exact(monkeypatch, layout, step):
    """One thread scatters a weight in blocks of rows of about `_STEP` entries, each block from its own offset into
    the values; any block size gives the same dense weight."""
    from hf_prune.export import codecs

    w = _sparse((37, 48), layout, 0.5, torch.float16, seed=4)
    enc = encode_best(w, layout)
    monkeypatch.setattr(codecs, "_STEP", step)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(decode("w", enc.tensors), w)
    finally:
        torch.set_num_threads(threads)
