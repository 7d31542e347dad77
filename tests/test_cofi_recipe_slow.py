"""The CoFi recipe end to end on the real MiniLM-L6 and Rotten Tomatoes sentences, shortened (slow: ~1-2 min)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integrations"))

import cofi_minilm_sentiment as recipe  # noqa: E402

SHORT = ["--max-train", "96", "--max-test", "64", "--teacher-epochs", "1", "--cofi-epochs", "4", "--targets", "0.5",
         "--warmup", "0.3", "--finetune", "0.25"]


def test_recipe_teacher_cofi_export_reload_and_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    results = recipe.main(SHORT + ["--output", out])
    (run,) = results["runs"]
    assert run["name"] == "cofi-50" and run["train_steps"] == 12
    assert 0.0 < run["sparsity"] < 1.0
    # the export keeps the masked model's predictions, so the two accuracies agree
    assert run["accuracy"] == pytest.approx(run["masked_model_accuracy"], abs=1 / 64)
    with open(os.path.join(out, "results.json")) as fh:
        assert json.load(fh)["runs"][0]["accuracy"] == run["accuracy"]
    card = open(os.path.join(out, "cofi-50", "README.md")).read()
    assert "accuracy" in card and "Rotten Tomatoes" in card
    # the card's "Reproduce" section holds the arguments this run was given, as given
    assert recipe.run_command(SHORT + ["--output", out]) in card

    # fresh process: the saved export loads with the stock Auto class and reproduces the recorded accuracy
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, "integrations")!r})
        import hf_prune, cofi_minilm_sentiment as r
        from hf_prune.methods.cofi import describe_structure
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({os.path.join(out, "cofi-50")!r}).eval()
        tok = AutoTokenizer.from_pretrained({os.path.join(out, "cofi-50")!r})
        _, test = r.load_data(tok, 0, 64, 96, 64)
        right = 0
        with torch.no_grad():
            for row in test:
                ids = torch.tensor([row["input_ids"]])
                right += int(model(input_ids=ids).logits.argmax(-1).item() == row["labels"])
        print(right / len(test), describe_structure(model)["hidden_size"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    acc, hidden = proc.stdout.split()[-2:]
    assert float(acc) == pytest.approx(run["accuracy"], abs=1e-9)
    assert int(hidden) == run["structure"]["hidden_size"]

    # a second call with the same settings reuses both the teacher and the finished run
    capsys.readouterr()
    again = recipe.main(SHORT + ["--output", out])
    assert "cofi-50: reusing the finished run" in capsys.readouterr().out
    assert again["runs"][0]["accuracy"] == run["accuracy"]
    # ... and any changed setting does not match the finished run
    changed = recipe.run_settings(recipe.parse_args(SHORT + ["--gate-lr", "0.2"]), 0.5, True, None)
    assert changed != run["settings"]
    assert run["settings"]["attention_layers"] is None  # free by default, as in the paper
    assert recipe.parse_args(SHORT + ["--attention-layers", "3"]).attention_layers == 3
    assert recipe.parse_args(SHORT + ["--attention-layers", "none"]).attention_layers is None
