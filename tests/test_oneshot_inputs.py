"""Calibration inputs of every accepted form, and every bad input rejected before any work."""

import pytest
import torch
from datasets import Dataset

from hf_prune import ADMMConfig, MagnitudeConfig, WandaConfig, get_pruning_state, oneshot
from hf_prune.oneshot.calibration import calibration_windows

from conftest import TINY_MODELS, random_texts, tiny_tokenizer


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_text_dataset_and_ids_give_the_same_windows():
    tok = tiny_tokenizer()
    texts = random_texts()
    from_texts = calibration_windows(texts, tok, num_samples=4, seq_len=64, seed=0)
    from_dataset = calibration_windows(Dataset.from_dict({"text": texts}), tok, num_samples=4, seq_len=64, seed=0)
    assert from_texts.shape == (4, 64) and torch.equal(from_texts, from_dataset)
    assert torch.equal(calibration_windows(from_texts, None, num_samples=4, seq_len=64), from_texts)
    ids_dataset = Dataset.from_dict({"input_ids": from_texts.tolist()})
    assert torch.equal(calibration_windows(ids_dataset, None, num_samples=4, seq_len=64), from_texts)
    # A different seed picks different windows; the same seed the same ones.
    assert not torch.equal(calibration_windows(texts, tok, num_samples=4, seq_len=64, seed=1), from_texts)


def test_oneshot_on_text_calibration():
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    oneshot(model, ADMMConfig(sparsity=0.5, num_calibration_samples=4, max_seq_length=64),
            calibration=random_texts(), tokenizer=tiny_tokenizer(), show_progress=False)
    state = get_pruning_state(model)
    assert state.metrics["calibration_samples"] == 4 and state.metrics["calibration_tokens"] == 256


def test_too_few_windows_warns_and_uses_what_there_is(caplog):
    with caplog.at_level("WARNING"):
        windows = calibration_windows(random_texts(2), tiny_tokenizer(), num_samples=100, seq_len=64)
    assert windows.shape == (6, 64) and "num_calibration_samples asked for 100" in caplog.text


@pytest.mark.parametrize(
    "calibration, tokenizer, error, message",
    [
        ([], "tok", ValueError, "calibration text is empty"),
        (["", "   "], "tok", ValueError, "calibration text is empty"),
        (["w1 w2 w3"], "tok", ValueError, r"calibration text is too short: 3 tokens, but one window needs ADMMConfig.max_seq_length=64"),
        (random_texts(), None, ValueError, "calibration is given as text, so `tokenizer=` is required"),
        (None, "tok", ValueError, "this method needs calibration data"),
        (Dataset.from_dict({"sentence": ["w1"]}), "tok", ValueError, r"expected a 'text' or 'input_ids' column"),
        (42, "tok", TypeError, "calibration must be a list of strings"),
    ],
)
def test_bad_calibration_raises_before_any_work(calibration, tokenizer, error, message):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    before = _snapshot(model)
    with pytest.raises(error, match=message):
        oneshot(model, ADMMConfig(sparsity=0.5, max_seq_length=64), calibration=calibration,
                tokenizer=tiny_tokenizer() if tokenizer else None, show_progress=False)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "config, message",
    [
        (WandaConfig(sparsity=0.5, targets=["qkv_proj"]), r"WandaConfig.targets: 'qkv_proj' matches no Linear module inside the transformer blocks \(model.layers.\*\)"),
        (WandaConfig(sparsity=0.5, ignore=["lm_head"]), r"WandaConfig.ignore: 'lm_head' matches no Linear module"),
        (WandaConfig(sparsity=0.5, sparsity_overrides={"attn.c_proj": 0.3}), r"WandaConfig.sparsity_overrides: 'attn.c_proj' matches no"),
        (WandaConfig(pattern="2:3"), r"WandaConfig.pattern '2:3': M=3 does not divide the input size 64 of model.layers.0.self_attn.q_proj"),
        (WandaConfig(sparsity=0.5, targets=["q_proj"], ignore=["q_proj"]), r"targets and ignore leave no module to prune"),
        (ADMMConfig(sparsity=0.5, mask_mode="fixed"), r"mask_mode='fixed' needs masks= with a keep-mask for every target"),
    ],
)
def test_bad_model_specific_config_raises_before_any_work(config, message, calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        oneshot(model, config, calibration=calibration_ids, show_progress=False)
    assert _unchanged(model, before)


def test_masks_only_with_fixed_mode_and_right_shape(calibration_ids):
    model = TINY_MODELS["llama"]()
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"masks= is only used by ADMMConfig\(mask_mode='fixed'\)"):
        oneshot(model, ADMMConfig(sparsity=0.5), calibration=calibration_ids, masks={name: torch.ones(64, 64, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"masks\['model.layers.0.self_attn.q_proj'\] has shape \(3, 3\), expected \(64, 64\)"):
        oneshot(model, ADMMConfig(sparsity=0.5, mask_mode="fixed", targets=["q_proj"]), calibration=calibration_ids,
                masks={name: torch.ones(3, 3, dtype=torch.bool)})


def test_unsupported_model_names_supported_families(calibration_ids):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match=r"supports .*GPT-2.*LLaMA.*OPT.* models .* got T5ForConditionalGeneration with model_type='t5'"):
        oneshot(model, MagnitudeConfig(sparsity=0.5))
    with pytest.raises(ValueError, match=r"got Sequential with model_type=None"):
        oneshot(torch.nn.Sequential(torch.nn.Linear(4, 4)), MagnitudeConfig(sparsity=0.5))


def test_non_oneshot_config_is_a_type_error():
    with pytest.raises(TypeError, match="oneshot\\(\\) takes a one-shot config"):
        oneshot(TINY_MODELS["llama"](), object())


# ------------------------------------------------------------------ class 14: huge calibration text, bounded memory
_BOUNDED_MEMORY_SCRIPT = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[2])
from conftest import tiny_tokenizer
from hf_prune.evaluation import perplexity
from hf_prune.oneshot.calibration import calibration_windows
from hf_prune.text_files import TextFiles

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

tok, out = tiny_tokenizer(), {}
for name in ("one_line.txt", "one_record.jsonl", "dir"):
    source = TextFiles(sys.argv[1] + "/" + name, "calibration")
    before = peak_mb()
    source.check()
    windows = calibration_windows(source, tok, num_samples=4, seq_len=32)
    out[name] = dict(shape=list(windows.shape), growth_mb=peak_mb() - before, first=windows[0, :4].tolist())
# an in-memory string as big: the tokenisation adds little on top of the string itself
text = open(sys.argv[1] + "/one_line.txt").read()
before = peak_mb()
windows = calibration_windows([text], tok, num_samples=4, seq_len=32)
out["in_memory"] = dict(shape=list(windows.shape), growth_mb=peak_mb() - before, first=windows[0, :4].tolist())
del text
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64))
before = peak_mb()
ppl = perplexity(model, TextFiles(sys.argv[1] + "/one_line.txt", "eval"), tok, seq_len=32, max_windows=2,
                 show_progress=False)
out["eval"] = dict(growth_mb=peak_mb() - before, finite=ppl == ppl)
print(json.dumps(out))
"""


def test_huge_one_line_calibration_file_is_read_only_as_far_as_the_windows_need(tmp_path):
    """A 64 MB one-line file (also as one 64 MB .jsonl record, and in a directory) with 4 windows of 32 tokens: the
    peak memory grows by a few MB (tokenising it whole took ~1.3 GB for 5 MB with a real tokenizer)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    unit = " ".join(f"w{i % 127 + 1}" for i in range(1000)) + " "
    text = unit * (64_000_000 // len(unit))
    (tmp_path / "one_line.txt").write_text(text)
    (tmp_path / "one_record.jsonl").write_text(json.dumps({"text": text[: 20_000_000]}) + "\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text(text[:30_000_000])
    del text
    tests = str(Path(__file__).parent)
    result = subprocess.run([sys.executable, "-c", _BOUNDED_MEMORY_SCRIPT, str(tmp_path), tests],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("one_line.txt", "dir", "in_memory"):
        assert out[name]["shape"] == [4, 32], name
        assert out[name]["growth_mb"] < 100, (name, out[name])
    assert out["one_line.txt"]["first"] == out["dir"]["first"] == out["in_memory"]["first"]
    # the .jsonl record is parsed whole (it is one JSON value), then tokenised in bounded pieces
    assert out["one_record.jsonl"]["shape"] == [4, 32] and out["one_record.jsonl"]["growth_mb"] < 250
    assert out["eval"]["finite"] and out["eval"]["growth_mb"] < 100, out["eval"]


def test_windows_of_a_normal_text_are_those_of_tokenising_it_whole():
    """Text shorter than the bounded pool gives exactly the windows of the whole-text rule (tokenise all, draw
    non-overlapping windows with the seeded permutation)."""
    tok = tiny_tokenizer()
    texts = random_texts(8, words=150)  # 1,200 tokens, under the pool of 8 * 5 * 32
    ids = torch.tensor(tok("\n\n".join(texts), add_special_tokens=False)["input_ids"])
    available = ids.numel() // 32
    starts = torch.randperm(available, generator=torch.Generator().manual_seed(3))[:5].sort().values * 32
    expected = torch.stack([ids[s : s + 32] for s in starts.tolist()])
    assert torch.equal(calibration_windows(texts, tok, num_samples=5, seq_len=32, seed=3), expected)


def test_windows_come_from_the_first_pool_of_tokens_whatever_follows(monkeypatch):
    """The documented bound: windows are drawn from the first POOL_FACTOR * num_samples * seq_len tokens (at least
    MIN_POOL_TOKENS, lowered here so the test text can pass it), so text appended after them changes nothing (and is
    never read)."""
    import importlib

    calibration = importlib.import_module("hf_prune.oneshot.calibration")  # `hf_prune.oneshot` is the function
    monkeypatch.setattr(calibration, "MIN_POOL_TOKENS", 0)
    POOL_FACTOR = calibration.POOL_FACTOR

    tok = tiny_tokenizer()
    head = random_texts(1, words=POOL_FACTOR * 2 * 16, seed=4)[0]
    tail = random_texts(1, words=5000, seed=5)[0]
    short = calibration_windows([head], tok, num_samples=2, seq_len=16, seed=0)
    longer = calibration_windows([head + " " + tail], tok, num_samples=2, seq_len=16, seed=0)
    assert torch.equal(short, longer)
    assert not torch.equal(calibration_windows([tail], tok, num_samples=2, seq_len=16, seed=0), short)


def test_pieces_are_cut_between_words_so_tokens_match_whole_tokenisation(monkeypatch):
    """A text far longer than one tokenizer call is cut before whitespace: the same ids as one call on it whole."""
    import importlib

    import hf_prune.text_files as text_files
    from hf_prune.oneshot.calibration import tokenize_texts

    calibration = importlib.import_module("hf_prune.oneshot.calibration")  # `hf_prune.oneshot` is the function

    monkeypatch.setattr(calibration, "TOKENIZE_CHARS", 97)
    monkeypatch.setattr(calibration, "CHUNK_CHARS", 61)
    monkeypatch.setattr(text_files, "CHUNK_CHARS", 61)
    tok = tiny_tokenizer()
    texts = random_texts(5, words=120, seed=6)
    texts[2] = texts[2].replace(" ", "   \n ", 7)  # whitespace runs across cuts
    whole = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    assert tokenize_texts(texts, tok).tolist() == whole
    assert tokenize_texts(texts, tok, max_tokens=50).tolist() == whole[:50]


def test_text_files_stream_txt_jsonl_and_directories(tmp_path, monkeypatch):
    import hf_prune.text_files as text_files
    from hf_prune.text_files import TextFiles, read_texts

    (tmp_path / "a.txt").write_text("w1 w2 w3 w4 w5 w6 w7")
    (tmp_path / "b.jsonl").write_text('{"text": "w8 w9"}\n\n{"text": "w10"}\n')
    (tmp_path / "c.md").write_text("ignored")
    source = TextFiles(tmp_path, "calibration", chunk_chars=5)
    pieces = list(source)
    assert pieces[0] == ("w1 w2", True) and all(not starts for _, starts in pieces[1:4])
    assert "".join(p for p, _ in pieces[:4]) == "w1 w2 w3 w4 w5 w6 w7"
    assert read_texts(tmp_path, "calibration") == ["w1 w2 w3 w4 w5 w6 w7", "w8 w9", "w10"]
    monkeypatch.setattr(text_files, "MAX_JSONL_LINE_CHARS", 20)
    (tmp_path / "b.jsonl").write_text('{"text": "w8 w9"}\n{"text": "' + "w1 " * 10 + '"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl' line 2 is longer than 20 characters; .* split it into several "
                                         r"records or give the text as .txt"):
        list(TextFiles(tmp_path / "b.jsonl", "calibration"))


def test_bad_json_past_the_checked_prefix_is_named_when_reached(tmp_path):
    from hf_prune.text_files import TextFiles

    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "w1 w2 w3 w4"}\n' * 20 + "{oops\n")
    source = TextFiles(path, "calibration", chunk_chars=64)
    source.check()  # only the first 64 characters are checked up front
    with pytest.raises(ValueError, match=r"--calibration '.*calib.jsonl' line 21: not valid JSON"):
        calibration_windows(source, tiny_tokenizer(), num_samples=100, seq_len=4)
