"""Perplexity of a causal LM on held-out text, in non-overlapping windows (the protocol of the pruning papers)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..oneshot.calibration import tokenize_texts


@torch.no_grad()
def perplexity(
    model,
    texts=None,
    tokenizer=None,
    *,
    input_ids: torch.Tensor | None = None,
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    show_progress: bool = True,
) -> float:
    """Perplexity over non-overlapping `seq_len`-token windows of the concatenated `texts` (or `input_ids`).

    Every token of each window except the first is predicted; the trailing partial window is dropped. `texts` may be
    a [`~hf_prune.text_files.TextFiles`]; with `max_windows`, only the first `max_windows * seq_len` tokens are read
    and tokenised.
    """
    if input_ids is None:
        input_ids = tokenize_texts(texts, tokenizer, max_tokens=None if max_windows is None else max_windows * seq_len)
    input_ids = input_ids.flatten()
    n_windows = input_ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"evaluation text has {input_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = input_ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not show_progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)
