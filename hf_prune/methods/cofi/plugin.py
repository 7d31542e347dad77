"""CoFi inside a training loop: the `TrainingPlugin` that `PruningTrainer` drives."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ...state import PruningState, refuse_adapter_model, refuse_mid_training, set_pruning_state
from ...training.plugin import TrainingPlugin, register_training_plugin
from .arch import get_adapter
from .config import CoFiConfig, resolve_steps
from .distill import (
    default_teacher_layers,
    layer_costs,
    layer_loss,
    match_layers,
    prediction_loss,
    token_prediction_loss,
)
from .export_format import StructuredFormat  # noqa: F401  (registers the "structured" export format)
from .model import ATTR, inject_gates
from .prune import build_pruned_model, final_masks, kept_units
from .sparsity import (
    expected_sparsity,
    expected_sublayers,
    lagrangian_term,
    layer_target_at,
    mask_sparsity,
    target_at,
    unit_counts,
)
from .targets import expected_counts, full_counts, ramped, target_counts

logger = logging.getLogger(__name__)


class _GradientReversal(torch.autograd.Function):
    """Identity forward, negated gradient: the Lagrange multipliers do gradient *ascent* under any optimizer."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def _default(value, default: float) -> float:
    return default if value is None else float(value)


class CoFiCallback(TrainerCallback):
    """Tracks the step, resolves the schedule at train start and freezes the masks when fine-tuning begins."""

    def __init__(self, plugin: "CoFiPlugin"):
        self.plugin = plugin

    def on_train_begin(self, args, state, control, **kwargs):
        self.plugin.setup_schedule(state.max_steps)
        self.plugin.step = state.global_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.plugin.step = state.global_step
        if state.global_step >= self.plugin.pruning_steps and not self.plugin.gates.is_frozen():
            cfg, gates = self.plugin.config, self.plugin.gates
            before = mask_sparsity(gates.dims, gates.deterministic_masks())
            target = cfg.sparsity_target()
            offset = gates.freeze(target if cfg.match_target_on_freeze else None)
            after = mask_sparsity(gates.dims, gates.deterministic_masks())
            logger.info(
                "CoFi masks fixed at step %d: sparsity %.4f (target %s; the controller's own masks: %.4f, logit "
                "offset %.3f%s)", state.global_step, after, "-" if target is None else f"{target:.4f}", before, offset,
                f"; target architecture {gates.arch_targets}" if gates.arch_targets else "",
            )


@register_training_plugin(CoFiConfig)
class CoFiPlugin(TrainingPlugin):
    """Injects CoFi's gates into the student and adds the Lagrangian and distillation terms to its loss.

    Args:
        config ([`CoFiConfig`]), model: the student (a fine-tuned BERT-family classifier, or a LLaMA-family causal
            LM, usually a copy of the teacher),
        teacher_model (*optional*): the dense teacher; without it the student trains on hard labels.
    """

    supports_teacher = True

    def __init__(self, config: CoFiConfig, model: nn.Module, teacher_model: nn.Module | None = None, **kwargs: Any):
        super().__init__(config, model)
        refuse_adapter_model(model, "CoFi")
        refuse_mid_training(model, "CoFi", "One training-time method at a time: finish that run first and start "
                            "CoFi from the exported model")
        self.adapter = get_adapter(model)
        self.decoder = self.adapter.kind == "decoder"
        self.hard_label_weight = _default(config.hard_label_weight, 1.0 if self.decoder else 0.0)
        self.distill_layer_weight = _default(config.distill_layer_weight, 0.0 if self.decoder else 0.5)
        self.teacher_layers: list[int] = []
        teacher_hidden = None
        if teacher_model is not None:
            if self.decoder:
                s_vocab, t_vocab = model.config.vocab_size, getattr(teacher_model.config, "vocab_size", None)
                if t_vocab != s_vocab:
                    raise ValueError(
                        f"teacher_model has a vocabulary of {t_vocab} but the student model {s_vocab}; CoFi distils "
                        "the teacher's next-token distribution, so both must share the tokenizer"
                    )
            else:
                s_labels, t_labels = model.config.num_labels, getattr(teacher_model.config, "num_labels", None)
                if t_labels != s_labels:
                    raise ValueError(
                        f"teacher_model has {t_labels} labels but the student model has {s_labels}; CoFi distils the "
                        "teacher's predictions, so both must classify into the same labels"
                    )
            if self.distill_layer_weight > 0:
                t_layers = int(teacher_model.config.num_hidden_layers)
                self.teacher_layers = list(config.teacher_layers or default_teacher_layers(t_layers))
                if max(self.teacher_layers) > t_layers:
                    raise ValueError(
                        f"CoFiConfig.teacher_layers={self.teacher_layers} refers to layers beyond the teacher's "
                        f"{t_layers} layers"
                    )
                teacher_hidden = int(teacher_model.config.hidden_size)
        self.has_teacher = teacher_model is not None
        self.gates = inject_gates(model, config, self.adapter, teacher_hidden)
        self.step = 0
        self.total_steps = None
        self.pruning_steps = 0
        self.warmup_steps = 0
        self.train_start = None

    # ------------------------------------------------------------------------------------------------ schedule
    def setup_schedule(self, total_steps: int) -> None:
        cfg = self.config
        finetune = resolve_steps(cfg.finetune_steps, total_steps)
        if finetune >= total_steps:
            raise ValueError(
                f"CoFiConfig.finetune_steps={cfg.finetune_steps} leaves no pruning steps in a {total_steps}-step run"
            )
        self.total_steps = total_steps
        self.pruning_steps = total_steps - finetune
        self.warmup_steps = min(resolve_steps(cfg.sparsity_warmup_steps, self.pruning_steps), self.pruning_steps)
        self.train_start = time.perf_counter()

    def target(self) -> float | None:
        t = self.config.sparsity_target()
        return None if t is None else target_at(self.step, t, self.warmup_steps)

    # --------------------------------------------------------------------------------------------------- hooks
    def callbacks(self) -> list:
        return [CoFiCallback(self)]

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        return [
            {
                "params": self.gates.gate_parameters(),
                "lr": self.config.gate_learning_rate,
                "weight_decay": 0.0,
                "hf_prune_constant_lr": True,
            },
            {
                "params": self.gates.lagrangian_parameters(),
                "lr": self.config.lagrangian_learning_rate,
                "weight_decay": 0.0,
                "hf_prune_constant_lr": True,
            },
        ]

    def unsynced_module_names(self) -> list[str]:
        return [ATTR]  # the gates and lambdas enter the Lagrangian, the layer transform the layer loss

    def forward_kwargs(self) -> dict[str, Any]:
        return {"output_hidden_states": True} if self.teacher_layers else {}

    def teacher_forward_kwargs(self) -> dict[str, Any]:
        return self.forward_kwargs()

    def compute_loss(self, model, inputs, outputs, loss, teacher_outputs=None, term_scale: float = 1.0, **kwargs):
        cfg = self.config
        logs: dict[str, float] = {}
        # `model_part` is normalised like the model's loss; `own` (per-micro-batch means) is scaled by `term_scale`
        model_part, own = 0.0, 0.0
        if teacher_outputs is not None:
            if loss is not None and self.hard_label_weight > 0:
                model_part = self.hard_label_weight * loss
                logs["loss_hard"] = float(loss.detach())
            if self.decoder:
                pred = token_prediction_loss(
                    outputs.logits, teacher_outputs.logits, cfg.temperature, inputs.get("attention_mask")
                )
            else:
                pred = prediction_loss(outputs.logits, teacher_outputs.logits, cfg.temperature)
            own = own + cfg.distill_pred_weight * pred
            logs["loss_distill_pred"] = float(pred.detach())
            if self.teacher_layers:
                lay, pairs = self._layer_loss(inputs, outputs, teacher_outputs)
                own = own + self.distill_layer_weight * lay
                logs["loss_distill_layer"] = float(lay.detach())
                for i, j in pairs:
                    logs[f"layer_match_t{self.teacher_layers[i]}"] = float(j + 1)
        else:
            if loss is None:
                raise ValueError("CoFi without a teacher_model trains on labels: the batch has no `labels`")
            model_part = loss
        if not self.gates.is_frozen():
            probs = self.gates.keep_probabilities()
            s = expected_sparsity(self.adapter.dims, **probs)
            t = self.target()
            lag = s.new_zeros(())
            if t is not None:
                lam1 = _GradientReversal.apply(self.gates.lambda_1)
                lam2 = _GradientReversal.apply(self.gates.lambda_2)
                lag = lagrangian_term(s, t, lam1, lam2)
            lag = lag + self._arch_terms(probs, logs)
            own = own + lag + self._layer_count_terms(probs, logs)
            logs.update({"loss_lagrangian": float(lag.detach()), "expected_sparsity": float(s.detach())})
            counts = unit_counts(self.adapter.dims, **{k: v.detach() for k, v in probs.items()})
        else:
            masks = {k: (v != 0).float() for k, v in self.gates.deterministic_masks().items()}
            t = self.config.sparsity_target()
            logs["expected_sparsity"] = float(expected_sparsity(self.adapter.dims, **masks))
            counts = unit_counts(self.adapter.dims, **masks)
            if self.gates.layer_targets:
                kept = expected_sublayers(**masks)
                logs.update({f"expected_{k}_sublayers": float(kept[k]) for k in self.gates.layer_targets})
        if t is not None:
            logs["target_sparsity"] = float(t)
        if self.decoder:  # expected counts per dimension (Sheared-LLaMA's target-architecture view)
            g = self.adapter.dims.group_size
            logs.update({"expected_layers": float(counts["layers"]),
                         "expected_kv_heads": float(counts["heads"].sum()),
                         "expected_heads_per_layer": float(counts["heads"].sum() * g / self.adapter.dims.num_layers),
                         "expected_intermediate_per_layer":
                             float(counts["neurons"].sum() / self.adapter.dims.num_layers)})
        logs.update(
            {
                "lambda_1": float(self.gates.lambda_1.detach()),
                "lambda_2": float(self.gates.lambda_2.detach()),
                "expected_heads": float(counts["heads"].sum() * self.adapter.dims.group_size),
                "expected_neurons": float(counts["neurons"].sum()),
                "expected_hidden": float(counts["hidden"]),
                "expected_mha_layers": float(counts["mha_layers"]),
                "expected_ffn_layers": float(counts["ffn_layers"]),
                "masks_frozen": float(self.gates.is_frozen()),
            }
        )
        return model_part + term_scale * own, logs

    def _arch_terms(self, probs: dict[str, torch.Tensor], logs: dict[str, float]):
        """The Lagrangian terms of the target architecture (0 without one): per dimension, the expected count vs its
        target ramped from the model's count over the warm-up, both as fractions of the model's count."""
        total = 0.0
        targets = self.gates.arch_targets
        if not targets:
            return total
        dims = self.adapter.dims
        full, final = full_counts(dims), target_counts(targets, dims)
        expected = expected_counts(dims, probs)
        fraction = target_at(self.step, 1.0, self.warmup_steps)
        for name in targets:
            target = ramped(final[name], full[name], fraction)
            lam = _GradientReversal.apply(self.gates.arch_lambdas[name])
            total = total + lagrangian_term(expected[name] / full[name], target / full[name], lam[0], lam[1])
            logs.update({f"expected_total_{name}": float(expected[name].detach()), f"target_total_{name}": target,
                         f"lambda_{name}": float(self.gates.arch_lambdas[name][0].detach())})
        return total

    def _layer_count_terms(self, probs: dict[str, torch.Tensor], logs: dict[str, float]):
        """The Lagrangian terms of `target_attention_layers` / `target_ffn_layers` (0 when neither is set).

        The gap is a fraction of the layer count, so its lambdas live on the scale of the sparsity constraint's.
        """
        total = 0.0
        if not self.gates.layer_targets:
            return total
        num_layers = self.adapter.dims.num_layers
        kept = expected_sublayers(**probs)
        for kind, n in self.gates.layer_targets.items():
            target = layer_target_at(self.step, num_layers, n, self.warmup_steps)
            lam = _GradientReversal.apply(self.gates.layer_lambdas[kind])
            term = lagrangian_term(kept[kind] / num_layers, target / num_layers, lam[0], lam[1])
            total = total + term
            logs.update({
                f"expected_{kind}_sublayers": float(kept[kind].detach()),
                f"target_{kind}_sublayers": float(target),
                f"lambda_{kind}_layers": float(self.gates.layer_lambdas[kind][0].detach()),
            })
        return total

    def _layer_loss(self, inputs, outputs, teacher_outputs):
        s_hidden = list(outputs.hidden_states[1:])
        t_hidden = [teacher_outputs.hidden_states[i] for i in self.teacher_layers]
        costs = layer_costs(s_hidden, t_hidden, self.gates.layer_transform, inputs.get("attention_mask"))
        if self.decoder:  # a decoder layer with its FFN removed adds no FFN output of its own to match
            removed = self.gates.removed.get("ffn")
            available = ~removed if removed is not None else None
        else:
            z_ffn = self.gates.current.get("ffn")
            available = (z_ffn != 0) if z_ffn is not None else None
        pairs = match_layers(costs, available)
        return layer_loss(costs, pairs), pairs

    # ------------------------------------------------------------------------------------------------- export
    def export(self, model: nn.Module) -> nn.Module:
        """Physically pruned copy of `model` (the masked model with deterministic masks), with its PruningState."""
        model = getattr(model, "module", model)
        masks = final_masks(self.gates)
        dense_params = self.adapter.dims.full_params
        # an FFN width given as a target is exported as given, not padded
        multiple_of = 1 if "intermediate_size" in self.gates.arch_targets else self.config.multiple_of
        small, structure = build_pruned_model(model, masks, multiple_of)
        kept_params = get_adapter(small).prunable_weight_count()
        kept = kept_units(masks)
        metrics = {
            "sparsity": 1.0 - kept_params / dense_params,
            "target_sparsity": self.config.sparsity_target(),
            "prunable_params_before": dense_params,
            "prunable_params_after": kept_params,
            "params_before": sum(p.numel() for n, p in model.named_parameters() if not n.startswith("hf_prune_cofi.")),
            "params_after": sum(p.numel() for p in small.parameters()),
            "structure": structure,
            "kept_head_indices": kept["heads"],
            "kept_neurons_per_layer": [len(n) for n in kept["neurons"]],  # before the zero padding to `multiple_of`
        }
        if self.gates.arch_targets:
            metrics["target_architecture"] = dict(self.gates.arch_targets)
        if self.train_start is not None:
            metrics["train_wall_time_s"] = time.perf_counter() - self.train_start
        state = PruningState(
            config=self.config,
            layout="structured",
            module_sparsity={},
            metrics=metrics,
            base_model=getattr(model.config, "_name_or_path", None) or None,
        )
        set_pruning_state(small, state)
        return small
