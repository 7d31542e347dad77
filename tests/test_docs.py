"""The documentation: the strict site build, the generated CLI reference, and every Python block of README.md and
docs/getting-started.md run as a user would paste it (on tiny models here, on the real assets in the slow test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES_WITH_RUNNABLE_BLOCKS = ["README.md", "docs/getting-started.md"]
NEEDS_ASSETS = "<!-- needs-assets -->"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """`(line, code, needs_assets)` for every ```python block; `needs_assets` when the line before the fence is the
    `<!-- needs-assets -->` marker."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1), before == NEEDS_ASSETS))
    return blocks


def run_blocks(path: Path, blocks, workdir: Path) -> None:
    """Runs the blocks in order, each in a fresh namespace, in `workdir` (later blocks may read what earlier ones
    saved, as a reader following the page would); a failure names the page and the block's line."""
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for line, code, _ in blocks:
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__main__"})
            except Exception:
                pytest.fail(f"the ```python block at {path.relative_to(ROOT)}:{line} failed:\n{traceback.format_exc()}")
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------------------------------------------
# The site and the CLI reference
# --------------------------------------------------------------------------------------------------------------


def test_mkdocs_build_strict(tmp_path):
    if not (_has_module("mkdocs") and _has_module("mkdocstrings_handlers.python") and _has_module("material")):
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "api" / "oneshot" / "index.html").read_text().count("ADMMConfig") > 0


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_cli_reference_is_generated_from_the_parser():
    from hf_prune.cli_docs import generate

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == generate(), "docs/cli.md is out of date: run `python -m hf_prune.cli_docs`"


def test_cli_reference_holds_every_option_of_every_help_page(capsys):
    from hf_prune.cli import build_parser

    page = (ROOT / "docs" / "cli.md").read_text()
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    helps = [parser.format_help()] + [command.format_help() for command in sub.choices.values()]
    for name in sub.choices:
        assert f"\n## {name}\n" in page
    options = {opt for text in helps for opt in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text)}
    assert {"--method", "--offload", "--int8", "--per-module", "--create-pr", "--bf16"} <= options
    missing = sorted(opt for opt in options if f"`{opt}`" not in page)
    assert not missing, f"options in --help but not in docs/cli.md: {missing}"


def test_readme_is_a_short_front_door_with_the_ci_command_unchanged():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, f"README.md has {len(readme.splitlines())} lines; move detail to docs/"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command == 'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q -rs --durations=15'
    assert ci_command in readme
    assert not re.search(r"this session|\bissue \d+", readme, re.I)
    for section in ("## Installation", "## Quickstart", "## Results", "## License", "## Citation"):
        assert f"\n{section}\n" in readme


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert "docs/getting-started.md" in local
    assert not [t for t in local if not (ROOT / t).exists()], "README.md links to missing files"


def test_blocks_are_found_and_the_marker_is_read():
    readme = python_blocks(ROOT / "README.md")
    assert len(readme) >= 6
    assert readme[0][2] is True, "the README's first snippet needs the real assets and must be marked"
    assert "smollm2_path" in readme[0][1] and "wikipedia_split" in readme[0][1]


# --------------------------------------------------------------------------------------------------------------
# Python blocks on tiny models
# --------------------------------------------------------------------------------------------------------------

WORDS = 120


def _tokenizer():
    """Word-level tokenizer over made-up words with pad and unk tokens, built locally."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")


def _texts(n: int, words: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{int(i)}" for i in torch.randint(2, WORDS, (words,), generator=g)) for _ in range(n)]


@pytest.fixture
def tiny_assets(tmp_path, monkeypatch):
    """`hf_prune.assets` answering with tiny models built from config and random word texts."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    import hf_prune.assets as assets

    torch.manual_seed(0)
    llama = tmp_path / "assets" / "llama"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=WORDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=True,
    )).save_pretrained(llama)
    _tokenizer().save_pretrained(llama)
    bert = tmp_path / "assets" / "bert"
    BertModel(BertConfig(vocab_size=WORDS, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=128)).save_pretrained(bert)
    _tokenizer().save_pretrained(bert)
    sentences = _texts(64, 12, seed=3)
    monkeypatch.setattr(assets, "smollm2_path", lambda: str(llama))
    monkeypatch.setattr(assets, "minilm_path", lambda: str(bert))
    monkeypatch.setattr(assets, "wikipedia_split", lambda: (_texts(12, 500, seed=1), _texts(4, 500, seed=2)))
    monkeypatch.setattr(assets, "rotten_tomatoes", lambda seed=0: {
        "train": [(s, i % 2) for i, s in enumerate(sentences[:48])],
        "test": [(s, i % 2) for i, s in enumerate(sentences[48:])],
    })
    work = tmp_path / "work"
    work.mkdir()
    return work


# What each page's blocks leave behind: proof that they ran, not only that they raised nothing.
EXPECTED_OUTPUTS = {
    "README.md": ["smollm2-admm-50/model.safetensors", "smollm2-admm-50-copy/README.md",
                  "smollm2-recovered/model.safetensors", "cofi-60/config.json", "dynsparse-90/model.safetensors",
                  "smollm2-admm-50-onnx/model.onnx"],
    "docs/getting-started.md": ["smollm2-wanda-50/model.safetensors", "smollm2-wanda-50/README.md"],
}


@pytest.mark.parametrize("page", PAGES_WITH_RUNNABLE_BLOCKS)
def test_python_blocks_run_on_tiny_models(page, tiny_assets):
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no ```python block"
    run_blocks(ROOT / page, blocks, tiny_assets)
    for name in EXPECTED_OUTPUTS[page]:
        assert (tiny_assets / name).is_file(), f"{page}'s blocks did not write {name}"


@pytest.mark.slow
def test_python_blocks_that_need_assets_run_on_the_real_assets(tmp_path):
    """The marked blocks (the first snippets) as a new user pastes them: real SmolLM2-135M and Wikipedia text."""
    for page in PAGES_WITH_RUNNABLE_BLOCKS:
        blocks = [b for b in python_blocks(ROOT / page) if b[2]]
        work = tmp_path / Path(page).stem
        work.mkdir()
        run_blocks(ROOT / page, blocks, work)
        saved = [name for name in EXPECTED_OUTPUTS[page] if (work / name).is_file()]
        assert saved, f"{page}'s marked blocks saved none of {EXPECTED_OUTPUTS[page]}"
