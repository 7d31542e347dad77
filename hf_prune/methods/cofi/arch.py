"""Where CoFi's units live in a model: one adapter per architecture family.

The rest of the CoFi code only talks to an adapter (the Q/K/V/O, FFN up/down and LayerNorm modules of layer `l`, the
embeddings, the task-head linears that read the encoder's hidden states), so supporting another family (e.g.
LLaMA-style decoders, Sheared-LLaMA) means adding an adapter, not touching the algorithm.
"""

from __future__ import annotations

from torch import nn

from .sparsity import EncoderDims

# model_type -> classes CoFi knows how to prune and rebuild (the task head's input linears are known for these)
_BERT_FAMILY = {
    "bert": ("BertForSequenceClassification", "BertModel"),
    "roberta": ("RobertaForSequenceClassification", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaForSequenceClassification", "XLMRobertaModel"),
}


def supported_architectures() -> list[str]:
    return sorted(c for classes in _BERT_FAMILY.values() for c in classes)


class BertFamilyAdapter:
    """BERT-style post-LayerNorm encoders (BERT, MiniLM, RoBERTa, XLM-R) with a sequence-classification head."""

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        cls_name = type(model).__name__
        if model_type not in _BERT_FAMILY or cls_name not in _BERT_FAMILY[model_type]:
            raise ValueError(
                f"CoFi does not support this architecture: model is a {cls_name} (model_type={model_type!r}); "
                f"supported: {supported_architectures()}"
            )
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError(f"CoFi supports encoders only; {cls_name} has is_decoder/add_cross_attention set")
        self.model = model
        self.model_type = model_type
        self.base = model.base_model
        self.layers = self.base.encoder.layer
        self.dims = EncoderDims(
            num_layers=len(self.layers),
            num_heads=int(config.num_attention_heads),
            head_dim=int(config.hidden_size) // int(config.num_attention_heads),  # what BertSelfAttention uses
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
        )

    # ------------------------------------------------------------------------------------------------ modules
    def embedding_tables(self) -> dict[str, nn.Embedding]:
        emb = self.base.embeddings
        names = ("word_embeddings", "position_embeddings", "token_type_embeddings")
        return {n: getattr(emb, n) for n in names if isinstance(getattr(emb, n, None), nn.Embedding)}

    def embedding_layernorm(self) -> nn.LayerNorm:
        return self.base.embeddings.LayerNorm

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].attention

    def qkv(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        s = self.layers[layer].attention.self
        return s.query, s.key, s.value

    def attn_out(self, layer: int) -> nn.Linear:
        return self.layers[layer].attention.output.dense

    def attn_layernorm(self, layer: int) -> nn.LayerNorm:
        return self.layers[layer].attention.output.LayerNorm

    def ffn_act_module(self, layer: int) -> nn.Module:
        """Module whose output is the FFN activation (the neuron gates multiply it)."""
        return self.layers[layer].intermediate

    def ffn_up(self, layer: int) -> nn.Linear:
        return self.layers[layer].intermediate.dense

    def ffn_down(self, layer: int) -> nn.Linear:
        return self.layers[layer].output.dense

    def ffn_layernorm(self, layer: int) -> nn.LayerNorm:
        return self.layers[layer].output.LayerNorm

    def attn_block(self, layer: int) -> nn.Module:
        """Module called as `(sublayer_output, residual)` that adds the residual and normalises (post-LN)."""
        return self.layers[layer].attention.output

    def ffn_block(self, layer: int) -> nn.Module:
        return self.layers[layer].output

    def kept_heads(self, layer: int) -> int:
        """Heads left in `layer` of a (possibly pruned) model; 0 for a removed attention sublayer."""
        if getattr(self.layers[layer].attention, "removed", False):
            return 0
        return self.attn_out(layer).in_features // self.dims.head_dim

    def kept_neurons(self, layer: int) -> int:
        """FFN width left in `layer` of a (possibly pruned) model; 0 for a removed FFN sublayer."""
        if getattr(self.layers[layer].intermediate, "removed", False):
            return 0
        return self.ffn_up(layer).out_features

    def layernorms(self) -> list[nn.LayerNorm]:
        out = [self.embedding_layernorm()]
        for i in range(self.dims.num_layers):
            out += [self.attn_layernorm(i), self.ffn_layernorm(i)]
        return out

    def head_inputs(self) -> list[tuple[nn.Module, str]]:
        """(parent, attribute) of every Linear outside the encoder that reads the encoder's hidden states."""
        out = []
        pooler = getattr(self.base, "pooler", None)
        if pooler is not None:
            out.append((pooler, "dense"))
        classifier = getattr(self.model, "classifier", None)
        if self.model_type != "bert" and classifier is not None and hasattr(classifier, "dense"):
            out.append((classifier, "dense"))  # RoBERTa-style head reads hidden_states[:, 0]
        return out

    def prunable_weight_count(self) -> int:
        """Direct count of the prunable weight matrices' elements (Q, K, V, O, FFN up/down of every layer)."""
        total = 0
        for i in range(self.dims.num_layers):
            if self.kept_heads(i):
                total += sum(lin.weight.numel() for lin in (*self.qkv(i), self.attn_out(i)))
            if self.kept_neurons(i):
                total += self.ffn_up(i).weight.numel() + self.ffn_down(i).weight.numel()
        return total


def get_adapter(model: nn.Module) -> BertFamilyAdapter:
    return BertFamilyAdapter(model)
