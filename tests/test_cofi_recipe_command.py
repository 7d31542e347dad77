"""The CoFi recipe records the command that was actually run (its card's "Reproduce" section), flags as given."""

import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "integrations"))

import cofi_minilm_sentiment as recipe  # noqa: E402

RECIPE = "python integrations/cofi_minilm_sentiment.py"


def test_command_is_the_parsed_arguments_as_given(monkeypatch):
    argv = ["--targets", "0.9", "--attention-layer-variants", "1", "--output", "runs/it's here"]
    monkeypatch.setattr(sys, "argv", ["integrations/cofi_minilm_sentiment.py", *argv])
    args = recipe.parse_args()
    assert args.command == f"{RECIPE} --targets 0.9 --attention-layer-variants 1 --output 'runs/it'\"'\"'s here'"
    assert shlex.split(args.command)[2:] == argv  # runs again as it is
    assert "--attention-layers" not in shlex.split(args.command)
    assert args.attention_layer_variants == [1] and args.attention_layers is None


def test_command_run_from_another_script_names_both(monkeypatch):
    # as benchmarks/cofi_minilm.py does: its own command line, the recipe's arguments built from it
    monkeypatch.setattr(sys, "argv", ["benchmarks/cofi_minilm.py", "--label", "short"])
    args = recipe.parse_args(["--no-distill-ablation", "--attention-layer-variants", "1", "2"])
    recipe_part, outer = args.command.split("  # run by: ")
    assert recipe_part == f"{RECIPE} --no-distill-ablation --attention-layer-variants 1 2"
    assert outer == "python benchmarks/cofi_minilm.py --label short"


def test_no_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["integrations/cofi_minilm_sentiment.py"])
    assert recipe.parse_args().command == RECIPE
