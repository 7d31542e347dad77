"""`CoFiConfig`: coarse- and fine-grained structured pruning with distillation (Xia et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import (
    PruningConfig,
    check_positive_int,
    check_positive_number,
    register_pruning_method,
)

_OWNER = "CoFiConfig"


def _check_steps(name: str, value, *, allow_zero: bool = True) -> None:
    """A length given as a number of optimizer steps (int >= 1) or as a fraction of the run (float in [0, 1))."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    if ok and isinstance(value, float) and not value.is_integer() and value >= 1:
        ok = False
    if ok and not allow_zero and value == 0:
        ok = False
    if not ok:
        raise ValueError(
            f"{_OWNER}.{name} must be a number of steps (int >= {0 if allow_zero else 1}) or a fraction of the "
            f"training steps (float in [0, 1)), got {value!r}"
        )


def _check_target_architecture(config: "CoFiConfig") -> None:
    """Field-level checks of the target architecture; the model-dependent ones run when the gates are built."""
    for name, value in config.target_architecture().items():
        check_positive_int(_OWNER, f"target_{name}", value)
    if config.target_heads is not None and config.target_kv_heads is not None:
        raise ValueError(f"{_OWNER}: give target_heads or target_kv_heads, not both (heads go with their KV group)")
    arch = config.target_architecture()
    if arch and config.target_sparsity is not None:
        raise ValueError(
            f"{_OWNER}: give target_sparsity={config.target_sparsity} or a target architecture "
            f"({', '.join(f'target_{k}' for k in arch)}), not both: the architecture fixes the size"
        )
    if arch and (config.target_attention_layers is not None or config.target_ffn_layers is not None):
        raise ValueError(f"{_OWNER}: target_attention_layers / target_ffn_layers go with target_sparsity; with a "
                         "target architecture use target_layers")
    needs = {"layers": "prune_layers", "heads": "prune_heads", "kv_heads": "prune_heads",
             "intermediate_size": "prune_neurons", "hidden_size": "prune_hidden"}
    for name in config.target_architecture():
        if not getattr(config, needs[name]):
            raise ValueError(f"{_OWNER}.target_{name} needs {needs[name]}=True: the constraint acts on those gates")


def resolve_steps(value: float | int, total_steps: int) -> int:
    """Turns a `CoFiConfig` length (steps, or a fraction of `total_steps` when < 1) into a step count."""
    if isinstance(value, float) and value < 1:
        return int(round(value * total_steps))
    return int(value)


@register_pruning_method("cofi")
@dataclass(kw_only=True)
class CoFiConfig(PruningConfig):
    """Configuration of CoFi pruning.

    CoFi learns hard-concrete gates over whole attention / FFN sublayers, attention heads, FFN neurons and the hidden
    dimension, with a Lagrangian constraint that drives the expected sparsity of the encoder's weight matrices to
    `target_sparsity`, while distilling from a fine-tuned dense teacher. The last `finetune_steps` of the run train
    the weights with the deterministic masks fixed; [`PruningTrainer.export_pruned_model`] then removes the pruned
    units physically.

    The learning-rate and drop-rate defaults follow the paper's code, which prunes for ~20 epochs. In a run of a few
    hundred steps the controller lags the target ramp and then overshoots; faster rates and gates that start almost
    open track it more closely (the MiniLM recipe uses `gate_learning_rate=0.1`, `lagrangian_learning_rate=0.1`,
    `gate_init_droprate=0.05` for ~800 steps, and still ends a few points above the target: 0.64 for 0.6, 0.935
    for 0.9, before `match_target_on_freeze` brings the fixed masks back to the target).

    The same config prunes LLaMA-family causal LMs (LLaMA, Mistral, Qwen2, Qwen3; GQA included) the Sheared-LLaMA way
    (Xia et al., 2023): besides the gates above, one gate per decoder layer, and a head gate per KV group (a KV head is
    pruned together with its query heads; a query head inside a kept group is not gated on its own, because a stock
    `LlamaAttention` needs the same number of query heads for every KV head of a layer, so a per-group count could
    only be exported by zero-padding or by copying KV heads, and the uniform count per layer it would need couples
    the group's gates). Instead of `target_sparsity` a decoder may be given a *target architecture*
    (`target_layers`, `target_heads` or `target_kv_heads`, `target_intermediate_size`, `target_hidden_size`): each
    is a Lagrangian constraint on the expected count of its units, ramped from the model's count over the warm-up,
    and the fixed masks keep exactly that many (the highest logits), so the export has that uniform shape and loads
    as a plain config of its class (when the class accepts the shape: `LlamaConfig` needs `hidden_size` divisible by
    the query heads, e.g. 528, not 512, with 6 heads; otherwise it is saved with the structure record). The loss is next-token cross-entropy plus the KL to the dense teacher's
    next-token distribution, and, optionally, hidden-state matching.

    Args:
        target_sparsity (`float`, *optional*):
            Fraction of the prunable parameters (attention and FFN weight matrices; embeddings, biases, norms and the
            task head are not counted) to remove, in [0, 1). Defaults to 0.6 when no target architecture is given,
            to no sparsity constraint otherwise.
        prune_layers (`bool`, defaults to `True`): learn one gate per whole attention sublayer and per FFN sublayer.
        prune_heads (`bool`, defaults to `True`): learn one gate per attention head.
        prune_neurons (`bool`, defaults to `True`): learn one gate per FFN intermediate neuron.
        prune_hidden (`bool`, defaults to `True`): learn one hidden-dimension gate vector shared by all layers.
        sparsity_warmup_steps (`int` or `float`, defaults to 0.5):
            The target ramps linearly from 0 to `target_sparsity` over this many steps (a float < 1 is a fraction of
            the pruning phase).
        finetune_steps (`int` or `float`, defaults to 0.2):
            Length of the final phase with fixed deterministic masks (a float < 1 is a fraction of the training run).
        match_target_on_freeze (`bool`, defaults to `True`):
            When the fine-tuning phase starts, take the fixed masks from the gate logits shifted by one common offset,
            chosen so that the masks' sparsity is as close to `target_sparsity` as whole units allow (the units
            ranked by their logits, as without the shift). The Lagrangian controller alone can end a few points off
            the target; `False` keeps the plain deterministic masks, as in the paper.
        gate_learning_rate (`float`, defaults to 0.01): learning rate of the gate logits (log alpha).
        lagrangian_learning_rate (`float`, defaults to 0.01): learning rate of lambda_1 and lambda_2 (gradient ascent).
        gate_init_droprate (`float`, defaults to 0.5):
            Initial drop rate of every gate; the logits start at log((1 - p) / p) plus N(0, 0.01) noise.
        temperature (`float`, defaults to 2.0): temperature of the prediction distillation (the KL is scaled by T^2).
        distill_pred_weight (`float`, defaults to 1.0): weight of the prediction (KL) distillation loss.
        distill_layer_weight (`float`, *optional*): weight of the layer (hidden state MSE) distillation loss;
            defaults to 0.5 for encoders and 0 for decoders (whose residual streams carry a few very large
            dimensions that an unweighted MSE would be all about).
        hard_label_weight (`float`, *optional*):
            weight of the model's own loss on the labels when a teacher is given (without a teacher it is always 1);
            defaults to 0 for classifiers, 1 for causal LMs (next-token cross-entropy beside the distillation).
        teacher_layers (`list[int]`, *optional*):
            1-based teacher layers matched by the layer loss; by default every ceil(L/4)-th layer ending at the top.
        multiple_of (`int`, defaults to 16):
            Width alignment of the exported model, because matrix kernels run markedly faster on widths that are
            multiples of the vector length (MiniLM-L6 shapes at 90 % sparsity on a 2-core CPU, batch 32: hidden 325
            with FFN 837 took 90 ms, 320 with 832 took 67 ms; batch 1 was unchanged). The deterministic hidden mask keeps the nearest multiple of this many
            dimensions (the masks the fine-tuning phase trains with, so the model adapts), and the export pads each
            kept FFN with zero neurons up to a multiple (exact: the outputs do not change). Heads are whole already.
            1 turns it off (the paper's behaviour).
        target_attention_layers (`int`, *optional*):
            Number of attention sublayers the pruned model keeps, enforced like the sparsity target: a second
            Lagrangian constraint (its own lambda pair, ramped from all layers down over the same warm-up) drives the
            expected number of kept attention sublayers to it, and the fixed masks keep at most this many (the
            highest layer-gate logits among the sublayers that still have a head). This is Sheared-LLaMA's
            target-architecture constraint (Xia et al., 2023) applied to CoFi's layer gates; hf_prune's addition, not
            part of the CoFi paper. Why: at batch 1 on a CPU every sublayer costs a fixed dispatch time whatever its
            width, so at high sparsity a few wide sublayers run faster than many narrow ones of the same FLOPs
            (MiniLM-L6 at 90 %, eager PyTorch, one thread: 1.90 ms with one attention sublayer vs 2.20 ms with four
            left free, for 0.9 points of accuracy; see the README's CoFi section). Needs `prune_layers=True`; `None`
            (the default) leaves the number free, as in the paper.
        target_ffn_layers (`int`, *optional*): the same for the FFN sublayers.
        target_layers (`int`, *optional*): decoders: number of decoder layers kept (the layer gates).
        target_heads (`int`, *optional*): decoders: query heads per kept layer; a multiple of the model's
            `num_attention_heads / num_key_value_heads` (heads go with their KV group).
        target_kv_heads (`int`, *optional*): decoders: KV heads per kept layer (instead of `target_heads`).
        target_intermediate_size (`int`, *optional*): decoders: FFN width per kept layer (exported as given, with
            no `multiple_of` padding).
        target_hidden_size (`int`, *optional*): decoders: hidden size (exact, no `multiple_of` rounding).
    """

    target_sparsity: float | None = None
    prune_layers: bool = True
    prune_heads: bool = True
    prune_neurons: bool = True
    prune_hidden: bool = True
    sparsity_warmup_steps: float | int = 0.5
    finetune_steps: float | int = 0.2
    match_target_on_freeze: bool = True
    gate_learning_rate: float = 0.01
    lagrangian_learning_rate: float = 0.01
    gate_init_droprate: float = 0.5
    temperature: float = 2.0
    distill_pred_weight: float = 1.0
    distill_layer_weight: float | None = None
    hard_label_weight: float | None = None
    teacher_layers: list[int] | None = None
    multiple_of: int = 16
    target_attention_layers: int | None = None
    target_ffn_layers: int | None = None
    target_layers: int | None = None
    target_heads: int | None = None
    target_kv_heads: int | None = None
    target_intermediate_size: int | None = None
    target_hidden_size: int | None = None

    def target_architecture(self) -> dict[str, int]:
        """The target-architecture fields that are set (`{"layers": 24, "kv_heads": 2, ...}`)."""
        names = ("layers", "heads", "kv_heads", "intermediate_size", "hidden_size")
        return {n: getattr(self, f"target_{n}") for n in names if getattr(self, f"target_{n}") is not None}

    def sparsity_target(self) -> float | None:
        """`target_sparsity`, or its default: 0.6 without a target architecture, no constraint with one."""
        if self.target_sparsity is not None:
            return float(self.target_sparsity)
        return None if self.target_architecture() else 0.6

    def validate(self) -> None:
        super().validate()
        t = self.target_sparsity
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0):
            raise ValueError(f"{_OWNER}.target_sparsity must be a number in [0, 1), got {t!r}")
        for name in ("prune_layers", "prune_heads", "prune_neurons", "prune_hidden", "match_target_on_freeze"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_OWNER}.{name} must be a bool, got {getattr(self, name)!r}")
        if not (self.prune_layers or self.prune_heads or self.prune_neurons or self.prune_hidden):
            raise ValueError(
                f"{_OWNER}: every unit is disabled (prune_layers, prune_heads, prune_neurons and prune_hidden are all "
                "False); enable at least one"
            )
        check_positive_int(_OWNER, "multiple_of", self.multiple_of)
        for name in ("target_attention_layers", "target_ffn_layers"):
            value = getattr(self, name)
            if value is None:
                continue
            check_positive_int(_OWNER, name, value, allow_zero=True)
            if not self.prune_layers:
                raise ValueError(
                    f"{_OWNER}.{name}={value} needs prune_layers=True: the constraint acts on the per-sublayer gates"
                )
        _check_steps("sparsity_warmup_steps", self.sparsity_warmup_steps)
        _check_steps("finetune_steps", self.finetune_steps)
        for name in ("gate_learning_rate", "lagrangian_learning_rate", "temperature"):
            check_positive_number(_OWNER, name, getattr(self, name))
        for name in ("distill_pred_weight", "distill_layer_weight", "hard_label_weight"):
            if getattr(self, name) is not None:
                check_positive_number(_OWNER, name, getattr(self, name), allow_zero=True)
        _check_target_architecture(self)
        p = self.gate_init_droprate
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            raise ValueError(f"{_OWNER}.gate_init_droprate must be in the open interval (0, 1), got {p!r}")
        if self.teacher_layers is not None:
            if not isinstance(self.teacher_layers, (list, tuple)) or not self.teacher_layers:
                raise ValueError(f"{_OWNER}.teacher_layers must be a non-empty list of layer numbers or None")
            for layer in self.teacher_layers:
                check_positive_int(_OWNER, "teacher_layers", layer)
            if list(self.teacher_layers) != sorted(set(self.teacher_layers)):
                raise ValueError(
                    f"{_OWNER}.teacher_layers must be strictly increasing, got {list(self.teacher_layers)!r}"
                )
            self.teacher_layers = [int(x) for x in self.teacher_layers]
