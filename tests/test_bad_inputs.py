"""Bad inputs outside the configs: token ids, non-finite weights, non-finite training, and the CLI's --set and
input files. Each is refused with a message that names the field or file, before any work, losing nothing."""

from __future__ import annotations

import json
import re

import pytest
import torch

from hf_prune import CoFiConfig, MagnitudeConfig, PruningTrainer, WandaConfig, oneshot
from hf_prune.cli import main

from cofi_helpers import ToyDataset, tiny_bert, training_args
from conftest import TINY_MODELS, VOCAB, random_texts


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _finite(t: torch.Tensor) -> torch.Tensor:
    """NaN and inf as fixed sentinels, so `torch.equal` compares tensors that hold them exactly."""
    return torch.nan_to_num(t, nan=7.0, posinf=8.0, neginf=-8.0)


def _unchanged(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("ids, message", [
    (torch.full((2, 16), VOCAB), rf"token id {VOCAB} \(window 0, position 0\) is outside the model's vocabulary: ids must be in \[0, {VOCAB}\)"),
    (torch.tensor([[1, 2, -3, 4] * 4]), rf"token id -3 \(window 0, position 2\) .* \[0, {VOCAB}\)"),
    ([[1, 2, 3] * 5 + [VOCAB + 7]], rf"token id {VOCAB + 7} \(window 0, position 15\)"),
    ([[1.0, 2.0, 3.0, 4.0] * 4], r"token id 1.0 \(row 0, position 0\) is a float; token ids must be integers"),
    ([[1, 2, True, 4] * 4], r"token id True \(row 0, position 2\) is a bool"),
    (torch.rand(2, 16), r"calibration token ids must be a 1-D or 2-D integer tensor, got torch.float32"),
])
def test_bad_token_ids_are_refused_before_pruning(ids, message):
    model = TINY_MODELS["llama"]()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        oneshot(model, WandaConfig(sparsity=0.5, max_seq_length=16), calibration=ids, show_progress=False)
    assert _unchanged(model, before)


# ------------------------------------------------------------------------------------- non-finite weights
@pytest.mark.parametrize("method", ["admm", "wanda", "magnitude", "sparsegpt"])
@pytest.mark.parametrize("where, value", [("model.layers.1.mlp.up_proj.weight", float("nan")),
                                          ("model.norm.weight", float("inf"))])
def test_non_finite_weights_are_refused_before_any_layer_is_touched(method, where, value, calibration_ids):
    from hf_prune import get_config_class

    model = TINY_MODELS["llama"]()
    with torch.no_grad():
        model.get_parameter(where)[0, ...].view(-1)[0] = value
    before = _snapshot(model)
    config = get_config_class(method)(sparsity=0.5, max_seq_length=32)
    with pytest.raises(ValueError, match=rf"non-finite \(NaN or inf\) values in 1 tensor\(s\): {where} \(1 of \d+\)\. Nothing was pruned"):
        oneshot(model, config, calibration=calibration_ids, show_progress=False)
    assert all(torch.equal(_finite(v), _finite(before[k])) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------------------- non-finite training
def test_training_stops_naming_the_step_and_part_when_the_loss_turns_nan(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(0)
    cfg = CoFiConfig(target_sparsity=0.5, sparsity_warmup_steps=0, finetune_steps=0)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=training_args(tmp_path, max_steps=6),
                             pruning_config=cfg, train_dataset=ToyDataset())
    original = trainer.pruning_plugin.compute_loss
    calls = {"n": 0}

    def poisoned(model, inputs, outputs, loss, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # from the third step on, the multiplier is NaN (e.g. an exploding controller)
            with torch.no_grad():
                trainer.pruning_plugin.gates.lambda_1.fill_(float("nan"))
        return original(model, inputs, outputs, loss, **kwargs)

    trainer.pruning_plugin.compute_loss = poisoned
    with pytest.raises(FloatingPointError, match=r"training stopped at step 3: the cofi loss is not finite \(nan\); "
                                                 r"non-finite parts: .*loss_lagrangian=nan.*lambda_1=nan"):
        trainer.train()


def test_nan_learning_rate_never_reaches_training():
    with pytest.raises(ValueError, match=r"CoFiConfig.gate_learning_rate must be a finite number, got nan"):
        CoFiConfig(gate_learning_rate=float("nan"))


# -------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(random_texts(8, seed=0)))
    return path


def _oneshot(model_dir, calib, out, *extra):
    return main(["oneshot", str(model_dir), "--method", "wanda", "--calibration", str(calib), "--seq-len", "32",
                 "--num-samples", "4", "--output", str(out), *extra])


def test_set_may_give_a_dedicated_field(model_dir, calib, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["oneshot", str(model_dir), "--method", "wanda", "--calibration", str(calib), "--output", str(out),
                 "--set", "sparsity=0.75", "--set", "num_calibration_samples=4", "--set", "max_seq_length=32"]) == 0
    weight = AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.up_proj.weight
    assert float((weight == 0).float().mean()) == 0.75


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.5", "--set", "sparsity=0.6"], r"--sparsity and --set sparsity= both set WandaConfig.sparsity; give it once"),
    (["--pattern", "2:4", "--set", "pattern=4:8"], r"--pattern and --set pattern= both set WandaConfig.pattern"),
    (["--sparsity", "0.5", "--set", "sparsity=abc"], r"--sparsity and --set sparsity= both"),
    (["--set", "sparsity=abc"], r"WandaConfig.sparsity must be a finite number or None, got 'abc'"),
    (["--set", "sparsity=NaN"], r"WandaConfig.sparsity must be a finite number or None, got nan"),
    (["--sparsity", "0.5", "--set", "mask_group=diagonal"], r"WandaConfig.mask_group must be one of \['layer', 'row'\], got 'diagonal'"),
    (["--sparsity", "0.5", "--set", "iterations=3"], r"--set iterations: not a field of WandaConfig; its fields: .*mask_group"),
    (["--sparsity", "0.5", "--set", "seed=1", "--set", "seed=2"], r"--set seed= is given twice"),
    (["--sparsity", "0.5", "--set", "=3"], r"--set expects KEY=VALUE, got '=3'"),
])
def test_bad_set_is_refused_before_loading(model_dir, calib, tmp_path, capsys, extra, message):
    import re

    assert _oneshot(model_dir, calib, tmp_path / "out", *extra) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert "Loading" not in captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, message", [
    ("calib.jsonl", '{"text": "a b c"}\n\n{"text": "d e"}\n{"text": oops}\n',
     r"--calibration '.*calib.jsonl' line 4: not valid JSON \(Expecting value, column 10\)"),
    ("calib.jsonl", '{"text": "a"}\n["a list"]\n', r"--calibration '.*calib.jsonl' line 2: expected a JSON object with a 'text' string"),
    ("calib.jsonl", "\n\n", r"--calibration '.*calib.jsonl' holds no text"),
    ("empty.txt", "  \n", r"--calibration '.*empty.txt' holds no text"),
])
def test_bad_calibration_file_is_named_before_loading(model_dir, tmp_path, capsys, name, content, message):
    import re

    path = tmp_path / name
    path.write_text(content)
    assert _oneshot(model_dir, path, tmp_path / "out", "--sparsity", "0.5") == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err), captured.err
    assert "Loading" not in captured.out


def test_non_utf8_calibration_is_named(model_dir, tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert _oneshot(model_dir, path, tmp_path / "out", "--sparsity", "0.5") == 2
    assert "latin1.txt' is not UTF-8 text" in capsys.readouterr().err


def test_magnitude_cli_needs_no_calibration_flags(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]["pruning"]["config"]
    assert config["num_calibration_samples"] == 128 and config["max_seq_length"] == 512  # the defaults
    assert isinstance(MagnitudeConfig.from_dict(config), MagnitudeConfig)


def test_pickle_serialization_is_refused(tmp_path):
    from export_utils import prune, tiny_model

    model = prune(tiny_model("llama"), "unstructured", 0.5)
    with pytest.raises(ValueError, match=r"hf_prune writes safetensors only; safe_serialization=False is not supported"):
        model.save_pretrained(tmp_path / "out", safe_serialization=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ class 15: no tokenizer in the model directory
@pytest.fixture
def bare_model_dir(model_dir, tmp_path):
    """The tiny checkpoint without any tokenizer file."""
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    return bare


def test_magnitude_runs_without_a_tokenizer(bare_model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["oneshot", str(bare_model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)]) == 0
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()


@pytest.mark.parametrize("extra, needed", [
    (["--method", "wanda", "--sparsity", "0.5", "--calibration", "CALIB"], r"to tokenise the --calibration text \(--method wanda\)"),
    (["--method", "magnitude", "--sparsity", "0.5", "--eval", "CALIB"], r"to tokenise the --eval text"),
])
def test_missing_tokenizer_is_named_with_the_fix(bare_model_dir, calib, tmp_path, capsys, extra, needed):
    import re

    out = tmp_path / "out"
    extra = [str(calib) if e == "CALIB" else e for e in extra]
    assert main(["oneshot", str(bare_model_dir), *extra, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"model directory '.*bare' has no tokenizer \(none of tokenizer.json, tokenizer_config.json, .*\), and "
                     rf"one is needed {needed}: pass --tokenizer PATH", err), err
    assert "install sentencepiece" not in err and not out.exists()


def test_tokenizer_flag_supplies_it_and_is_checked(bare_model_dir, model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["oneshot", str(bare_model_dir), "--method", "wanda", "--sparsity", "0.5", "--calibration", str(calib),
            "--seq-len", "32", "--num-samples", "4", "--output", str(out)]
    assert main([*args, "--tokenizer", str(model_dir)]) == 0
    assert (out / "tokenizer.json").is_file()
    assert main([*args, "--tokenizer", str(tmp_path), "--overwrite"]) == 2
    assert re.search(r"--tokenizer '.*' has no tokenizer", capsys.readouterr().err)
