"""Checks an exported graph against the PyTorch model it came from, before anything is written to the output.

Encoders: a padded batch (the tokenizer's, on a few sentences, when the checkpoint has one; random ids otherwise)
through both. Decoders: a left-padded prompt batch, then a few cached steps, each fed the same next token (PyTorch's
greedy choice) in both, so every step compares the KV-cache path as well. Reported: the max abs logit difference
over the attended positions, the largest PyTorch logit there (the scale the fp32 tolerance grows with: see
`logit_tolerance`), and the agreement of the argmax predictions (what an int8 graph is judged on).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from hf_prune_ort import OnnxModel

from .graph import cache_kwargs, cache_layers, output_cache
from .tasks import Task

SAMPLE_TEXTS = [
    "The film is a charming, funny and beautifully acted story about growing up.",
    "A dull, overlong mess with nothing to say.",
    "Paris is the capital and most populous city of France.",
    "It was the best of times, it was the worst of times.",
]
DECODE_STEPS = 4


def logit_tolerance(atol: float, rtol: float, max_abs_logit: float) -> float:
    """The largest max abs logit difference an fp32 graph may have: `atol + rtol * max|logit|`.

    Rounding error in fp32 is relative: a graph whose kernels only sum in another order (ONNX Runtime's fused
    attention, layer norm and MatMul) differs from PyTorch by some units in the last place of the values it computes,
    and that error grows with the size of the logits and the depth. A fixed `atol` alone is right for logits of size
    ~1 (the tiny test models), and too strict for a deep decoder: SmolLM2-135M (30 layers, logits up to ~20) is off
    by ~1.2e-4 with nothing wrong. `rtol` (default 1e-5, ~80 fp32 ulps of the largest logit) scales the limit with
    the logits, as `numpy.allclose` does, but against the largest logit rather than each element: one bad weight
    moves small logits as much as large ones.
    """
    return atol + rtol * max_abs_logit


def sample_inputs(model, tokenizer, task: Task) -> dict[str, torch.Tensor]:
    """A padded batch (left-padded for decoders), at shapes other than the traced ones."""
    if tokenizer is not None:
        tokenizer.padding_side = "left" if task.decoder else "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is not None:
            enc = tokenizer(SAMPLE_TEXTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
            enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if int(enc["input_ids"].max()) < model.config.vocab_size:
                return enc
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 13), generator=generator)
    mask = torch.ones_like(ids)
    if task.decoder:
        mask[1, :4] = 0
    else:
        mask[1, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _positions(mask: torch.Tensor, seq: int) -> torch.Tensor:
    positions = mask.cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)[:, -seq:]


def compare(model, onnx: OnnxModel, task: Task, inputs: dict[str, torch.Tensor]) -> dict:
    """Runs `inputs` through `model` and `onnx`: max abs logit (and cache) difference, argmax agreement."""
    diffs, scales, cache_diffs, agree, total = [], [], [], 0, 0

    def record(ref: torch.Tensor, got: np.ndarray, valid: torch.Tensor | None):
        nonlocal agree, total
        ref = ref.float().numpy()
        if valid is not None:  # [batch, seq] positions that attend to something real
            ref, got = ref[valid.numpy()], got[valid.numpy()]
        diffs.append(float(np.abs(ref - got).max()))
        scales.append(float(np.abs(ref).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += int(np.prod(ref.shape[:-1]))

    with torch.no_grad():
        if not task.decoder:
            ref = model(**inputs).logits
            got = onnx(**{k: v.numpy() for k, v in inputs.items()}).logits
            record(ref, got, inputs["attention_mask"].bool() if ref.dim() == 3 else None)
        else:
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            cache, past = DynamicCache(config=model.config), None
            step = ids
            for _ in range(DECODE_STEPS):
                ref = model(input_ids=step, attention_mask=mask, position_ids=_positions(mask, step.shape[1]),
                            use_cache=True, **cache_kwargs(model, cache))
                out = onnx(step.numpy(), attention_mask=mask.numpy(), past_key_values=past)
                record(ref.logits, out.logits, mask[:, -step.shape[1]:].bool())
                for (k, v), (ok, ov) in zip(cache_layers(output_cache(ref)), out.past_key_values):
                    cache_diffs.append(max(float(np.abs(k.numpy() - ok).max()), float(np.abs(v.numpy() - ov).max())))
                cache, past = output_cache(ref), out.past_key_values
                step = ref.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    report = {"max_abs_logit_diff": max(diffs), "max_abs_logit": max(scales), "argmax_agreement": agree / total,
              "positions": total}
    if cache_diffs:
        report["max_abs_cache_diff"] = max(cache_diffs)
    return report
