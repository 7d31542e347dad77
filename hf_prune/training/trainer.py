"""`PruningTrainer`: a `transformers.Trainer` that runs any training-time pruning method through its plugin.

The trainer knows nothing about a method's maths. It looks up the [`TrainingPlugin`] registered for the
`pruning_config`'s class and calls its hooks: `callbacks()`, `optimizer_parameter_groups()`, `forward_kwargs()`,
`compute_loss()`, `state_dict()` / `load_state_dict()` (saved in every checkpoint, restored on resume) and
`export()`. Stock `TrainingArguments`, datasets, collators, evaluation and logging integrations keep working.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from ..config import PruningConfig
from .distill_config import DistillationConfig
from .distill_plugin import DistillationPlugin, check_teacher
from .plugin import TrainingPlugin, get_training_plugin_class, is_peft_model, merged_if_peft

PLUGIN_STATE_TENSORS = "hf_prune_plugin_state.safetensors"
PLUGIN_STATE_JSON = "hf_prune_plugin_state.json"


class PruningTrainer(Trainer):
    """[`~transformers.Trainer`] with a pruning method.

    Args:
        pruning_config ([`PruningConfig`] or `None`): a training-time method's config (e.g. [`CoFiConfig`]), or
            `None` for no pruning method: the trainer is then a stock `Trainer` that keeps an hf_prune model's
            sparsity, e.g. masked-LoRA recovery of a pruned model (`hf_prune.get_sparse_peft_model`), where
            `export_pruned_model()` returns the merged model with the same mask; with a `teacher_model` it distils
            the teacher's next-token distribution into the model (logit distillation, [`DistillationConfig`]).
        teacher_model (`torch.nn.Module`, *optional*): dense teacher, for `pruning_config=None` or a method that
            distils (frozen: eval mode, no gradients, moved to the training device). It must not be the model itself
            nor share its parameters; for logit distillation its vocabulary must equal the model's.
        distillation_config ([`DistillationConfig`], *optional*): temperature, LM-loss mix and the optional
            hidden-state loss of `pruning_config=None` with a teacher (default `DistillationConfig()`: logit KL alone
            at T = 1). A method that distils (CoFi) takes these settings in its own config instead.
        *args, **kwargs: everything [`~transformers.Trainer`] accepts.

    Example:

    ```python
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=TrainingArguments("out"),
                             pruning_config=CoFiConfig(target_sparsity=0.6), train_dataset=train)
    trainer.train()
    small = trainer.export_pruned_model()

    # logit distillation of a (smaller) student from the dense teacher, no pruning method
    trainer = PruningTrainer(model=small, teacher_model=teacher, args=TrainingArguments("out"), train_dataset=train,
                             pruning_config=None, distillation_config=DistillationConfig(temperature=1.0))
    trainer.train()   # logs `kd_loss` (and `lm_loss` when the batches have labels)
    ```
    """

    def __init__(self, model=None, args=None, *trainer_args, pruning_config: PruningConfig | None, teacher_model=None,
                 distillation_config: DistillationConfig | None = None, **kwargs):
        if pruning_config is not None and not isinstance(pruning_config, PruningConfig):
            raise TypeError(f"pruning_config must be a PruningConfig or None, got {type(pruning_config).__name__}")
        if model is None:
            raise ValueError("PruningTrainer needs `model` (model_init is not supported: the method modifies the model)")
        if distillation_config is not None and not isinstance(distillation_config, DistillationConfig):
            raise TypeError(f"distillation_config must be a DistillationConfig, got {type(distillation_config).__name__}")
        if teacher_model is not None:
            check_teacher(model, teacher_model)
        plugin_config = pruning_config
        if pruning_config is None:
            if teacher_model is not None:
                plugin_cls, plugin_config = DistillationPlugin, distillation_config or DistillationConfig()
            elif distillation_config is not None:
                raise ValueError("distillation_config was given without a teacher_model to distil from")
            else:
                plugin_cls = _NoMethod
        else:
            if distillation_config is not None:
                raise ValueError(
                    f"distillation_config applies to pruning_config=None; method {pruning_config.method!r} sets its "
                    f"distillation (temperature, weights) in {type(pruning_config).__name__}"
                )
            if is_peft_model(model):
                raise ValueError(
                    f"PruningTrainer got a peft model with pruning_config={type(pruning_config).__name__}: a "
                    "training-time method cannot prune through LoRA adapters. For masked-LoRA recovery of a pruned "
                    "model pass pruning_config=None (hf_prune.get_sparse_peft_model keeps the mask)"
                )
            plugin_cls = get_training_plugin_class(pruning_config)
            if teacher_model is not None and not plugin_cls.supports_teacher:
                raise ValueError(f"teacher_model was given, but method {pruning_config.method!r} does not distil")
        self.pruning_config = pruning_config
        self.teacher_model = teacher_model
        self.pruning_plugin: TrainingPlugin = plugin_cls(plugin_config, model, teacher_model=teacher_model)
        self._unsynced = _keep_out_of_ddp(model, self.pruning_plugin.unsynced_module_names())
        self._unsynced_broadcast = False
        # Trainer sets `model.config.use_cache` to `args.use_cache` (default False); the export gets the model's own
        self._model_use_cache = getattr(getattr(model, "config", None), "use_cache", None)
        super().__init__(model, args, *trainer_args, **kwargs)
        for callback in self.pruning_plugin.callbacks():
            self.add_callback(callback)
        if self.teacher_model is not None:
            self.teacher_model.eval().requires_grad_(False)
            self.teacher_model.to(self.args.device)
        self._pruning_logs: dict[str, list[float]] = defaultdict(list)

    # -------------------------------------------------------------------------------------------- optimization
    def _plugin_groups(self) -> list[dict[str, Any]]:
        if not hasattr(self, "_cached_plugin_groups"):
            self._cached_plugin_groups = self.pruning_plugin.optimizer_parameter_groups()
        return self._cached_plugin_groups

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        groups = self._plugin_groups()
        owned = [p for g in groups for p in g["params"]]
        flags = [p.requires_grad for p in owned]
        for p in owned:  # keep the method's parameters out of the default groups
            p.requires_grad_(False)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for p, flag in zip(owned, flags):
                p.requires_grad_(flag)
        for group in groups:
            optimizer.add_param_group(dict(group))
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        opt = optimizer if optimizer is not None else self.optimizer
        lambdas = getattr(scheduler, "lr_lambdas", None)
        if lambdas is not None and opt is not None:
            for i, group in enumerate(opt.param_groups):
                if group.get("hf_prune_constant_lr") and i < len(lambdas):
                    lambdas[i] = _constant
        return scheduler

    # ------------------------------------------------------------------------------------------ multi-process
    def training_step(self, model, inputs, num_items_in_batch=None):
        distributed = bool(self._unsynced) and self.args.world_size > 1 and torch.distributed.is_initialized()
        if distributed and not self._unsynced_broadcast:  # every rank starts from rank 0's method state
            for tensor in self._unsynced:
                torch.distributed.broadcast(tensor.data, src=0)
            self._unsynced_broadcast = True
        loss = super().training_step(model, inputs, num_items_in_batch)
        if distributed and self.accelerator.sync_gradients:
            _average_gradients([t for t in self._unsynced if isinstance(t, torch.nn.Parameter) and t.requires_grad])
        return loss

    # ---------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or isinstance(self.pruning_plugin, _NoMethod):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        extra = self.pruning_plugin.forward_kwargs()
        if "labels" in inputs or self.teacher_model is None:
            loss, outputs = super().compute_loss(
                model, {**inputs, **extra}, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        else:  # distillation alone needs no labels; `Trainer.compute_loss` would demand a loss from the model
            loss, outputs = None, model(**inputs, **extra)
        kwargs = {}
        if self.teacher_model is not None:
            teacher_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            with torch.no_grad():
                kwargs["teacher_outputs"] = self.teacher_model(
                    **teacher_inputs, **self.pruning_plugin.teacher_forward_kwargs()
                )
        model_loss = loss
        kwargs["term_scale"] = self._term_scale(num_items_in_batch)
        loss, logs = self.pruning_plugin.compute_loss(model, inputs, outputs, loss, **kwargs)
        self._check_finite(loss, model_loss, logs)
        for key, value in logs.items():
            self._pruning_logs[key].append(float(value))
        return (loss, outputs) if return_outputs else loss

    def _term_scale(self, num_items_in_batch) -> float:
        return extra_term_scale(self, num_items_in_batch)

    def _check_finite(self, loss, model_loss, logs: dict[str, float]) -> None:
        """Stops training, naming the step and the part, as soon as the loss or a multiplier is NaN or inf: every
        later step (and the export) would only carry the NaN on."""
        if loss is not None and bool(torch.isfinite(loss.detach()).all()):
            return
        parts = {"loss (the model's own)": float(model_loss.detach()) if model_loss is not None else None}
        parts.update({k: v for k, v in logs.items() if k.startswith(("loss", "lambda"))})
        bad = {k: v for k, v in parts.items() if v is not None and not math.isfinite(v)}
        raise FloatingPointError(
            f"hf_prune: training stopped at step {self.state.global_step + 1}: the {self._method_name()} loss is "
            f"not finite ({float(loss.detach()) if loss is not None else None}); non-finite parts: "
            f"{', '.join(f'{k}={v}' for k, v in bad.items()) or 'none of the logged parts (the combination overflowed)'}. "
            "Nothing was exported. Lower the learning rates, or check the inputs and the model for NaN."
        )

    def _method_name(self) -> str:
        return self.pruning_config.method if self.pruning_config is not None else "distillation"

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._pruning_logs and "loss" in logs:  # training logs: add the method's averages since the last log
            for key, values in self._pruning_logs.items():
                logs[key] = sum(values) / len(values)
            self._pruning_logs.clear()
        super().log(logs, *args, **kwargs)

    # -------------------------------------------------------------------------------------- checkpoint / resume
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            save_plugin_state(self.pruning_plugin, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_plugin_state(self.pruning_plugin, resume_from_checkpoint)

    # ------------------------------------------------------------------------------------------------- export
    def export_pruned_model(self) -> torch.nn.Module:
        """The method's final model (for CoFi: physically smaller), with its `PruningState` attached, and the
        `config.use_cache` the model had before `Trainer` changed it (so the export generates with the KV cache)."""
        exported = self.pruning_plugin.export(self.accelerator.unwrap_model(self.model))
        config = getattr(exported, "config", None)
        if self._model_use_cache is not None and config is not None and hasattr(config, "use_cache"):
            config.use_cache = self._model_use_cache
        return exported


def extra_term_scale(trainer: Trainer, num_items_in_batch) -> float:
    """What loss terms added to the model's own (per-micro-batch means) must be multiplied by so that gradient
    accumulation does not weight them up: `Trainer` divides the loss by the accumulation steps unless the model
    normalised its loss over the whole accumulated batch (`num_items_in_batch`, e.g. causal LMs); then only the
    model's loss is normalised, and the added terms are divided here (transformers' own rule, `training_step`)."""
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None)
    return 1.0 / trainer.current_gradient_accumulation_steps if scaled else 1.0


class _NoMethod(TrainingPlugin):
    """The plugin of `pruning_config=None` without a teacher: every hook is the base class's no-op; `export` merges a
    peft model."""

    def export(self, model):
        return merged_if_peft(model)


def _keep_out_of_ddp(model: torch.nn.Module, module_names: list[str]) -> list[torch.Tensor]:
    """Marks the parameters and buffers of `module_names` for DDP to ignore; returns them (names in a fixed order).

    See [`TrainingPlugin.unsynced_module_names`]. `torch.nn.parallel.DistributedDataParallel`'s documented way to
    leave tensors out (read when the model is wrapped, which `Trainer` does later).
    """
    if not module_names:
        return []
    modules = dict(model.named_modules())
    names, tensors = [], []
    for prefix in module_names:
        for name, tensor in list(modules[prefix].named_parameters(prefix=prefix)) + list(
            modules[prefix].named_buffers(prefix=prefix)
        ):
            names.append(name)
            tensors.append(tensor)
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored + names)
    return tensors


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce (mean) of the gradients of `params`, in one flat tensor; a missing gradient counts as zero."""
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def _constant(step: int) -> float:
    return 1.0


def _split_tensors(state: dict, path: tuple = ()) -> tuple[dict, dict[tuple, torch.Tensor]]:
    """`state` without its tensors (nested dicts followed), and the tensors by key path: the JSON and safetensors
    parts of a plugin checkpoint."""
    values, tensors = {}, {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[(*path, key)] = value.detach().cpu().contiguous()
        elif isinstance(value, dict):
            values[key], inner = _split_tensors(value, (*path, key))
            tensors.update(inner)
        else:
            values[key] = value
    return values, tensors


def save_plugin_state(plugin: TrainingPlugin, folder: str) -> None:
    """Writes `plugin.state_dict()`: tensors (also inside nested dicts, e.g. DynSparse's per-module masks) to
    safetensors, everything else to JSON (never pickle)."""
    state = plugin.state_dict()
    if not state:
        return
    os.makedirs(folder, exist_ok=True)
    values, by_path = _split_tensors(state)
    tensors = {"/".join(path): t for path, t in by_path.items()}
    if len(tensors) != len(by_path):
        raise ValueError(f"{type(plugin).__name__}.state_dict(): two tensor keys join to the same '/' path")
    if tensors:
        save_file(tensors, os.path.join(folder, PLUGIN_STATE_TENSORS))
    with open(os.path.join(folder, PLUGIN_STATE_JSON), "w", encoding="utf-8") as fh:
        json.dump({"values": values, "tensors": sorted(map(list, by_path))}, fh, indent=2, sort_keys=True)


def load_plugin_state(plugin: TrainingPlugin, folder: str) -> None:
    path = os.path.join(folder, PLUGIN_STATE_JSON)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as fh:
        meta = json.load(fh)
    state = dict(meta.get("values", {}))
    if meta.get("tensors"):
        stored = load_file(os.path.join(folder, PLUGIN_STATE_TENSORS))
        for key_path in meta["tensors"]:
            key_path = [key_path] if isinstance(key_path, str) else key_path  # flat names: files before nesting
            node = state
            for key in key_path[:-1]:
                node = node.setdefault(key, {})
            node[key_path[-1]] = stored["/".join(key_path)]
    plugin.load_state_dict(state)
