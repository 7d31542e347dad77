"""Greedy-generation speed of decoders, eager PyTorch and ONNX Runtime: the timing the SmolLM2 benchmarks share
(`benchmarks/cofi_smollm2.py`, `benchmarks/structured_smollm2.py`).

Every model is timed in the same process, in interleaved rounds (median per model, backend and batch), so that the
machine's load falls on all of them alike; generation runs a fixed number of new tokens (no end-of-sequence stop),
with the KV cache, greedy.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch


def torch_generate(model, ids: torch.Tensor, new: int) -> None:
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                   pad_token_id=0, use_cache=True)  # every model with its KV cache, whatever its config says


def ort_generate(session, ids: torch.Tensor, new: int) -> None:
    session.generate(ids.numpy(), max_new_tokens=new, eos_token_id=[])  # no end-of-sequence stop: fixed length


BACKENDS = {"eager": torch_generate, "ort": ort_generate}


def onnx_session(model_dir: str, out: str, *, atol: float, threads: int | None):
    """`(session, error, check)`: the model's ONNX Runtime export in `out` (`hf_prune.export_onnx`, checked against
    PyTorch within `atol`; reused when `out` holds one), or the error it gave instead, and the check's figures."""
    from hf_prune import OnnxModel, export_onnx

    check_file = os.path.join(out, "verification.json")
    try:
        if not os.path.isfile(os.path.join(out, "model.onnx")):
            report = export_onnx(model_dir, out, task="text-generation", overwrite=True, atol=atol)
            with open(check_file, "w") as fh:
                json.dump(report.verification, fh, indent=2)
        check = json.load(open(check_file)) if os.path.isfile(check_file) else None
        return OnnxModel.from_pretrained(out, threads=threads), None, check
    except Exception as err:  # noqa: BLE001 -- recorded in the results: whether ONNX works for this export
        return None, f"{type(err).__name__}: {err}"[:500], None


def time_generation(models: dict[str, dict], prompt: torch.Tensor, *, batches: dict[str, list[int]], new_tokens: int,
                    rounds: int) -> None:
    """Greedy tokens/s per model, backend and batch into `models[name]["tokens_per_s"][f"{backend}_b{batch}"]`.

    `models[name]` holds `"model"` (a PyTorch model, timed as `"eager"`) and optionally `"onnx"` (an `OnnxModel`,
    timed as `"ort"`); `batches` maps each backend to the batch sizes to time; `prompt` has at least the largest
    batch's rows. One warm-up generation per run, then `rounds` interleaved rounds, median."""
    runs = []
    for name, m in models.items():
        for backend, runner in (("eager", m.get("model")), ("ort", m.get("onnx"))):
            if runner is not None:
                runs += [(name, backend, b, runner) for b in batches.get(backend, [])]
    times: dict[tuple, list[float]] = {}
    for _, backend, b, runner in runs:  # warm-up
        BACKENDS[backend](runner, prompt[:b], 2)
    for _ in range(rounds):
        for name, backend, b, runner in runs:
            start = time.perf_counter()
            with torch.no_grad():
                BACKENDS[backend](runner, prompt[:b], new_tokens)
            times.setdefault((name, backend, b), []).append(time.perf_counter() - start)
    for (name, backend, b), ts in times.items():
        models[name].setdefault("tokens_per_s", {})[f"{backend}_b{b}"] = b * new_tokens / statistics.median(ts)
