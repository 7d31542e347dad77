import json

import pytest
import torch

from hf_prune.cli import main

from conftest import random_texts


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
    # the compressed export with its card (perplexity as model-index) and the tokenizer
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "hf_prune"
    assert config["quantization_config"]["layout"] == "2:4"
    card = (out / "README.md").read_text()
    assert "hf_prune:model-card" in card and "perplexity" in card and "hf-prune oneshot" in card
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    assert "x dense)" in printed


def test_cli_info_prints_method_sparsity_and_verification(model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.75", "--output", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--per-module"]) == 0
    printed = capsys.readouterr().out
    assert "Method: magnitude" in printed and "Files verified: yes" in printed
    assert "model.layers.0.self_attn.q_proj" in printed and "0.7500 / 0.7500" in printed
    assert main(["info", str(out), "--json"]) == 0
    desc = json.loads(capsys.readouterr().out)
    assert desc["layout"] == "unstructured" and desc["verified"] is True
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_cli_dense_export_loads_as_plain_checkpoint(model_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--dense",
                 "--output", str(out)]) == 0
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_cli_bad_repo_id_is_refused_before_work(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out),
                 "--push-to-hub", "not a//repo"])
    assert code == 2 and "--push-to-hub 'not a//repo' is not a valid repo id" in capsys.readouterr().err
    assert not out.exists()


def test_cli_push_uploads_export_and_card(model_dir, tmp_path):
    from export_utils import run_python
    from hub_server import HubServer

    out = tmp_path / "out"
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)]) == 0
    with HubServer(max_lifetime_s=120) as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        code = f"import sys; from hf_prune.cli import main; sys.exit(main(['push', {str(out)!r}, 'me/cli-push']))"
        proc = run_python(code, env=env, timeout=100)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "pushed" in proc.stdout
        assert hub.file("me/cli-push", "README.md").decode() == (out / "README.md").read_text()
        assert {"config.json", "model.safetensors"} <= set(hub.repos["me/cli-push"].branches["main"])


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


def test_cli_offload_streams_the_same_export(model_dir, text_files, tmp_path, capsys):
    from safetensors.torch import load_file

    calib, evaluation = text_files
    common = ["--method", "wanda", "--sparsity", "0.5", "--calibration", str(calib), "--seq-len", "64",
              "--num-samples", "8", "--device", "cpu"]
    assert main(["oneshot", str(model_dir), *common, "--output", str(tmp_path / "mem")]) == 0
    assert main(["oneshot", str(model_dir), *common, "--output", str(tmp_path / "off"), "--offload"]) == 0
    printed = capsys.readouterr().out
    assert "(offloaded)" in printed and "block by block" in printed
    expected = load_file(tmp_path / "mem" / "model.safetensors")
    got = {k: v for f in sorted((tmp_path / "off").glob("model-*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    card = (tmp_path / "off" / "README.md").read_text()
    assert "--offload" in card
    assert (tmp_path / "off" / "tokenizer_config.json").is_file()
    code = main(["oneshot", str(model_dir), *common, "--output", str(tmp_path / "x"), "--offload", "--eval",
                 str(evaluation)])
    assert code == 2 and "--eval" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_offload_resumes_an_interrupted_run(model_dir, text_files, tmp_path, capsys, monkeypatch):
    from hf_prune.oneshot import offload

    calib, _ = text_files
    common = ["oneshot", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", str(calib),
              "--seq-len", "32", "--num-samples", "4", "--device", "cpu", "--offload"]
    loaded = []
    original = offload.OffloadedCheckpoint.load_block

    def load_block(self, index):
        loaded.append(index)
        if index == 1 and loaded.count(1) == 1:
            raise OSError("interrupted")
        return original(self, index)

    monkeypatch.setattr(offload.OffloadedCheckpoint, "load_block", load_block)
    assert main([*common, "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.hf_prune-partial" / "resume.json").is_file()
    code = main([*common, "--sparsity", "0.6", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "sparsity=0.5 -> 0.6" in err and "--restart" in err
    assert main([*common, "--output", str(tmp_path / "out")]) == 0
    assert loaded == [0, 1, 1]  # the rerun continued at block 1
    assert main([*common, "--output", str(tmp_path / "x"), "--restart"]) == 0
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output",
                 str(tmp_path / "y"), "--restart"]) == 2
    assert "needs --offload" in capsys.readouterr().err
