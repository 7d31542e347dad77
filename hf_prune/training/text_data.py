"""What the text-training workflows (`recover`, `distill`) share: token windows of plain text, the held-out
tokens, stock `TrainingArguments` for a fixed number of steps, and the run's record for the model card."""

from __future__ import annotations

import torch


def training_windows(texts, tokenizer, seq_len: int) -> torch.Tensor:
    """Non-overlapping `seq_len`-token windows of the concatenated `texts` (the trailing partial one dropped)."""
    from ..oneshot.calibration import tokenize_texts

    ids = tokenize_texts(texts, tokenizer)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"training text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def eval_token_ids(eval_texts, tokenizer, seq_len: int) -> torch.Tensor | None:
    """The held-out tokens (`None` without `eval_texts`), refused when shorter than one evaluation window."""
    if eval_texts is None:
        return None
    from ..oneshot.calibration import tokenize_texts

    ids = tokenize_texts(eval_texts, tokenizer)
    if ids.numel() < seq_len:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids


def lm_examples(windows: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Causal-LM training examples (`labels` = `input_ids`; the model shifts them) for `default_data_collator`."""
    return [{"input_ids": w, "labels": w} for w in windows]


def check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def text_training_args(output_dir: str, *, steps: int, batch_size: int, learning_rate: float, seed: int = 0,
                       bf16: bool | str = False, grad_accum: int = 1, purpose: str = "training",
                       device: torch.device | None = None, **overrides):
    """Stock `TrainingArguments` of a `steps`-step run: AdamW, cosine schedule with 5 % warm-up, a log every 5 %,
    no checkpoints, no reporting integrations. `bf16` (True, False or "auto") trains under bf16 autocast (weights
    keep their dtype) where the hardware runs bf16 natively, else in fp32 (`hf_prune.cpu.use_bf16`, which logs why,
    naming `purpose`); `args.bf16` of the result says which."""
    from transformers import TrainingArguments

    from ..cpu import use_bf16

    check_steps(steps)
    bf16 = use_bf16(bf16, purpose, device)
    if grad_accum < 1:
        raise ValueError(f"gradient accumulation steps must be >= 1, got {grad_accum}")
    kwargs = dict(max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                  learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                  logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=seed, bf16=bf16,
                  use_cpu=bf16 and not torch.cuda.is_available(), weight_decay=0.0)
    kwargs.update(overrides)
    return TrainingArguments(output_dir, **kwargs)


def run_record(prefix: str, trainer, *, texts, windows: torch.Tensor, data_name: str | None, learning_rate: float,
               loss_key: str = "loss") -> dict:
    """`{prefix}_data`, `_steps`, `_tokens` (steps x global batch x window), `_seq_len`, `_learning_rate` and the
    last logged `loss_key` as `_train_loss`: the card's record of a text-training run."""
    args = trainer.args
    done = trainer.state.global_step
    seq_len = windows.shape[1]
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    record = {
        f"{prefix}_data": data_name or f"{len(texts)} texts, {windows.numel()} tokens",
        f"{prefix}_steps": done, f"{prefix}_tokens": done * global_batch * seq_len, f"{prefix}_seq_len": seq_len,
        f"{prefix}_learning_rate": learning_rate, f"{prefix}_precision": "bf16" if args.bf16 else "fp32",
    }
    losses = [h[loss_key] for h in trainer.state.log_history if loss_key in h]
    if losses:
        record[f"{prefix}_train_loss"] = round(losses[-1], 4)
    return record
