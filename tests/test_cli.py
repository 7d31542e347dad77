import json

import pytest
import torch

from hf_prune.cli import main

from conftest import TINY_MODELS, random_texts, tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model"
    TINY_MODELS["llama"]().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_files(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(random_texts(8, seed=0)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("\n".join(json.dumps({"text": t}) for t in random_texts(4, seed=1)))
    return calib, evaluation


def test_cli_oneshot_prunes_saves_and_reports(model_dir, text_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    calib, evaluation = text_files
    out = tmp_path / "out"
    code = main(["oneshot", str(model_dir), "--method", "admm", "--pattern", "2:4", "--calibration", str(calib),
                 "--eval", str(evaluation), "--seq-len", "64", "--num-samples", "8", "--output", str(out),
                 "--set", "iterations=10", "--set", "mask_iterations=8"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "perplexity:" in printed and "sparsity 0.5000" in printed and str(out.resolve()) in printed
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.model.layers[1].mlp.down_proj.weight
    assert bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "1.5"], "ADMMConfig.sparsity must be a number in the open interval (0, 1), got 1.5"),
        (["--method", "cofi_nonexistent"], "Unknown pruning method 'cofi_nonexistent'"),
        (["--sparsity", "0.5", "--set", "rho"], "--set expects KEY=VALUE"),
        (["--sparsity", "0.5", "--calibration", "/nonexistent/calib.txt"], "--calibration: no such file or directory"),
    ],
)
def test_cli_errors_name_the_field_and_write_nothing(model_dir, text_files, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    args = ["oneshot", str(model_dir), "--output", str(out)]
    if "--calibration" not in extra:
        args += ["--calibration", str(text_files[0])]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_non_empty_output_without_overwrite(model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)])
    assert code == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
