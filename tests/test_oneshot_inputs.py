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
