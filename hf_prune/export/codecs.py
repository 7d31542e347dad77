"""Tensor codecs: how one sparse 2-D weight is written as a few safetensors tensors, and read back bit for bit.

A compressed weight `P.weight` (dense shape `[rows, cols]`) is stored as

- `P.weight`: the kept values, in the weight's own dtype, with a shape that is *never* the dense shape (so a loader
  that does not know hf_prune fails on a shape mismatch instead of loading garbage);
- `P.weight_hf_prune_meta`: int64 `[rows, cols, *codec parameters]`;
- one index tensor whose key suffix names the codec (`_hf_prune_bitmask`, `_hf_prune_nm`, `_hf_prune_blockmask`).

No library packs N:M combinations or block masks into safetensors-friendly tensors, so the packing below is
hand-written; each codec is small, vectorised torch code and documented in `docs/format.md`.

Signed zeros: an entry is "pruned" when it compares equal to 0, so `-0.0` is decoded as `+0.0` (equal under
`torch.equal`, and in every computation).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

META_SUFFIX = "_hf_prune_meta"


class CorruptCheckpointError(ValueError):
    """A compressed tensor group is inconsistent (wrong index length, missing companion, bad metadata)."""


@dataclass(frozen=True)
class Encoded:
    """The tensors of one compressed weight, keyed by suffix (`""` for the values)."""

    codec: str
    tensors: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class TensorCodec:
    """A way to store a sparse 2-D tensor. Subclasses set `name` and `suffix` and implement the three methods."""

    name: str = ""
    suffix: str = ""  # key suffix of the index tensor, appended to the parameter name (e.g. "weight_hf_prune_bitmask")

    def encode(self, weight: torch.Tensor, **params) -> Encoded | None:
        """Returns the encoding, or `None` when `weight` does not have this codec's sparsity pattern."""
        raise NotImplementedError

    def decode(self, values: torch.Tensor, index: torch.Tensor, meta: list[int], name: str) -> torch.Tensor:
        raise NotImplementedError

    def _pack(self, values: torch.Tensor, index: torch.Tensor, meta: list[int]) -> Encoded:
        return Encoded(
            self.name,
            {"": values.contiguous(), self.suffix: index.contiguous(), META_SUFFIX: torch.tensor(meta, dtype=torch.int64)},
        )


_CODECS: dict[str, TensorCodec] = {}


def register_codec(codec: TensorCodec) -> TensorCodec:
    """Registers a codec instance. Its `suffix` must start with `_hf_prune_` and be unique."""
    if not codec.name or not codec.suffix.startswith("_hf_prune_"):
        raise ValueError(f"register_codec: codec needs a name and a suffix starting with '_hf_prune_', got {codec!r}")
    for other in _CODECS.values():
        if other.suffix == codec.suffix and other.name != codec.name:
            raise ValueError(f"register_codec: suffix {codec.suffix!r} is already used by codec {other.name!r}")
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> TensorCodec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ValueError(f"Unknown hf_prune codec {name!r}; registered: {sorted(_CODECS)}") from None


def codec_for_suffix(suffix: str) -> TensorCodec | None:
    return next((c for c in _CODECS.values() if c.suffix == suffix), None)


def index_suffixes() -> list[str]:
    return [c.suffix for c in _CODECS.values()]


# ------------------------------------------------------------------------------------------------------ bit packing
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Packs a bool `[rows, n]` into uint8 `[rows, ceil(n / 8)]`, bit `j % 8` (LSB first) of byte `j // 8`."""
    rows, n = mask.shape
    padded = torch.zeros(rows, -(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :n] = mask
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    rows = packed.shape[0]
    bits = packed.unsqueeze(-1).bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.view(rows, -1)[:, :n]


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise CorruptCheckpointError(f"hf_prune: corrupted compressed weight {name!r}: {message}")


# ---------------------------------------------------------------------------------------------------------- bitmask
class BitmaskCodec(TensorCodec):
    """Any sparsity: a 1-bit-per-entry mask plus the non-zero values in row-major order."""

    name = "bitmask"
    suffix = "_hf_prune_bitmask"

    def encode(self, weight, **params):
        mask = weight != 0
        return self._pack(weight[mask], pack_bits(mask), [*weight.shape])

    def decode(self, values, index, meta, name):
        _check(len(meta) == 2, name, f"meta must be [rows, cols], got {meta}")
        rows, cols = meta
        _check(
            index.dtype == torch.uint8 and tuple(index.shape) == (rows, -(-cols // 8)),
            name,
            f"bitmask must be uint8 of shape {(rows, -(-cols // 8))}, got {index.dtype} {tuple(index.shape)}",
        )
        mask = unpack_bits(index, cols)
        nnz = int(mask.sum())
        _check(values.dim() == 1 and values.numel() == nnz, name, f"bitmask marks {nnz} values, file has {tuple(values.shape)}")
        out = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
        out[mask] = values
        return out


# -------------------------------------------------------------------------------------------------------------- N:M
def _combinations(n: int, m: int) -> torch.Tensor:
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).view(-1, n)


def _nm_storage(n_combos: int) -> tuple[torch.dtype, int]:
    """Index dtype and number of groups packed (in base `n_combos`) per stored element: uint8 or int32, whichever
    spends fewer bits per group (2:4 -> 3 groups per uint8; 4:8 -> 5 groups per int32)."""
    options = []
    for dtype, bits in ((torch.uint8, 8), (torch.int32, 31)):
        per = 0
        while n_combos ** (per + 1) <= 2**bits:
            per += 1
        if per:
            options.append(((32 if dtype == torch.int32 else 8) / per, dtype, per))
    _, dtype, per = min(options, key=lambda o: o[0])
    return dtype, per


class NMCodec(TensorCodec):
    """N:M sparsity: in each group of M consecutive entries along `dim`, at most N are non-zero.

    Values: the N kept entries of each group, `[rows, cols * N / M]` (for `dim=1`; transposed first for `dim=0`).
    Index: each group's kept positions as the rank of the combination among the C(M, N) lexicographic
    combinations, several groups per element in base C(M, N) (2:4: 6 combinations, 3 groups per uint8 byte, i.e.
    2.67 index bits per 4 weights instead of 4 for a bitmask).
    """

    name = "nm"
    suffix = "_hf_prune_nm"

    def encode(self, weight, n: int = 2, m: int = 4, **params):
        for dim in (1, 0):
            enc = self._encode_dim(weight, n, m, dim)
            if enc is not None:
                return enc
        return None

    def _encode_dim(self, weight, n, m, dim):
        w = weight if dim == 1 else weight.t()
        rows, cols = w.shape
        if not 0 < n < m <= 16 or cols % m:
            return None
        groups = w.reshape(rows, cols // m, m)
        nonzero = groups != 0
        if int(nonzero.sum(-1).max()) > n:
            return None
        # Keep the non-zeros, and fill groups with fewer than N of them with their first zero positions.
        pos = torch.arange(m, device=w.device)
        key = nonzero.to(torch.int64) * m + (m - 1 - pos)
        kept = key.topk(n, dim=-1).indices.sort(dim=-1).values  # [rows, G, n]
        values = groups.gather(-1, kept).reshape(rows, -1)
        combos = _combinations(n, m)
        lut = torch.full((1 << m,), -1, dtype=torch.int64)
        lut[(1 << combos).sum(-1)] = torch.arange(len(combos))
        rank = lut.to(w.device)[(1 << kept).sum(-1)]  # [rows, G]
        index = self._pack_ranks(rank, len(combos))
        return self._pack(values, index, [*weight.shape, n, m, dim])

    @staticmethod
    def _pack_ranks(rank: torch.Tensor, n_combos: int) -> torch.Tensor:
        dtype, per = _nm_storage(n_combos)
        rows, g = rank.shape
        padded = torch.zeros(rows, -(-g // per) * per, dtype=torch.int64, device=rank.device)
        padded[:, :g] = rank
        radix = n_combos ** torch.arange(per, dtype=torch.int64, device=rank.device)
        return (padded.view(rows, -1, per) * radix).sum(-1).to(dtype)

    def decode(self, values, index, meta, name):
        _check(len(meta) == 5, name, f"meta must be [rows, cols, N, M, dim], got {meta}")
        rows, cols, n, m, dim = meta
        _check(0 < n < m <= 16 and dim in (0, 1), name, f"invalid N:M parameters N={n} M={m} dim={dim}")
        r, c = (rows, cols) if dim == 1 else (cols, rows)
        _check(c % m == 0, name, f"size {c} along dim {dim} is not a multiple of M={m}")
        g = c // m
        combos = _combinations(n, m).to(values.device)
        dtype, per = _nm_storage(len(combos))
        _check(
            index.dtype == dtype and tuple(index.shape) == (r, -(-g // per)),
            name,
            f"N:M index must be {dtype} of shape {(r, -(-g // per))}, got {index.dtype} {tuple(index.shape)}",
        )
        _check(tuple(values.shape) == (r, g * n), name, f"values must have shape {(r, g * n)}, got {tuple(values.shape)}")
        radix = len(combos) ** torch.arange(per, dtype=torch.int64, device=index.device)
        rank = (index.to(torch.int64).unsqueeze(-1) // radix) % len(combos)
        rank = rank.view(r, -1)[:, :g]
        _check(index.numel() == 0 or int(index.to(torch.int64).max()) < len(combos) ** per, name, "N:M index out of range")
        out = torch.zeros(r, g, m, dtype=values.dtype, device=values.device)
        out.scatter_(-1, combos[rank], values.view(r, g, n))
        out = out.view(r, c)
        return out if dim == 1 else out.t().contiguous()


# ------------------------------------------------------------------------------------------------------------ block
class BlockCodec(TensorCodec):
    """Block sparsity: the weight is tiled in R x C blocks; only blocks with a non-zero entry are stored.

    Values: the kept blocks, `[n_kept, R, C]`, in row-major block order. Index: a bitmask over the block grid,
    uint8 `[rows / R, ceil((cols / C) / 8)]`.
    """

    name = "block"
    suffix = "_hf_prune_blockmask"

    def encode(self, weight, block: tuple[int, int] = (16, 16), **params):
        br, bc = block
        rows, cols = weight.shape
        if rows % br or cols % bc:
            return None
        tiles = weight.reshape(rows // br, br, cols // bc, bc).permute(0, 2, 1, 3)
        keep = (tiles != 0).any(-1).any(-1)
        return self._pack(tiles[keep], pack_bits(keep), [rows, cols, br, bc])

    def decode(self, values, index, meta, name):
        _check(len(meta) == 4, name, f"meta must be [rows, cols, R, C], got {meta}")
        rows, cols, br, bc = meta
        _check(br > 0 and bc > 0 and rows % br == 0 and cols % bc == 0, name, f"block {br}x{bc} does not tile {rows}x{cols}")
        gr, gc = rows // br, cols // bc
        _check(
            index.dtype == torch.uint8 and tuple(index.shape) == (gr, -(-gc // 8)),
            name,
            f"block mask must be uint8 of shape {(gr, -(-gc // 8))}, got {index.dtype} {tuple(index.shape)}",
        )
        keep = unpack_bits(index, gc)
        n_kept = int(keep.sum())
        _check(tuple(values.shape) == (n_kept, br, bc), name, f"block mask marks {n_kept} blocks, values have shape {tuple(values.shape)}")
        tiles = torch.zeros(gr, gc, br, bc, dtype=values.dtype, device=values.device)
        tiles[keep] = values
        return tiles.permute(0, 2, 1, 3).reshape(rows, cols)


for _codec in (BitmaskCodec(), NMCodec(), BlockCodec()):
    register_codec(_codec)


def decode(name: str, group: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuilds the dense tensor `name` from its group (`{"": values, suffix: index, META_SUFFIX: meta}`)."""
    index_keys = [k for k in group if k not in ("", META_SUFFIX)]
    _check(len(index_keys) == 1, name, f"expected exactly one index tensor, found suffixes {sorted(index_keys) or 'none'}")
    codec = codec_for_suffix(index_keys[0])
    _check(codec is not None, name, f"unknown index suffix {index_keys[0]!r} (known: {index_suffixes()})")
    _check("" in group, name, "the values tensor is missing")
    _check(META_SUFFIX in group, name, f"the {META_SUFFIX} tensor is missing")
    meta = group[META_SUFFIX]
    _check(meta.dim() == 1 and meta.dtype == torch.int64, name, f"meta must be a 1-D int64 tensor, got {meta.dtype} {tuple(meta.shape)}")
    return codec.decode(group[""], group[index_keys[0]], [int(v) for v in meta.tolist()], name)
