"""`hf-prune recover`: masked-LoRA recovery of a pruned checkpoint from the shell, merged with the exact mask."""

import pytest
import torch

pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_prune import get_pruning_state  # noqa: E402
from hf_prune.cli import main  # noqa: E402

from conftest import TINY_MODELS, random_texts, tiny_tokenizer  # noqa: E402


def test_cli_recover_keeps_mask_and_records_recovery(tmp_path, capsys):
    torch.manual_seed(0)
    dense = tmp_path / "model"
    TINY_MODELS["llama"]().save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(random_texts(8, seed=0)))
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert main(["oneshot", str(dense), "--method", "wanda", "--pattern", "2:4", "--calibration", str(text),
                 "--seq-len", "64", "--num-samples", "8", "--output", str(pruned)]) == 0
    held_out = tmp_path / "eval.txt"
    held_out.write_text("\n\n".join(random_texts(4, seed=1)))
    code = main(["recover", str(pruned), "--data", str(text), "--steps", "4", "--seq-len", "64", "--batch-size", "2",
                 "--rank", "4", "--eval", str(held_out), "--output", str(recovered)])
    assert code == 0, capsys.readouterr()
    before = AutoModelForCausalLM.from_pretrained(pruned)
    after = AutoModelForCausalLM.from_pretrained(recovered)
    changed = False
    for (name, p), (_, q) in zip(before.named_parameters(), after.named_parameters()):
        if ".layers." in name and name.endswith("proj.weight"):
            assert torch.equal(p != 0, q != 0), name
            changed |= not torch.equal(p, q)
    assert changed
    card = (recovered / "README.md").read_text()
    assert "recovery_steps | 4" in card and "masked LoRA" in card and "recovery_data | train.txt" in card
    assert "Method `wanda`" in card  # the pruning config stays beside the recovery
    metrics = get_pruning_state(after).metrics
    before_ppl, after_ppl = metrics["recovery_perplexity_before"], metrics["recovery_perplexity_after"]
    assert f"recovery_perplexity_before | {before_ppl}" in card and f"| perplexity | {after_ppl} |" in card
    assert f"{before_ppl:.3f} before recovery -> {after_ppl:.3f} after" in capsys.readouterr().out


def test_cli_recover_refuses_a_dense_checkpoint(tmp_path, capsys):
    dense = tmp_path / "model"
    TINY_MODELS["llama"]().save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    text = tmp_path / "train.txt"
    text.write_text("\n\n".join(random_texts(4, seed=0)))
    code = main(["recover", str(dense), "--data", str(text), "--steps", "2", "--output", str(tmp_path / "out")])
    assert code == 2
    assert "peft.get_peft_model" in capsys.readouterr().err
