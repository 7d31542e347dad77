"""Why a compressed load is slower than a dense one: the cost of scattering kept values into a dense weight.

Times, on one bitmask-sized weight, the numpy ways of writing `values` into the positions of `mask` (what every
bitmask decode must do) against what a dense load costs for the same bytes (a copy of the dense weight), best of
`--repeats`, interleaved, side by side in one process:

    OMP_NUM_THREADS=1 python benchmarks/scatter_probe.py            # -> benchmarks/results/scatter_probe.json

Rows: `flatnonzero` (positions as int64, then a fancy-index assignment: what `hf_prune.export.codecs` uses),
`bool index` (`out[mask] = values`), `np.place`, torch's `masked_scatter_` and `index_put_` on the bool mask, a
gather (each output position reads its value through per-byte popcount offsets and a rank table, issue 29's
lever), `hf_prune _scatter_kept` (the library's decode step),
`unpackbits` (the mask from its packed bits) and `dense copy` (the floor: reading and writing the dense bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from hf_prune.cpu import machine_state
from hf_prune.export.codecs import _scatter_kept

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1536)
    p.add_argument("--cols", type=int, default=4608)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "scatter_probe.json")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    mask = rng.random((a.rows, a.cols)) >= a.sparsity
    values = rng.integers(-(2**15), 2**15, size=int(mask.sum()), dtype=np.int16)
    packed = np.packbits(mask, axis=1, bitorder="little")
    dense = np.zeros((a.rows, a.cols), np.int16)
    dense[mask] = values
    tvalues = torch.from_numpy(values).view(torch.float16)

    def flatnonzero(out):
        out.reshape(-1)[np.flatnonzero(mask)] = values

    def bool_index(out):
        out[mask] = values

    def place(out):
        np.place(out, mask, values)

    tmask, tout_values = torch.from_numpy(mask), torch.from_numpy(values)

    def torch_masked_scatter(out):
        torch.from_numpy(out).masked_scatter_(tmask, tout_values)

    def torch_index_put(out):
        torch.from_numpy(out)[tmask] = tout_values

    # Gather: every output position reads its value. Per mask byte, the offset of its first value (exclusive cumsum
    # of a popcount table) plus the rank of each bit inside the byte (a [256, 8] table); unset positions read
    # whatever is there and are masked to zero by a [256, 8] table of all-ones / zero lanes.
    byte_bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.int32)
    popcount, rank = byte_bits.sum(1), np.cumsum(byte_bits, 1) - byte_bits
    lanes = np.where(byte_bits == 1, -1, 0).astype(np.int16)
    padded_values = np.concatenate([values, np.zeros(8, np.int16)])

    def gather(out):
        flat = packed.reshape(-1)
        offsets = np.empty(flat.size, np.int32)
        offsets[0] = 0
        np.cumsum(popcount[flat[:-1]], out=offsets[1:])
        index = rank[flat]
        index += offsets[:, None]
        np.copyto(out, (np.take(padded_values, index) & lanes[flat]).reshape(a.rows, -1)[:, : a.cols])

    cases = {
        "flatnonzero": flatnonzero, "bool index": bool_index, "np.place": place,
        "torch masked_scatter_": torch_masked_scatter, "torch index_put_ (bool mask)": torch_index_put,
        "gather (popcount offsets, per-byte rank table)": gather,
        "hf_prune _scatter_kept": lambda out: _scatter_kept(mask, tvalues),
        "unpackbits": lambda out: np.unpackbits(packed, axis=-1, count=a.cols, bitorder="little"),
        "dense copy": lambda out: np.copyto(out, dense),
    }
    times = {k: [] for k in cases}
    for _ in range(a.repeats):
        for name, fn in cases.items():
            out = np.zeros((a.rows, a.cols), np.int16)
            start = time.perf_counter()
            fn(out)
            times[name].append(time.perf_counter() - start)
            if name not in ("hf_prune _scatter_kept", "unpackbits", "dense copy"):
                assert np.array_equal(out, dense), name
    assert torch.equal(_scatter_kept(mask, tvalues).view(torch.int16), torch.from_numpy(dense))
    best = {k: min(v) for k, v in times.items()}
    floor = best["dense copy"]
    print(f"{a.rows} x {a.cols} fp16, sparsity {a.sparsity}, best of {a.repeats}, "
          f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n")
    print("| step | ms | x dense copy |\n|---|---|---|")
    for k, v in best.items():
        print(f"| {k} | {1e3 * v:.1f} | {v / floor:.1f}x |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"shape": [a.rows, a.cols], "sparsity": a.sparsity, "repeats": a.repeats,
                                 "best_s": best, "all_s": times, "torch_threads": torch.get_num_threads(),
                                 "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                 "load_average": os.getloadavg(), "machine_state": machine_state(),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")


if __name__ == "__main__":
    main()
