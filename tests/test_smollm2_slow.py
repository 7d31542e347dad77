"""Real-model checks on SmolLM2-135M and real Wikipedia text (slow: about 3 minutes on 2 CPU cores)."""

import copy

import pytest

pytestmark = pytest.mark.slow

# Measured on 2026-11-23 with this test's settings (16 x 256 calibration tokens, 8 x 512 evaluation tokens):
# dense 20.0, ADMM-50 % 35.9 (1.79x dense), magnitude-50 % 407. 2.0x leaves ~12 % headroom for float differences
# between machines, yet fails if ADMM's weight update stops working (magnitude's mask alone is 20x dense).
BOUND_ADMM_50 = 2.0


@pytest.fixture(scope="module")
def smollm2_windows(smollm2):
    from hf_prune.oneshot.calibration import calibration_windows, tokenize_texts

    calib = calibration_windows(smollm2.calibration, smollm2.tokenizer, num_samples=16, seq_len=256, seed=0)
    eval_ids = tokenize_texts(smollm2.held_out, smollm2.tokenizer)[: 8 * 512]
    return smollm2.model, calib, eval_ids


def test_wikipedia_split_is_disjoint_and_large_enough():
    from hf_prune.assets import wikipedia_articles, wikipedia_split

    articles = wikipedia_articles()
    calibration, evaluation = wikipedia_split()
    assert len(articles) > 100 and not any(t.lower().startswith("#redirect") for _, t in articles)
    assert len(calibration) + len(evaluation) == len(articles)
    assert not set(calibration) & set(evaluation)
    assert sum(map(len, evaluation)) > 16_000 * 3  # comfortably over 16k tokens at ~4 characters per token


def test_admm_50_keeps_perplexity_close_and_beats_magnitude(smollm2_windows):
    from hf_prune import ADMMConfig, MagnitudeConfig, get_pruning_state, oneshot
    from hf_prune.evaluation import perplexity

    dense, calib, eval_ids = smollm2_windows
    ppl = {"dense": perplexity(dense, input_ids=eval_ids, seq_len=512, show_progress=False)}
    for name, config in {
        "admm": ADMMConfig(sparsity=0.5, num_calibration_samples=16, max_seq_length=256),
        "magnitude": MagnitudeConfig(sparsity=0.5),
    }.items():
        model = copy.deepcopy(dense)
        oneshot(model, config, calibration=calib, show_progress=False)
        state = get_pruning_state(model)
        assert len(state.module_sparsity) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 blocks
        assert state.overall_sparsity == pytest.approx(0.5, abs=1e-4)
        ppl[name] = perplexity(model, input_ids=eval_ids, seq_len=512, show_progress=False)
    print("SmolLM2 perplexity:", ppl)
    assert 15 < ppl["dense"] < 25  # the dequantised checkpoint is sane (about 20 on these articles)
    assert ppl["admm"] < ppl["magnitude"]
    assert ppl["admm"] < BOUND_ADMM_50 * ppl["dense"]
