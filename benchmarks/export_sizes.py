"""Export benchmark on SmolLM2-135M (fp16): file size, save time and load time, dense vs magnitude-pruned at 50 %,
2:4 and 70 %, written with hf_prune's compressed format.

Reports, per setting: the pruned Linear weights' bytes on disk over their dense bytes (values + index + meta), the
whole checkpoint's size over the dense checkpoint, `save_pretrained` and `from_pretrained` wall times (best of
`--repeats`), and checks that the loaded weights equal the saved ones bit for bit. Prints a markdown table and
writes JSON.

    flock /tmp/hf_prune_cpu.lock python benchmarks/export_sizes.py
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hf_prune.cpu import machine_state

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "export_sizes.json"
SETTINGS = {"50%": (0.5, "unstructured"), "2:4": (0.5, "2:4"), "70%": (0.7, "unstructured")}


def _file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def _timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: hf_prune.assets.smollm2_path())")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import hf_prune
    from hf_prune import MagnitudeConfig, oneshot
    from transformers import AutoModelForCausalLM

    path = args.model
    if path is None:
        from hf_prune.assets import smollm2_path

        path = smollm2_path()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    work = Path(tempfile.mkdtemp(prefix="hf_prune-export-bench-"))
    rows = []
    try:
        def load(directory):
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16)

        dense = load(path)
        dense_dir = work / "dense"

        def save_dense():
            shutil.rmtree(dense_dir, ignore_errors=True)
            dense.save_pretrained(dense_dir)  # noqa: F821 -- runs (in _timed) before the `del dense` below

        dense_save_s, _ = _timed(save_dense, args.repeats)
        dense_load_s, _ = _timed(lambda: load(dense_dir), args.repeats)
        dense_bytes = _file_bytes(dense_dir)
        rows.append({"setting": "dense", "file_bytes": dense_bytes, "checkpoint_ratio": 1.0, "linear_ratio": 1.0,
                     "save_s": dense_save_s, "load_s": dense_load_s, "bit_equal": True})
        del dense

        for name, (sparsity, pattern) in SETTINGS.items():
            model = load(path)
            oneshot(model, MagnitudeConfig(sparsity=sparsity, pattern=pattern), show_progress=False)
            out = work / name.replace("%", "pct").replace(":", "_")

            def save():
                model.save_pretrained(out, overwrite=True)  # noqa: F821 -- runs before this iteration's `del model`

            save_s, _ = _timed(save, args.repeats)
            report = model.hf_quantizer.last_report
            load_s, loaded = _timed(lambda: load(out), args.repeats)
            ref = model.state_dict()
            equal = all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())
            desc = hf_prune.describe_export(out, verify=False)
            rows.append({
                "setting": name, "file_bytes": _file_bytes(out), "checkpoint_ratio": _file_bytes(out) / dense_bytes,
                "linear_ratio": report.stored_bytes / report.dense_bytes, "linear_dense_bytes": report.dense_bytes,
                "linear_stored_bytes": report.stored_bytes, "codecs": sorted(set(desc["codecs"].values())),
                "save_s": save_s, "load_s": load_s, "bit_equal": equal,
                "overall_sparsity": model.hf_prune_state.overall_sparsity,
            })
            del model, loaded
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "model": "SmolLM2-135M", "dtype": "float16", "method": "magnitude", "repeats": args.repeats,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "torch": torch.__version__},
        "machine_state": machine_state(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print("| Setting | Linear weights on disk / dense | Checkpoint / dense | File (MB) | Save (s) | Load (s) | Bit-equal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['linear_ratio']:.3f} | {r['checkpoint_ratio']:.3f} | {r['file_bytes'] / 1e6:.1f} "
              f"| {r['save_s']:.2f} | {r['load_s']:.2f} | {'yes' if r['bit_equal'] else 'NO'} |")
    print(f"\nJSON: {args.output}")
    return result


if __name__ == "__main__":
    main()
