"""Are the int8 exports right on a CPU without VNNI? Argmax agreement with PyTorch of each int8 setting, run natively
and under QEMU's user-mode emulation of an AVX2-only CPU (Haswell: no AVX-512, no VNNI), where ONNX Runtime picks
the u8 x s8 kernels whose int16 intermediate saturates.

    apt-get install qemu-user            # once; without it only the native column is measured
    python benchmarks/int8_portability.py [--skip-smollm2]

Models: the saturating tiny LLaMA of `tests/test_deploy_int8.py` and the shipped SmolLM2-135M (8 x 128 held-out
Wikipedia tokens natively, the first 2 x 128 under emulation: ~3 minutes a graph there). Settings: ONNX Runtime's
dynamic quantization defaults (8-bit per-channel weights, what hf_prune shipped before), `dynamic` (the same with
`reduce_range`: 7-bit weights) and `blockwise` (weight-only 8-bit MatMulNBits), the last two being hf_prune's
`int8_scheme`s. Emulation measures correctness only: its timings mean nothing. Writes
`benchmarks/results/int8_portability.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
EMULATED_CPU = "Haswell"
SETTINGS = ("ort-default", "dynamic", "blockwise")

RUNNER = """
import json, sys, numpy as np
from hf_prune_ort import OnnxModel
d, files, n = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
ids, ref = np.load(d + "/ids.npy")[:n], np.load(d + "/ref.npy")[:n]
for f in files:
    out = OnnxModel.from_pretrained(d, f)(ids).logits
    print(json.dumps({"file": f, "agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
                      "max_abs_logit_diff": float(np.abs(out - ref).max())}), flush=True)
"""


def quantize(source: Path, target: Path, setting: str) -> None:
    from hf_prune.deploy.quantize import quantize_int8

    if setting == "ort-default":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        logging.getLogger().setLevel(logging.ERROR)
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    else:
        quantize_int8(source, target, setting)


def prepare(name: str, work: Path) -> Path:
    """Exports the model's fp32 graph, its int8 variants and the reference logits into `work/name`."""
    import numpy as np
    import torch

    from hf_prune.deploy import export_onnx

    out = work / name
    if (out / "ref.npy").is_file():
        return out
    if name == "saturating-tiny-llama":
        sys.path.insert(0, str(ROOT / "tests"))
        from test_deploy_int8 import _saturating_llama

        model = _saturating_llama()
        ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(5))
        export_onnx(model, out, task="text-generation", overwrite=True)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hf_prune.assets import smollm2_path, wikipedia_split

        path = smollm2_path()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        held_out = wikipedia_split()[1]
        ids = AutoTokenizer.from_pretrained(path)("\n\n".join(held_out[:3]), return_tensors="pt").input_ids
        ids = ids[:, : 8 * 128].view(8, 128)
        export_onnx(path, out, overwrite=True)
    for setting in SETTINGS:
        quantize(out / "model.onnx", out / f"{setting}.onnx", setting)
    with torch.no_grad():
        np.save(out / "ref.npy", model(input_ids=ids).logits.numpy())
    np.save(out / "ids.npy", ids.numpy())
    return out


def run(directory: Path, rows: int, emulate: bool) -> dict:
    cmd = [sys.executable, "-c", RUNNER, str(directory), ",".join(f"{s}.onnx" for s in SETTINGS), str(rows)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", EMULATED_CPU] + cmd
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {line["file"].removesuffix(".onnx"): line for line in lines}


SPEED = """
import json, sys, time, numpy as np
from hf_prune_ort import OnnxModel
d, files, rounds = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3])
prompt = np.load(d + "/ids.npy")[:1, :32]
models = {f: OnnxModel.from_pretrained(d, f, threads=1) for f in files}
best = {f: float("inf") for f in files}
for _ in range(rounds):  # interleaved rounds, best of each
    for f, m in models.items():
        start = time.perf_counter()
        m.generate(prompt, max_new_tokens=32)
        best[f] = min(best[f], time.perf_counter() - start)
print(json.dumps({f: 32 / t for f, t in best.items()}))
"""


def decode_speed(directory: Path, rounds: int) -> dict:
    """Greedy tokens/s at batch 1 on one thread (32-token prompt, 32 new tokens), fp32 vs each int8 graph."""
    files = ["model.onnx"] + [f"{s}.onnx" for s in SETTINGS]
    proc = subprocess.run([sys.executable, "-c", SPEED, str(directory), ",".join(files), str(rounds)],
                          capture_output=True, text=True, check=True)
    speeds = json.loads(proc.stdout.splitlines()[-1])
    return {f.removesuffix(".onnx").replace("model", "fp32"): round(v, 2) for f, v in speeds.items()}


def table(report: dict) -> str:
    head = ("| model | setting | native agreement | native max logit diff | emulated AVX2 agreement | "
            "emulated max logit diff |\n|---|---|---|---|---|---|")
    rows = []
    for model, res in report["models"].items():
        for s in SETTINGS:
            n, e = res["native"][s], res.get("emulated", {}).get(s)
            rows.append(f"| {model} | {s} | {n['agreement']:.3f} | {n['max_abs_logit_diff']:.3f} | "
                        + (f"{e['agreement']:.3f} | {e['max_abs_logit_diff']:.3f} |" if e else "- | - |"))
    lines = [head] + rows
    for model, res in report["models"].items():
        if "decode_tokens_per_s" in res:
            speeds = res["decode_tokens_per_s"]
            lines += ["", f"{model}, greedy decoding at batch 1, one thread (tokens/s; load "
                      f"{res['load_during_timing']}): " + ", ".join(
                          f"{k} {v:.1f} ({v / speeds['fp32']:.2f}x)" for k, v in speeds.items())]
    return "\n".join(lines)


def main() -> None:
    from hf_prune.cpu import machine_state

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=RESULTS / ".int8_work")
    p.add_argument("--skip-smollm2", action="store_true")
    p.add_argument("--emulated-rows", type=int, default=2, help="SmolLM2 sequences run under emulation")
    p.add_argument("--speed-rounds", type=int, default=3, help="SmolLM2 decoding rounds (0: no timing; time alone)")
    p.add_argument("--skip-emulation", action="store_true", help="keep the recorded emulated columns")
    args = p.parse_args()
    emulate = shutil.which("qemu-x86_64") is not None and not args.skip_emulation
    out = RESULTS / "int8_portability.json"
    previous = json.loads(out.read_text())["models"] if out.is_file() else {}
    report = {"date": time.strftime("%Y-%m-%d"), "machine_state": machine_state(), "emulated_cpu": EMULATED_CPU,
              "models": {}}
    for name in ["saturating-tiny-llama"] + ([] if args.skip_smollm2 else ["smollm2-135m"]):
        directory = prepare(name, args.work)
        res = {k: v for k, v in previous.get(name, {}).items() if k == "emulated"}
        res["native"] = run(directory, 8, emulate=False)
        if emulate:
            res["emulated"] = run(directory, args.emulated_rows if name == "smollm2-135m" else 8, emulate=True)
        if name == "smollm2-135m" and args.speed_rounds:
            res["load_during_timing"] = round(os.getloadavg()[0], 2)
            res["decode_tokens_per_s"] = decode_speed(directory, args.speed_rounds)
        report["models"][name] = res
        print(table(report), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "int8_portability.md").write_text(table(report) + "\n")


if __name__ == "__main__":
    main()
