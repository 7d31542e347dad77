"""Shared helpers of the DynSparse tests: tiny models from config and a training loop."""

import torch

VOCAB = 128


def tiny_bert_mlm(seed=0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    ))


MODELS = {"bert": tiny_bert_mlm, "llama": tiny_llama}


def batch(seed, n=4, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


class ToyMLMData(torch.utils.data.Dataset):
    """32 random sequences of 16 tokens (labels = inputs) for the tiny models."""

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return {k: v[0] for k, v in batch(i, n=1).items()}


def check_masks_hold(updater):
    """Every inactive block of every sparse weight is exactly zero; active counts are the fixed budget."""
    for name, module in updater.modules.items():
        mask = updater.masks[name]
        assert mask.num_active() == updater.num_active[name], name
        blocks = mask.blocked(module.weight.detach()).abs().amax(dim=(1, 3))
        assert torch.all(blocks[~mask.mask] == 0), f"{name}: inactive block holds non-zero weights"
        nonzero_blocks = blocks != 0
        assert torch.all(mask.mask | ~nonzero_blocks), name
