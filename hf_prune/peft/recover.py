"""`recover`: masked-LoRA fine-tune of an hf_prune checkpoint on text with a stock `Trainer`, merged back."""

from __future__ import annotations

import logging
import tempfile


logger = logging.getLogger(__name__)


def recover(model, texts, tokenizer, *, steps: int, lora_config=None, seq_len: int = 512, batch_size: int = 4,
            learning_rate: float = 2e-4, seed: int = 0, output_dir: str | None = None):
    """Trains masked LoRA (`get_sparse_peft_model`) for `steps` on non-overlapping `seq_len` windows of `texts`,
    merges it and returns the merged model (same mask; its `PruningState` records the recovery)."""
    from peft import LoraConfig
    from transformers import Trainer, TrainingArguments, default_data_collator

    from ..oneshot.calibration import tokenize_texts
    from .model import get_sparse_peft_model

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ids = tokenize_texts(texts, tokenizer)
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"training text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}")
    windows = ids[: n * seq_len].view(n, seq_len)
    lora_config = lora_config or LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    peft_model = get_sparse_peft_model(model, lora_config)
    train = [{"input_ids": w, "labels": w} for w in windows]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir or tmp, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                                 logging_steps=max(1, steps // 20), save_strategy="no", report_to=[], seed=seed)
        result = Trainer(model=peft_model, args=args, train_dataset=train, data_collator=default_data_collator).train()
    merged = peft_model.merge_and_unload()
    from ..state import get_pruning_state

    state = get_pruning_state(merged)
    state.metrics.update(recovery_steps=steps, recovery_tokens=steps * batch_size * seq_len,
                         recovery_train_loss=round(result.training_loss, 4))
    return merged
