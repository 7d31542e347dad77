"""`hf-prune eval` / `hf_prune.evaluate_lm`: lm-evaluation-harness on an hf_prune checkpoint, on a local task."""

import json

import pytest
import torch

from hf_prune.cli import main
from hf_prune.evaluation import harness_card_entries
from hf_prune.evaluation.local_tasks import wiki_cloze_rows, write_local_task
from hf_prune.export.summary import card_eval_results

from conftest import TINY_MODELS, random_texts, tiny_tokenizer

pytest.importorskip("lm_eval")


def _tokenizer_with_eos():
    tok = tiny_tokenizer()
    tok.eos_token = "[UNK]"  # lm-eval scores continuations of an empty context after bos/eos
    return tok


@pytest.fixture
def pruned_dir(model_dir, tmp_path):
    """A magnitude-pruned tiny LLaMA saved the hf_prune way (compressed), with a perplexity in its card."""
    _tokenizer_with_eos().save_pretrained(model_dir)
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("\n".join(json.dumps({"text": t}) for t in random_texts(4, seed=1)))
    out = tmp_path / "pruned"
    assert main(["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--eval", str(evaluation),
                 "--seq-len", "32", "--output", str(out)]) == 0
    return out


def _cloze_rows(model, tok, n=6):
    """`n` cloze rows over the tiny tokenizer's words: the even ones end in the model's greedy next word, the odd ones
    in another word, so lm-eval's acc on the first k rows is known exactly."""
    rows = []
    for i in range(100):
        context = " ".join(f"w{(7 * i + j) % 120 + 1}" for j in range(10))
        with torch.no_grad():
            greedy = int(model(tok(context, return_tensors="pt").input_ids).logits[0, -1].argmax())
        if greedy == 0:  # [UNK]: not a word
            continue
        target = greedy if len(rows) % 2 == 0 else greedy % (len(tok) - 1) + 1
        rows.append({"context": context, "target": f"w{target}"})
        if len(rows) == n:
            return rows
    raise AssertionError("too few contexts with a word as greedy continuation")


def _load(directory):
    import hf_prune  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


@pytest.fixture
def tiny_task(pruned_dir, tmp_path):
    """Six cloze rows for the pruned model, as an lm-eval task YAML + JSONL (even rows: its greedy word)."""
    return write_local_task(tmp_path / "tasks", "tiny_cloze", _cloze_rows(*_load(pruned_dir)))


def test_eval_cli_scores_local_task_and_records_it_in_the_card(pruned_dir, tiny_task, capsys):
    task_dir = tiny_task
    weights = {p.name: p.read_bytes() for p in pruned_dir.glob("*.safetensors")}
    config = (pruned_dir / "config.json").read_bytes()
    out_json = pruned_dir.parent / "results.json"
    code = main(["eval", str(pruned_dir), "--tasks", "tiny_cloze", "--include-path", str(task_dir),
                 "--batch-size", "2", "--limit", "4", "--write-card", "--output-json", str(out_json)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    results = json.loads(out_json.read_text())
    acc = results["results"]["tiny_cloze"]["acc,none"]
    assert results["n-samples"]["tiny_cloze"] == {"original": 6, "effective": 4}
    assert acc == 0.5  # rows 0 and 2 end in the decoded pruned model's greedy word, rows 1 and 3 do not
    assert "tiny_cloze" in printed and "acc" in printed
    # the card: the perplexity entry kept, the lm-eval ones added (the limit as a split slice); weights untouched
    entries = card_eval_results(pruned_dir)
    assert [e["metric_type"] for e in entries if e["dataset_name"] == "eval.jsonl"] == ["perplexity"]
    (entry,) = [e for e in entries if e["metric_type"] == "acc"]
    assert entry["metric_value"] == round(acc, 4) and entry["dataset_split"] == "test[:4]"
    assert entry["dataset_name"] == "tiny_cloze" and entry["source_name"] == "lm-evaluation-harness"
    assert sum(e["dataset_name"] == "tiny_cloze" for e in entries) == 2  # acc and perplexity of the target
    card = (pruned_dir / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "| text-generation | tiny_cloze | acc |" in card
    assert {p.name: p.read_bytes() for p in pruned_dir.glob("*.safetensors")} == weights
    assert (pruned_dir / "config.json").read_bytes() == config
    # a second run replaces its own entries instead of adding more
    assert main(["eval", str(pruned_dir), "--tasks", "tiny_cloze", "--include-path", str(task_dir), "--limit", "4",
                 "--write-card"]) == 0
    assert len(card_eval_results(pruned_dir)) == len(entries)
    assert not list(pruned_dir.glob(".README.md.*"))


def test_evaluate_lm_in_memory_model_and_card_entries(tmp_path):
    from hf_prune import evaluate_lm

    torch.manual_seed(0)
    model, tok = TINY_MODELS["llama"]().eval(), _tokenizer_with_eos()
    task_dir = write_local_task(tmp_path / "tasks", "tiny_cloze", _cloze_rows(model, tok, n=5))
    results = evaluate_lm(model, ["tiny_cloze"], tokenizer=tok, include_path=task_dir, num_fewshot=0)
    assert results["n-samples"]["tiny_cloze"] == {"original": 5, "effective": 5}
    assert results["results"]["tiny_cloze"]["acc,none"] == pytest.approx(3 / 5)
    entries = harness_card_entries(results)
    assert {e["metric_type"] for e in entries} == {"acc", "perplexity"}
    acc = next(e for e in entries if e["metric_type"] == "acc")
    assert acc["dataset_split"] == "test" and acc["dataset_type"] == "tiny_cloze"  # local file: no Hub dataset id
    assert acc["metric_value"] == 0.6


def test_eval_bad_inputs_are_refused_before_loading(pruned_dir, tiny_task, tmp_path, capsys):
    from hf_prune import evaluate_lm

    task_dir = tiny_task
    readme = (pruned_dir / "README.md").read_text()
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "tiny_cloze"]) == 2
    assert "checkpoint directory" in capsys.readouterr().err
    assert main(["eval", str(pruned_dir), "--tasks", "tiny_clozze", "--include-path", str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'tiny_clozze' (did you mean tiny_cloze" in err
    assert main(["eval", str(pruned_dir), "--tasks", "tiny_cloze", "--include-path", str(tmp_path / "nope")]) == 2
    assert "is not a directory of lm-eval task YAML files" in capsys.readouterr().err
    assert main(["eval", str(pruned_dir), "--tasks", "tiny_cloze", "--batch-size", "two"]) == 2
    assert "--batch-size must be an integer or 'auto'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        evaluate_lm(TINY_MODELS["llama"](), "tiny_cloze", tokenizer=_tokenizer_with_eos(), write_card=True)
    with pytest.raises(ValueError, match="limit must be a positive number"):
        evaluate_lm(pruned_dir, "tiny_cloze", include_path=task_dir, limit=0)
    assert (pruned_dir / "README.md").read_text() == readme


def test_eval_missing_extra_names_it(pruned_dir, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", str(pruned_dir), "--tasks", "hellaswag"]) == 2
    assert "pip install 'hf_prune[eval]'" in capsys.readouterr().err


def test_wiki_cloze_rows_take_the_last_word_of_long_paragraphs():
    long = " ".join(["word"] * 45)
    articles = [("A", f"'''Bold''' {long} ends with Paris.\nshort paragraph ends here.\n{long} ends with 1999."),
                ("B", f"{long} then a well-known name.")]
    rows = wiki_cloze_rows(articles, max_context_words=20)
    assert [(r["title"], r["target"]) for r in rows] == [("A", "Paris"), ("B", "name")]
    assert rows[0]["context"].split()[-3:] == ["word", "ends", "with"] and len(rows[0]["context"].split()) == 20
    assert "'''" not in " ".join(r["context"] for r in rows)
    with pytest.raises(ValueError, match="row 0: needs a 'context' string"):
        write_local_task("/tmp", "bad_task", [{"context": "x"}])
