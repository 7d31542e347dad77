import os

import pytest
import torch

# Nothing in the test-suite may reach the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB = 128


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ))


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
    ))


def tiny_opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    ))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128,
    ))


TINY_MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "opt": tiny_opt, "bert": tiny_bert}


@pytest.fixture
def calibration_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (16, 32), generator=generator)


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB made-up words ("w0" ... ), built locally (no Hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def random_texts(n_texts=8, words=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        " ".join(f"w{int(i)}" for i in torch.randint(1, VOCAB, (words,), generator=generator)) for _ in range(n_texts)
    ]


@pytest.fixture
def model_dir(tmp_path):
    """A tiny LLaMA checkpoint directory with its tokenizer, as the CLI reads one."""
    torch.manual_seed(0)
    path = tmp_path / "model"
    TINY_MODELS["llama"]().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def hub():
    """A Hub-compatible server on loopback (`tests/hub_server.py`), for push / `from_pretrained(repo_id)` tests."""
    from hub_server import HubServer

    with HubServer(max_lifetime_s=180) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2():
    """The shipped SmolLM2-135M, loaded once for every slow test: `path`, `tokenizer`, the dense fp32 `model` (eval
    mode; a test that changes it works on `copy.deepcopy(smollm2.model)`), and the Wikipedia `calibration` /
    `held_out` articles (disjoint)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.assets import smollm2_path, wikipedia_split

    path = smollm2_path()
    calibration, held_out = wikipedia_split()
    return SimpleNamespace(path=path, tokenizer=AutoTokenizer.from_pretrained(path),
                           model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
                           calibration=calibration, held_out=held_out)
