"""`recover`: masked-LoRA fine-tune of an hf_prune checkpoint on text with a stock `Trainer`, merged back."""

from __future__ import annotations

import logging
import tempfile

import torch

from ..training.text_data import (  # noqa: F401  (training_windows: re-exported, benchmarks import it from here)
    check_steps,
    eval_token_ids,
    lm_examples,
    run_record,
    text_training_args,
    training_windows,
)

logger = logging.getLogger(__name__)


def train_adapter(peft_model, windows: torch.Tensor, *, steps: int, batch_size: int = 4, learning_rate: float = 2e-4,
                  seed: int = 0, bf16: bool | str = False, callbacks=None, output_dir: str | None = None):
    """Causal-LM training of `peft_model` on `windows` with a stock `transformers.Trainer` (cosine schedule, AdamW,
    windows shuffled by the Trainer's sampler). `bf16`: True, False or "auto", as `hf_prune.cpu.use_bf16` decides
    (fp32 on a CPU without native bf16). Returns the `Trainer` (its `state` holds the log history; `args.bf16` says
    which precision ran)."""
    from transformers import Trainer, default_data_collator

    with tempfile.TemporaryDirectory() as tmp:
        args = text_training_args(output_dir or tmp, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                  seed=seed, bf16=bf16, purpose="recovery training", device=peft_model.device)
        trainer = Trainer(model=peft_model, args=args, train_dataset=lm_examples(windows),
                          data_collator=default_data_collator, callbacks=callbacks)
        trainer.train()
    return trainer


def recover(model, texts, tokenizer, *, steps: int, lora_config=None, seq_len: int = 512, batch_size: int = 4,
            learning_rate: float = 2e-4, seed: int = 0, bf16: bool | str = False, eval_texts=None,
            eval_windows: int | None = None, eval_seq_len: int | None = None, data_name: str | None = None, callbacks=None,
            output_dir: str | None = None):
    """Masked-LoRA recovery of a pruned model: trains `get_sparse_peft_model(model, lora_config)` for `steps` on
    non-overlapping `seq_len`-token windows of `texts`, merges it and returns the merged model (the same mask,
    exactly).

    The merged model's `PruningState` records the recovery beside the pruning config (so its card and `hf-prune
    info` show it): the adapter config, `recovery_data`, steps, tokens, final training loss and, with `eval_texts`,
    the held-out perplexity before and after (`recovery_perplexity_before` / `_after`).

    Args:
        model: a model pruned by hf_prune (in memory or loaded from an hf_prune checkpoint).
        texts: training texts (never the held-out ones).
        tokenizer: the model's tokenizer.
        steps: optimizer steps.
        lora_config (`peft.LoraConfig`, *optional*): default `r=16, lora_alpha=32, target_modules="all-linear"`.
        bf16 (`bool` or `"auto"`): train under bf16 autocast (the weights and the merge stay in their dtype).
            `"auto"` uses bf16 where the hardware runs it natively. On a CPU without native bf16 (no AVX-512 BF16 /
            AMX: torch emulates it ~10x slower than fp32) training runs in fp32 either way, with a warning when
            bf16 was asked for explicitly; `recovery_precision` in the card says which ran.
        eval_texts: held-out texts for perplexity before and after.
        eval_windows: at most this many evaluation windows.
        eval_seq_len: evaluation window length (default `seq_len`).
        data_name: how the card names the training data (default: the number of texts and tokens).
        callbacks: extra `TrainerCallback`s (e.g. a wall-time budget).
    """
    from peft import LoraConfig

    from ..evaluation import perplexity
    from ..state import get_pruning_state
    from .model import get_sparse_peft_model

    check_steps(steps)
    windows = training_windows(texts, tokenizer, seq_len)
    eval_seq_len = eval_seq_len or seq_len
    eval_ids = eval_token_ids(eval_texts, tokenizer, eval_seq_len)
    lora_config = lora_config or LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    peft_model = get_sparse_peft_model(model, lora_config)  # checks every input before any work
    ppl_before = None
    if eval_ids is not None:
        with peft_model.disable_adapter():
            ppl_before = perplexity(peft_model, input_ids=eval_ids, seq_len=eval_seq_len, max_windows=eval_windows)
        logger.info("held-out perplexity before recovery: %.3f", ppl_before)
    trainer = train_adapter(peft_model, windows, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                            seed=seed, bf16=bf16, callbacks=callbacks, output_dir=output_dir)
    merged = peft_model.merge_and_unload()
    state = get_pruning_state(merged)
    state.metrics.update(run_record("recovery", trainer, texts=texts, windows=windows, data_name=data_name,
                                    learning_rate=learning_rate))
    if eval_ids is not None:
        ppl_after = perplexity(merged, input_ids=eval_ids, seq_len=eval_seq_len, max_windows=eval_windows)
        logger.info("held-out perplexity after recovery: %.3f", ppl_after)
        state.metrics.update(recovery_perplexity_before=round(ppl_before, 3), recovery_perplexity_after=round(ppl_after, 3))
    return merged
