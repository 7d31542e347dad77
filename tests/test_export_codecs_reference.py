"""The vectorised codecs against a verbatim copy of the torch codecs they replaced (hf_prune 0.x, before issue 16):
same files written (encode) and the same tensors read (decode), bit for bit, on every codec, dtype and odd shapes."""

import itertools

import pytest
import torch

from hf_prune.export.codecs import (
    META_SUFFIX,
    CorruptCheckpointError,
    decode,
    get_codec,
)
from hf_prune.export.formats import encode_best

# ------------------------------------------------------------------ reference: the previous implementation, verbatim
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def ref_pack_bits(mask):
    rows, n = mask.shape
    padded = torch.zeros(rows, -(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :n] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def ref_unpack_bits(packed, n):
    rows = packed.shape[0]
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.view(rows, -1)[:, :n]


def ref_combinations(n, m):
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).view(-1, n)


def ref_nm_storage(n_combos):
    options = []
    for dtype, bits in ((torch.uint8, 8), (torch.int32, 31)):
        per = 0
        while n_combos ** (per + 1) <= 2**bits:
            per += 1
        if per:
            options.append(((32 if dtype == torch.int32 else 8) / per, dtype, per))
    _, dtype, per = min(options, key=lambda o: o[0])
    return dtype, per


def ref_bitmask_encode(weight):
    mask = weight != 0
    return {"": weight[mask], "_hf_prune_bitmask": ref_pack_bits(mask), META_SUFFIX: torch.tensor([*weight.shape])}


def ref_bitmask_decode(values, index, meta):
    rows, cols = meta
    mask = ref_unpack_bits(index, cols)
    out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def ref_nm_encode_dim(weight, n, m, dim):
    w = weight if dim == 1 else weight.t()
    rows, cols = w.shape
    if not 0 < n < m <= 16 or cols % m:
        return None
    groups = w.reshape(rows, cols // m, m)
    nonzero = groups != 0
    if int(nonzero.sum(-1).max()) > n:
        return None
    pos = torch.arange(m, device=w.device)
    key = nonzero.to(torch.int64) * m + (m - 1 - pos)
    kept = key.topk(n, dim=-1).indices.sort(dim=-1).values
    values = groups.gather(-1, kept).reshape(rows, -1)
    combos = ref_combinations(n, m)
    lut = torch.full((1 << m,), -1, dtype=torch.int64)
    lut[(1 << combos).sum(-1)] = torch.arange(len(combos))
    rank = lut.to(w.device)[(1 << kept).sum(-1)]
    dtype, per = ref_nm_storage(len(combos))
    r, g = rank.shape
    padded = torch.zeros(r, -(-g // per) * per, dtype=torch.int64, device=rank.device)
    padded[:, :g] = rank
    radix = len(combos) ** torch.arange(per, dtype=torch.int64, device=rank.device)
    index = (padded.view(r, -1, per) * radix).sum(-1).to(dtype)
    return {"": values.contiguous(), "_hf_prune_nm": index, META_SUFFIX: torch.tensor([*weight.shape, n, m, dim])}


def ref_nm_decode(values, index, meta):
    rows, cols, n, m, dim = meta
    r, c = (rows, cols) if dim == 1 else (cols, rows)
    g = c // m
    combos = ref_combinations(n, m).to(values.device)
    _, per = ref_nm_storage(len(combos))
    radix = len(combos) ** torch.arange(per, dtype=torch.int64, device=index.device)
    rank = (index.to(torch.int64).unsqueeze(-1) // radix) % len(combos)
    rank = rank.view(r, -1)[:, :g]
    out = torch.zeros(r, g, m, dtype=values.dtype, device=values.device)
    out.scatter_(-1, combos[rank], values.view(r, g, n))
    out = out.view(r, c)
    return out if dim == 1 else out.t().contiguous()


def ref_block_encode(weight, br, bc):
    rows, cols = weight.shape
    if rows % br or cols % bc:
        return None
    tiles = weight.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)
    keep = (tiles != 0).any(-1).any(-1)
    return {"": tiles[keep].contiguous(), "_hf_prune_blockmask": ref_pack_bits(keep),
            META_SUFFIX: torch.tensor([rows, cols, br, bc])}


def ref_block_decode(values, index, meta):
    rows, cols, br, bc = meta
    gr, gc = rows // br, cols // bc
    keep = ref_unpack_bits(index, gc)
    tiles = torch.zeros(gr, gc, br, bc, dtype=values.dtype, device=values.device)
    tiles[keep] = values
    return tiles.permute(0, 2, 1, 3).reshape(rows, cols)


REF_DECODE = {"_hf_prune_bitmask": ref_bitmask_decode, "_hf_prune_nm": ref_nm_decode,
              "_hf_prune_blockmask": ref_block_decode}


def ref_decode(group):
    suffix = next(k for k in group if k not in ("", META_SUFFIX))
    return REF_DECODE[suffix](group[""], group[suffix], group[META_SUFFIX].tolist())


# ------------------------------------------------------------------------------------------------------- helpers
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _raw(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
    assert torch.equal(_raw(a), _raw(b))


def assert_same_group(new, ref):
    assert set(new) == set(ref)
    for key in ref:
        if key == META_SUFFIX:
            assert new[key].tolist() == ref[key].tolist()
        else:
            assert_same_bits(new[key], ref[key])


def _weight(shape, dtype, density, seed, specials=True):
    """Random weight with exact zeros, signed zeros and (optionally) NaN / inf among the kept values."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    w[torch.rand(shape, generator=gen) >= density] = 0.0
    if specials and w.numel() >= 4:
        flat = w.view(-1)
        flat[0], flat[-1] = -0.0, float("nan")
        flat[w.numel() // 2] = float("-inf")
    return w


def _nm_weight(shape, n, m, dtype, seed, dim=1):
    """Random weight with at most N non-zeros in every group of M along `dim`; some groups have fewer, some none."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = shape if dim == 1 else shape[::-1]
    w = torch.randn(rows, cols // m, m, generator=gen, dtype=torch.float64).to(dtype)
    keep = torch.rand(rows, cols // m, m, generator=gen).argsort(-1) < torch.randint(0, n + 1, (rows, cols // m, 1), generator=gen)
    w = (w * keep).reshape(rows, cols)
    w[w == 0] = torch.where(torch.rand(int((w == 0).sum()), generator=gen) < 0.3, -0.0, 0.0).to(dtype)
    return w if dim == 1 else w.t().contiguous()


# ------------------------------------------------------------------------------------------------------- tests
BITMASK_SHAPES = [(1, 1), (1, 13), (1, 64), (7, 9), (13, 5), (3, 8), (17, 31), (64, 320), (2, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", BITMASK_SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_bitmask_matches_the_previous_codec(shape, dtype, density):
    w = _weight(shape, dtype, density, seed=hash((shape, density)) % 1000)
    new = get_codec("bitmask").encode(w).tensors
    ref = ref_bitmask_encode(w)
    assert_same_group(new, ref)
    assert_same_bits(decode("w", new), ref_decode(ref))


NM_CASES = [(2, 4), (1, 4), (4, 8), (2, 3), (1, 2), (2, 5), (3, 6), (3, 7), (5, 10), (4, 12), (8, 16), (1, 16)]


@pytest.mark.parametrize("n,m", NM_CASES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("dim", [1, 0])
def test_nm_matches_the_previous_codec(n, m, rows, dim):
    groups = 7  # a group count that leaves the last stored index element part-empty for every packing
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        shape = (rows, groups * m) if dim == 1 else (groups * m, rows)
        w = _nm_weight(shape, n, m, dtype, seed=n * 100 + m + rows, dim=dim)
        new = get_codec("nm").encode(w, n=n, m=m)
        ref = next(e for e in (ref_nm_encode_dim(w, n, m, d) for d in (1, 0)) if e is not None)
        assert new is not None
        assert_same_group(new.tensors, ref)
        assert_same_bits(decode("w", new.tensors), ref_decode(ref))
        assert torch.equal(decode("w", new.tensors), w)  # -0.0 == 0.0: the signed-zero rule


@pytest.mark.parametrize("n,m", NM_CASES)
def test_nm_decodes_any_in_range_index_like_the_previous_codec(n, m):
    """Every stored index value in range (not only what the encoder writes) decodes identically."""
    rows, groups = 5, 11
    dtype, per = ref_nm_storage(len(ref_combinations(n, m)))
    hi = len(ref_combinations(n, m)) ** per
    gen = torch.Generator().manual_seed(m)
    index = torch.randint(0, min(hi, 2**31 - 1), (rows, -(-groups // per)), generator=gen).to(dtype)
    values = torch.randn(rows, groups * n, generator=gen).half()
    group = {"": values, "_hf_prune_nm": index, META_SUFFIX: torch.tensor([rows, groups * m, n, m, 1])}
    assert_same_bits(decode("w", group), ref_decode(group))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block", [((16, 32), (16, 16)), ((6, 10), (3, 5)), ((1, 8), (1, 1)), ((9, 27), (3, 3)),
                                         ((8, 72), (4, 8)), ((5, 7), (5, 7))])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.5])
def test_block_matches_the_previous_codec(shape, block, dtype, density):
    gen = torch.Generator().manual_seed(shape[0] * 31 + shape[1])
    br, bc = block
    keep = (torch.rand(shape[0] // br, shape[1] // bc, generator=gen) < density)
    keep = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)
    w = _weight(shape, dtype, 0.8, seed=shape[1], specials=False) * keep
    new = get_codec("block").encode(w, block=block)
    ref = ref_block_encode(w, br, bc)
    assert_same_group(new.tensors, ref)
    assert_same_bits(decode("w", new.tensors), ref_decode(ref))


def test_random_bitmask_bytes_including_padding_bits_decode_identically():
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1, 13), (9, 7), (4, 17)):
        index = torch.randint(0, 256, (rows, -(-cols // 8)), generator=gen, dtype=torch.uint8)  # padding bits set too
        nnz = int(ref_unpack_bits(index, cols).sum())
        group = {"": torch.randn(nnz, generator=gen).bfloat16(), "_hf_prune_bitmask": index,
                 META_SUFFIX: torch.tensor([rows, cols])}
        assert_same_bits(decode("w", group), ref_decode(group))


def test_encode_best_picks_the_same_codec_as_before():
    for layout, w in (("2:4", _nm_weight((32, 64), 2, 4, torch.float16, 1)), ("unstructured", _weight((32, 64), torch.float16, 0.4, 2)),
                      ("block:4x4", _weight((32, 64), torch.float16, 1.0, 3, specials=False) * (torch.arange(64) < 16))):
        enc = encode_best(w, layout)
        assert enc is not None and enc.nonzero == int((w != 0).sum())
        assert_same_bits(decode("w", enc.tensors), ref_decode(enc.tensors))


def test_corruption_errors_unchanged():
    w = _weight((32, 64), torch.float16, 0.5, 4)
    bm = get_codec("bitmask").encode(w).tensors
    with pytest.raises(CorruptCheckpointError, match=r"hf_prune: corrupted compressed weight 'q.weight': bitmask marks \d+ values, file has \(\d+,\)"):
        decode("q.weight", dict(bm, **{"": bm[""][:-1]}))
    with pytest.raises(CorruptCheckpointError, match=r"bitmask must be uint8 of shape \(32, 8\), got torch.int16 \(32, 8\)"):
        decode("q.weight", dict(bm, _hf_prune_bitmask=bm["_hf_prune_bitmask"].to(torch.int16)))
    nm = get_codec("nm").encode(_nm_weight((8, 64), 2, 4, torch.float16, 5), n=2, m=4).tensors
    with pytest.raises(CorruptCheckpointError, match=r"'k.weight': N:M index out of range"):
        decode("k.weight", dict(nm, _hf_prune_nm=torch.full_like(nm["_hf_prune_nm"], 216)))
    with pytest.raises(CorruptCheckpointError, match=r"values must have shape \(8, 32\), got \(8, 31\)"):
        decode("k.weight", dict(nm, **{"": nm[""][:, :-1]}))
    blk = get_codec("block").encode(w * (torch.arange(64) < 32), block=(16, 16)).tensors
    with pytest.raises(CorruptCheckpointError, match=r"block mask marks \d+ blocks, values have shape"):
        decode("b.weight", dict(blk, **{"": blk[""][:-1]}))
    with pytest.raises(CorruptCheckpointError, match=r"block 16x16 does not tile 32x60"):
        decode("b.weight", dict(blk, **{META_SUFFIX: torch.tensor([32, 60, 16, 16])}))


@pytest.mark.parametrize("workers", [2, 3, 8])
def test_threaded_decode_of_big_weights_matches_the_previous_codec(monkeypatch, workers):
    """Weights big enough to be split over threads (forced small here) decode to the same bits."""
    from hf_prune.export import codecs

    monkeypatch.setattr(codecs, "_workers", lambda: workers)
    monkeypatch.setattr(codecs, "_MIN_CHUNK", 64)
    for shape in ((37, 100), (5, 333), (64, 64)):
        w = _weight(shape, torch.bfloat16, 0.4, seed=shape[0])
        group = get_codec("bitmask").encode(w).tensors
        assert_same_bits(decode("w", group), ref_decode(group))
    for dim in (1, 0):
        w = _nm_weight((29, 96) if dim == 1 else (96, 29), 2, 4, torch.float16, 7, dim=dim)
        group = get_codec("nm").encode(w, n=2, m=4).tensors
        assert_same_bits(decode("w", group), ref_decode(group))
