"""Tiny BERT models and a toy classification dataset for the CoFi tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

torch.set_num_threads(1)  # tiny models: extra threads only add contention on shared CI cores


def tiny_config(**overrides) -> BertConfig:
    kw = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    kw.update(overrides)
    return BertConfig(**kw)


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_config(**overrides))


class ToyDataset(torch.utils.data.Dataset):
    """Label = whether token 5 occurs in the sequence (learnable by a tiny BERT)."""

    def __init__(self, n: int = 64, length: int = 12, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(6, 64, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        pos = torch.randint(1, length, (n,), generator=g)
        self.ids[self.labels == 1, pos[self.labels == 1]] = 5
        self.ids[:, 0] = 1
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.mask[::3, -3:] = 0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def random_gates(plugin, seed: int = 0, scale: float = 3.0) -> None:
    """Draws every gate logit of a `CoFiPlugin` from N(0, scale^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in plugin.gates.gates.values():
            gate.log_alpha.copy_(torch.randn(gate.log_alpha.shape, generator=g) * scale)


def training_args(out, **kw) -> TrainingArguments:
    """Short, quiet, deterministic CPU `TrainingArguments` for the tiny models."""
    base = dict(
        output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=2, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=7, data_seed=7, dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


# ---------------------------------------------------------------------------------------------- decoders (LLaMA)
def tiny_llama_config(model_type: str = "llama", **overrides):
    """Tiny LLaMA-family config with GQA (8 query heads in 4 KV groups of 2) and tied embeddings."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-6,
    )
    kw.update(overrides)
    config = AutoConfig.for_model(model_type, **kw)
    config.head_dim = kw["head_dim"]  # Qwen2 configs do not declare it; its attention reads it when set
    return config


def tiny_llama(seed: int = 0, model_type: str = "llama", **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(model_type, **overrides))
    with torch.no_grad():  # non-trivial norm weights, so that folding a wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


class ToyLMDataset(torch.utils.data.Dataset):
    """Token sequences with a learnable pattern (each token often followed by its successor mod 64)."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 64, (n, 1), generator=g)
        noise = (torch.rand(n, length, generator=g) < 0.3).long() * torch.randint(0, 64, (n, length), generator=g)
        self.ids = (start + torch.arange(length) + noise) % 64

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


# (target fields, error) pairs that CoFi and structured one-shot refuse on `tiny_llama()` (4 layers, 8 query / 4 KV
# heads, hidden 32): both entry points share one check (`methods.cofi.targets.check_arch_fits`)
ARCH_TARGETS_THE_TINY_LLAMA_CANNOT_HAVE = [
        ({"target_layers": 5}, r"target_layers=5 is larger than the model \(num_hidden_layers=4\)"),
        ({"target_heads": 10}, r"target_heads=10 is larger than the model \(num_attention_heads=8\)"),
        ({"target_kv_heads": 6}, r"target_kv_heads=6 is larger than the model \(num_key_value_heads=4\)"),
        ({"target_intermediate_size": 64}, r"target_intermediate_size=64 is larger than the model"),
        ({"target_hidden_size": 33}, r"target_hidden_size=33 is larger than the model \(hidden_size=32\)"),
        ({"target_heads": 3}, r"target_heads=3 does not divide into the model's KV groups: each of its 4 KV heads "
                              r"serves 2 query heads .* allowed: \[2, 4, 6, 8\]"),
]
