"""`distill`: logit distillation of a (smaller) student from a dense teacher on plain text, with `PruningTrainer`."""

from __future__ import annotations

import logging
import tempfile

from ..state import get_pruning_state, record_training
from .distill_config import DistillationConfig
from .text_data import check_steps, eval_token_ids, lm_examples, run_record, text_training_args, training_windows

logger = logging.getLogger(__name__)

def check_dense_student(model) -> None:
    """Refuses a sparse hf_prune student: full-weight training would fill its zeros (structured ones are fine)."""
    state = get_pruning_state(model)
    if state is not None and state.layout != "structured":
        raise ValueError(
            f"the student is {state.layout}-sparse ({state.config.method}); distillation trains every weight and would "
            "fill its zeros. Distil a structured (physically smaller) or plain student, or recover a sparse one with "
            "masked LoRA (hf_prune.peft.recover.recover / `hf-prune recover`), which keeps the mask"
        )


def distill(student, teacher, texts, tokenizer, *, steps: int, config: DistillationConfig | None = None,
            seq_len: int = 512, batch_size: int = 4, grad_accum: int = 1, learning_rate: float = 1e-4, seed: int = 0,
            bf16: bool | str = False, eval_texts=None, eval_windows: int | None = None, eval_seq_len: int | None = None,
            data_name: str | None = None, teacher_name: str | None = None, callbacks=None,
            output_dir: str | None = None, resume_from_checkpoint: str | bool | None = None, **training_args):
    """Trains `student` for `steps` on non-overlapping `seq_len`-token windows of `texts` to match `teacher`'s
    next-token distributions ([`PruningTrainer`] with `pruning_config=None`), and returns it (trained in place).

    The run is recorded for the model card (in the student's `PruningState` when it has one, else in a plain record
    that [`save_pruned`] writes): `distillation_data`, `_teacher`, `_steps`, `_tokens`, `_seq_len`,
    `_learning_rate`, `_temperature`, `_alpha`, the last logged `kd_loss` and, with `eval_texts`, the held-out
    perplexity before and after (`distillation_perplexity_before` / `_after`) and the teacher's.

    Args:
        student: a causal LM (plain, or structured-pruned by hf_prune); a sparse hf_prune model is refused.
        teacher: the dense causal LM to distil from, with the same vocabulary; frozen and moved to the training device.
        texts: training texts (never the held-out ones).
        tokenizer: the tokenizer both models share.
        steps: optimizer steps.
        config ([`DistillationConfig`], *optional*): temperature, LM-loss mix, hidden-state loss (default: logit KL).
        grad_accum: gradient accumulation steps (tokens per step: batch_size x grad_accum x seq_len).
        bf16 (`bool` or `"auto"`): train under bf16 autocast (the weights stay in their dtype) where the hardware
            runs bf16 natively; on a CPU without it, fp32 with a warning (`distillation_precision` in the card).
        eval_texts: held-out texts for perplexity before and after.
        eval_windows: at most this many evaluation windows; eval_seq_len: their length (default `seq_len`).
        data_name, teacher_name: how the card names the training data and the teacher (defaults: counts, and the
            teacher's `name_or_path`).
        callbacks: extra `TrainerCallback`s; output_dir: the Trainer's output directory (default: a temporary one).
        resume_from_checkpoint (`str` or `bool`, *optional*): as `Trainer.train`'s: a checkpoint directory, or `True`
            for the newest `checkpoint-*` in `output_dir` (the run must write them: `save_strategy="steps"`,
            `save_steps=N`). The resumed run ends where the uninterrupted one would (same schedule, data order, RNG).
        training_args: any other `TrainingArguments` field (e.g. `logging_steps`, `max_grad_norm`).
    """
    from transformers import default_data_collator

    from ..evaluation import perplexity
    from .trainer import PruningTrainer

    config = config or DistillationConfig()
    check_steps(steps)
    check_dense_student(student)
    windows = training_windows(texts, tokenizer, seq_len)
    eval_seq_len = eval_seq_len or seq_len
    eval_ids = eval_token_ids(eval_texts, tokenizer, eval_seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        args = text_training_args(output_dir or tmp, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                  seed=seed, bf16=bf16, grad_accum=grad_accum, purpose="distillation",
                                  device=student.device, **training_args)
        # checks the teacher (identity, vocabulary, hidden sizes) before any work, and moves it to the device
        trainer = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=None,
                                 distillation_config=config, train_dataset=lm_examples(windows),
                                 data_collator=default_data_collator, callbacks=callbacks)
        student.to(args.device)
        record = {"distillation_teacher": teacher_name or getattr(teacher, "name_or_path", None) or type(teacher).__name__,
                  "distillation_teacher_params": sum(p.numel() for p in teacher.parameters())}
        if eval_ids is not None:
            ppl = {who: perplexity(m, input_ids=eval_ids, seq_len=eval_seq_len, max_windows=eval_windows)
                   for who, m in (("teacher", teacher), ("before", student))}
            logger.info("held-out perplexity: teacher %.3f, student before distillation %.3f", ppl["teacher"], ppl["before"])
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    student = trainer.export_pruned_model()  # the config's own `use_cache` back (Trainer turned it off)
    record.update(run_record("distillation", trainer, texts=texts, windows=windows, data_name=data_name,
                             learning_rate=learning_rate, loss_key="kd_loss"))
    record.update(distillation_temperature=config.temperature, distillation_alpha=config.alpha)
    if config.hidden_state_weight:
        record["distillation_hidden_state_weight"] = config.hidden_state_weight
    if eval_ids is not None:
        after = perplexity(student, input_ids=eval_ids, seq_len=eval_seq_len, max_windows=eval_windows)
        logger.info("held-out perplexity after distillation: %.3f", after)
        record.update(distillation_perplexity_before=round(ppl["before"], 3), distillation_perplexity_after=round(after, 3),
                      distillation_teacher_perplexity=round(ppl["teacher"], 3))
    record_training(student, record)
    return student
