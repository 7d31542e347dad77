"""Logit distillation of a smaller student from a dense teacher: `PruningTrainer(pruning_config=None, teacher_model=)`,
`hf_prune.distill` and `hf-prune distill` (loss, logging, resume, DDP, saved checkpoint and card, bad inputs)."""

import json
import math

import pytest
import torch

from cofi_helpers import ToyLMDataset, tiny_llama, training_args
from conftest import VOCAB, random_texts, tiny_tokenizer
from torchrun_helpers import run_two_ranks

from hf_prune import CoFiConfig, DistillationConfig, PruningTrainer
from hf_prune.training.distill_losses import proportional_layer_pairs, token_prediction_loss


def _pair(**student_overrides):
    """A tiny dense LLaMA teacher (4 layers) and a smaller student (2 layers, FFN 24 instead of 48)."""
    return tiny_llama(0), tiny_llama(1, **{"num_hidden_layers": 2, "intermediate_size": 24, **student_overrides})


def _kl(student, teacher, batch, temperature=1.0):
    with torch.no_grad():
        return float(token_prediction_loss(student(input_ids=batch).logits, teacher(input_ids=batch).logits, temperature))


def _trainer(tmp_path, student, teacher, config=None, **kw):
    args = training_args(tmp_path, **{"max_steps": 8, "learning_rate": 1e-2, "logging_steps": 1, **kw})
    return PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=None,
                          distillation_config=config, train_dataset=ToyLMDataset())


def test_distillation_lowers_the_kl_on_a_fixed_batch_and_freezes_the_teacher(tmp_path):
    teacher, student = _pair()
    batch = ToyLMDataset().ids[:8]
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    before = _kl(student, teacher, batch)
    trainer = _trainer(tmp_path, student, teacher)
    trainer.train()
    after = _kl(student.eval(), teacher, batch)
    assert after < 0.7 * before, (before, after)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_logged_kd_loss_and_the_mix_with_the_lm_loss(tmp_path, alpha):
    teacher, student = _pair()
    trainer = _trainer(tmp_path, student, teacher, DistillationConfig(temperature=2.0, alpha=alpha), max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "kd_loss" in h]
    assert len(logs) == 2
    for h in logs:  # per step (logging_steps=1, no accumulation): loss = alpha * KD + (1 - alpha) * LM
        assert h["kd_loss"] > 0 and math.isfinite(h["lm_loss"])
        assert h["loss"] == pytest.approx(alpha * h["kd_loss"] + (1 - alpha) * h["lm_loss"], rel=1e-4)


def test_first_kd_loss_is_the_kl_of_the_first_batch(tmp_path):
    teacher, student = _pair()
    trainer = _trainer(tmp_path, student, teacher, DistillationConfig(temperature=3.0), max_steps=1)
    batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
    expected = _kl(student, teacher, batch, temperature=3.0)
    trainer.train()
    assert trainer.state.log_history[0]["kd_loss"] == pytest.approx(expected, rel=1e-5)


def test_hidden_state_loss_is_an_option_for_equal_widths(tmp_path):
    assert proportional_layer_pairs(2, 4) == [(1, 2), (2, 4)]
    assert proportional_layer_pairs(3, 3) == [(1, 1), (2, 2), (3, 3)]
    teacher, student = _pair()
    trainer = _trainer(tmp_path, student, teacher, DistillationConfig(hidden_state_weight=0.5), max_steps=2)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "hidden_state_loss" in h]
    assert len(logs) == 2 and all(h["hidden_state_loss"] > 0 for h in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["kd_loss"] + 0.5 * logs[0]["hidden_state_loss"], rel=1e-4)


def _resumable(tmp_path, name, resume=None, save_steps=None, student_seed=1):
    teacher, student = tiny_llama(0), tiny_llama(student_seed, num_hidden_layers=2, intermediate_size=24)
    kw = dict(max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    trainer = _trainer(tmp_path / name, student, teacher, DistillationConfig(temperature=2.0, alpha=0.5), **kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    full = _resumable(tmp_path, "full")
    _resumable(tmp_path, "part", save_steps=3)
    checkpoint = tmp_path / "part" / "checkpoint-3"
    assert checkpoint.is_dir()
    # a differently initialised student: only the checkpoint's weights (and optimizer, RNG) make the runs meet
    resumed = _resumable(tmp_path, "resumed", resume=str(checkpoint), student_seed=9)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    initial = tiny_llama(1, num_hidden_layers=2, intermediate_size=24).state_dict()
    assert not torch.equal(a["model.layers.0.mlp.down_proj.weight"], initial["model.layers.0.mlp.down_proj.weight"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_two_process_ddp_distillation_keeps_the_ranks_equal(tmp_path):
    r0, r1 = run_two_ranks("distill_ddp_worker.py", tmp_path, timeout=300)
    assert r0["steps"] == r1["steps"] == 4
    assert len(r0["kd"]) == 4 and all(v > 0 for v in r0["kd"])
    initial = tiny_llama(1, num_hidden_layers=2, intermediate_size=24).state_dict()
    moved = False
    for name, value in r0["state"].items():
        torch.testing.assert_close(value, r1["state"][name], atol=0, rtol=0, msg=name)
        moved |= not torch.equal(value, initial[name])
    assert moved


# ------------------------------------------------------------------------------------------------- bad inputs
def test_bad_teachers_are_refused_before_training(tmp_path):
    teacher, student = _pair()
    args = training_args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="teacher_model is the student model itself"):
        PruningTrainer(model=student, teacher_model=student, args=args, pruning_config=None)
    other_vocab = tiny_llama(2, vocab_size=80)
    with pytest.raises(ValueError, match="teacher's vocabulary has 80 entries but the student's 64"):
        PruningTrainer(model=student, teacher_model=other_vocab, args=args, pruning_config=None)
    with pytest.raises(ValueError, match="shares 1 parameter tensor"):
        shallow = tiny_llama(3, num_hidden_layers=2, intermediate_size=24)
        shallow.model.norm = student.model.norm
        PruningTrainer(model=student, teacher_model=shallow, args=args, pruning_config=None)
    narrow = tiny_llama(4, hidden_size=16, head_dim=4)
    with pytest.raises(ValueError, match="hidden_state_weight=1.0 compares hidden states, but the student's hidden_size "
                                         "is 32 and the teacher's 16"):
        PruningTrainer(model=student, teacher_model=narrow, args=args, pruning_config=None,
                       distillation_config=DistillationConfig(hidden_state_weight=1.0))
    with pytest.raises(ValueError, match="distillation_config was given without a teacher_model"):
        PruningTrainer(model=student, args=args, pruning_config=None, distillation_config=DistillationConfig())
    with pytest.raises(ValueError, match="method 'cofi' sets its distillation .* in CoFiConfig"):
        PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=CoFiConfig(target_sparsity=0.5),
                       distillation_config=DistillationConfig())


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0}, "DistillationConfig.temperature must be > 0, got 0"),
    ({"alpha": 1.5}, r"DistillationConfig.alpha must be in \[0, 1\]"),
    ({"hidden_state_weight": -1}, "DistillationConfig.hidden_state_weight must be >= 0"),
    ({"temperature": float("nan")}, "DistillationConfig.temperature must be a finite number"),
])
def test_bad_distillation_fields_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**kwargs)


def test_an_lm_mix_without_labels_is_refused(tmp_path):
    teacher, student = _pair()

    class NoLabels(ToyLMDataset):
        def __getitem__(self, i):
            return {k: v for k, v in super().__getitem__(i).items() if k != "labels"}

    args = training_args(tmp_path, max_steps=1, logging_steps=1)
    pure = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=None, train_dataset=NoLabels())
    pure.train()  # distillation alone needs no labels
    assert "lm_loss" not in pure.state.log_history[0] and pure.state.log_history[0]["kd_loss"] > 0
    mixed = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=None, train_dataset=NoLabels(),
                           distillation_config=DistillationConfig(alpha=0.5))
    with pytest.raises(ValueError, match=r"alpha=0.5 mixes in the student's LM loss, but the batch has no `labels`"):
        mixed.train()


# ----------------------------------------------------------------------------------------------------- the CLI
def _tiny_causal_lm(layers, intermediate, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=intermediate,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128))


@pytest.fixture
def checkpoints(tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    _tiny_causal_lm(2, 128, 0).save_pretrained(teacher)
    _tiny_causal_lm(1, 64, 1).save_pretrained(student)
    for path in (teacher, student):
        tiny_tokenizer().save_pretrained(path)
    (tmp_path / "train.txt").write_text("\n\n".join(random_texts(8, seed=0)))
    (tmp_path / "eval.txt").write_text("\n\n".join(random_texts(4, seed=1)))
    return tmp_path


def test_cli_distill_round_trip_saves_a_plain_checkpoint_with_its_card(checkpoints, capsys):
    from transformers import AutoModelForCausalLM

    from hf_prune.cli import main

    out = checkpoints / "distilled"
    code = main(["distill", str(checkpoints / "student"), "--teacher", str(checkpoints / "teacher"), "--data",
                 str(checkpoints / "train.txt"), "--steps", "3", "--seq-len", "32", "--batch-size", "2",
                 "--grad-accum", "2", "--learning-rate", "1e-3", "--temperature", "2", "--eval",
                 str(checkpoints / "eval.txt"), "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 1  # plain: loads without hf_prune
    before = AutoModelForCausalLM.from_pretrained(checkpoints / "student")
    after = AutoModelForCausalLM.from_pretrained(out)
    assert type(after).__name__ == "LlamaForCausalLM"
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))
    card = (out / "README.md").read_text()
    for row in ("distillation_steps | 3", "distillation_tokens | 384", "distillation_data | train.txt",
                f"distillation_teacher | {checkpoints / 'teacher'}", "distillation_temperature | 2.0",
                "distillation_seq_len | 32", "hf-prune distill"):
        assert row in card, row
    assert "distilled from teacher" in card
    ppl_before, ppl_after = (float(card.split(f"distillation_perplexity_{w} | ")[1].split(" ")[0])
                             for w in ("before", "after"))
    assert f"{ppl_before:.3f} before distillation -> {ppl_after:.3f} after" in printed.out
    assert (out / "tokenizer.json").is_file()


def test_cli_distill_resumes_from_its_checkpoint_dir_and_ends_where_the_uninterrupted_run_ends(checkpoints, capsys):
    import shutil

    from safetensors.torch import load_file

    from hf_prune.cli import main

    def run(out):
        return main(["distill", str(checkpoints / "student"), "--teacher", str(checkpoints / "teacher"), "--data",
                     str(checkpoints / "train.txt"), "--steps", "4", "--seq-len", "32", "--batch-size", "2",
                     "--learning-rate", "1e-3", "--checkpoint-dir", str(checkpoints / "ck"), "--save-steps", "2",
                     "--output", str(checkpoints / out)])

    assert run("whole") == 0
    assert sorted(p.name for p in (checkpoints / "ck").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert "resuming" not in capsys.readouterr().out
    shutil.rmtree(checkpoints / "ck" / "checkpoint-4")  # as if the run had been stopped during step 3
    assert run("resumed") == 0
    assert "resuming from the newest checkpoint in" in capsys.readouterr().out
    whole, resumed = (load_file(checkpoints / d / "model.safetensors") for d in ("whole", "resumed"))
    student = load_file(checkpoints / "student" / "model.safetensors")
    assert set(whole) == set(resumed)
    assert not torch.equal(whole["model.layers.0.mlp.down_proj.weight"], student["model.layers.0.mlp.down_proj.weight"])
    for k in whole:
        torch.testing.assert_close(whole[k], resumed[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("flags, message", [
    (["--save-steps", "2"], "--save-steps needs --checkpoint-dir"),
    (["--checkpoint-dir", "CK", "--save-steps", "0"], "--save-steps must be >= 1, got 0"),
    (["--checkpoint-dir", "STUDENT"], "--checkpoint-dir must be a directory of its own, not STUDENT_DIR"),
    (["--checkpoint-dir", "FILE"], "is a file, not a directory"),
])
def test_cli_distill_refuses_bad_checkpoint_flags_before_loading(checkpoints, capsys, flags, message):
    from hf_prune.cli import main

    where = {"CK": str(checkpoints / "ck"), "STUDENT": str(checkpoints / "student"),
             "FILE": str(checkpoints / "train.txt")}
    code = main(["distill", str(checkpoints / "student"), "--teacher", str(checkpoints / "teacher"), "--data",
                 str(checkpoints / "train.txt"), "--steps", "2", "--output", str(checkpoints / "out"),
                 *[where.get(f, f) for f in flags]])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (checkpoints / "out").exists() and not (checkpoints / "ck").exists()


@pytest.mark.parametrize("case, message", [
    ("missing_teacher", "--teacher: no such checkpoint directory"),
    ("same", "STUDENT_DIR and --teacher are the same checkpoint"),
    ("vocab", "teacher's vocabulary has 200 entries but the student's 128"),
])
def test_cli_distill_refuses_bad_inputs_before_loading(checkpoints, capsys, case, message):
    from transformers import LlamaConfig

    from hf_prune.cli import main

    teacher = checkpoints / "teacher"
    if case == "missing_teacher":
        teacher = checkpoints / "nowhere"
    elif case == "same":
        teacher = checkpoints / "student"
    else:
        config = LlamaConfig.from_pretrained(teacher)
        config.vocab_size = 200
        config.save_pretrained(teacher)  # a wrong config alone: refused before any weight is read
    code = main(["distill", str(checkpoints / "student"), "--teacher", str(teacher), "--data",
                 str(checkpoints / "train.txt"), "--steps", "1", "--output", str(checkpoints / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (checkpoints / "out").exists()


def test_distill_refuses_a_sparse_student(calibration_ids):
    from hf_prune import WandaConfig, distill, oneshot
    from conftest import TINY_MODELS

    teacher = TINY_MODELS["llama"]()
    sparse = oneshot(TINY_MODELS["llama"](), WandaConfig(sparsity=0.5), calibration=calibration_ids)
    with pytest.raises(ValueError, match="the student is unstructured-sparse .*masked LoRA"):
        distill(sparse, teacher, random_texts(2), tiny_tokenizer(), steps=1, seq_len=32)
