"""Where CoFi's units live in a model: one adapter per architecture family.

The rest of the CoFi code only talks to an adapter (the Q/K/V/O, FFN up/down and LayerNorm modules of layer `l`, the
embeddings, the task-head linears that read the encoder's hidden states), so supporting another family means adding
an adapter. Two families: BERT-style post-LayerNorm encoders ([`BertFamilyAdapter`], `kind = "encoder"`) and
LLaMA-style pre-RMSNorm decoders with GQA and a gated FFN ([`LlamaFamilyAdapter`], `kind = "decoder"`: LLaMA,
Mistral, Qwen2, Qwen3), pruned the Sheared-LLaMA way (Xia et al., 2023).
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


# LLaMA-style decoders: same module layout (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, two RMSNorms per layer)
_LLAMA_FAMILY = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
}


def supported_architectures() -> list[str]:
    return sorted(c for family in (_BERT_FAMILY, _LLAMA_FAMILY) for classes in family.values() for c in classes)


def _unsupported(model: nn.Module) -> ValueError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return ValueError(
        f"CoFi does not support this architecture: model is a {type(model).__name__} (model_type={model_type!r}); "
        f"supported: {supported_architectures()}"
    )


class _AdapterBase:
    """What both families share: the direct parameter count, written once over `qkv` / `attn_out` / `ffn_in` /
    `ffn_down` and the kept-unit counts."""

    def prunable_weight_count(self) -> int:
        """Direct count of the prunable weight matrices' elements (Q, K, V, O and the FFN matrices of every layer)."""
        total = 0
        for i in range(self.dims.num_layers):
            if self.kept_heads(i):
                total += sum(lin.weight.numel() for lin in (*self.qkv(i), self.attn_out(i)))
            if self.kept_neurons(i):
                total += sum(lin.weight.numel() for lin in (*self.ffn_in(i), self.ffn_down(i)))
        return total


class BertFamilyAdapter(_AdapterBase):
    """BERT-style post-LayerNorm encoders (BERT, MiniLM, RoBERTa, XLM-R) with a sequence-classification head."""

    kind = "encoder"

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        cls_name = type(model).__name__
        if model_type not in _BERT_FAMILY or cls_name not in _BERT_FAMILY[model_type]:
            raise _unsupported(model)
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

    def ffn_in(self, layer: int) -> tuple[nn.Linear]:
        """The FFN matrices that read the hidden states (the decoder adapter's gate and up)."""
        return (self.ffn_up(layer),)

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



class LlamaFamilyAdapter(_AdapterBase):
    """LLaMA-style causal LMs: pre-RMSNorm decoder layers, rotary attention with GQA, gated (SwiGLU) FFN.

    A head unit is a KV group: one key / value head and the query heads that share it (see `CoFiConfig` for why a
    query head inside a kept group is not gated on its own). `head_dim` never changes, so the rotary embedding of every
    kept head is the one it had.
    """

    kind = "decoder"

    def __init__(self, model: nn.Module):
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _LLAMA_FAMILY or type(model).__name__ not in _LLAMA_FAMILY[model_type]:
            raise _unsupported(model)
        heads, kv = int(config.num_attention_heads), int(config.num_key_value_heads or config.num_attention_heads)
        if heads % kv:
            raise ValueError(f"{type(model).__name__}: num_attention_heads={heads} is not a multiple of "
                             f"num_key_value_heads={kv}")
        self.model = model
        self.model_type = model_type
        self.base = model.model
        self.layers = self.base.layers
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        self.dims = EncoderDims(
            num_layers=len(self.layers),
            num_heads=heads,
            head_dim=int(head_dim),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_kv_heads=kv,
            ffn_matrices=3,
        )

    # ------------------------------------------------------------------------------------------------ modules
    def embedding(self) -> nn.Embedding:
        return self.base.embed_tokens

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def tied(self) -> bool:
        return self.model.lm_head.weight is self.base.embed_tokens.weight

    def final_norm(self) -> nn.Module:
        return self.base.norm

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def qkv(self, layer: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        a = self.layers[layer].self_attn
        return a.q_proj, a.k_proj, a.v_proj

    def attn_out(self, layer: int) -> nn.Linear:
        return self.layers[layer].self_attn.o_proj

    def ffn_in(self, layer: int) -> tuple[nn.Linear, nn.Linear]:
        m = self.layers[layer].mlp
        return m.gate_proj, m.up_proj

    def ffn_down(self, layer: int) -> nn.Linear:
        return self.layers[layer].mlp.down_proj

    def layer_norms(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """(before attention, before the FFN)."""
        return self.layers[layer].input_layernorm, self.layers[layer].post_attention_layernorm

    def norms(self) -> list[nn.Module]:
        """Every RMSNorm over the hidden dimension (Qwen3's per-head q/k norms are over `head_dim`: not these)."""
        return [n for i in range(self.dims.num_layers) for n in self.layer_norms(i)] + [self.final_norm()]

    def kept_heads(self, layer: int) -> int:
        """Query heads left in `layer`; 0 for a removed attention sublayer."""
        if getattr(self.attention(layer), "removed", False):
            return 0
        return self.attn_out(layer).in_features // self.dims.head_dim

    def kept_kv_heads(self, layer: int) -> int:
        if getattr(self.attention(layer), "removed", False):
            return 0
        return self.qkv(layer)[1].out_features // self.dims.head_dim

    def kept_neurons(self, layer: int) -> int:
        if getattr(self.mlp(layer), "removed", False):
            return 0
        return self.ffn_down(layer).in_features



Adapter = BertFamilyAdapter | LlamaFamilyAdapter


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _LLAMA_FAMILY:
        return LlamaFamilyAdapter(model)
    if model_type in _BERT_FAMILY:
        return BertFamilyAdapter(model)
    raise _unsupported(model)
