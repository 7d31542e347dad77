"""The DynSparse algorithm, independent of any training loop: masks, pattern updates, optimizer-state surgery,
DOF and FLOP tracking, checkpoint state. The Trainer callback and the accelerate hook both drive this class."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from ...state import PruningState, mark_training, refuse_adapter_model, refuse_mid_training
from .config import DynSparseConfig
from .masks import BlockMask, non_embedding_linears, select_sparse_modules
from .schedule import UpdateSchedule

logger = logging.getLogger(__name__)

STATE_FILE = "dynsparse_state.safetensors"


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The innermost torch optimizer (accelerate's `AcceleratedOptimizer` and similar wrappers hold it as
    `.optimizer`): its step hooks fire only when a step really happens (not when fp16 grad scaling skips it, nor on
    gradient-accumulation micro-steps)."""
    seen = set()
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    return optimizer


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


class DynSparseUpdater:
    """Keeps the selected `Linear` weights of `model` at a fixed sparsity and moves the pattern on schedule.

    Life cycle: construct (random initial masks, weights untouched) → optionally `load_state_dict` (resume) →
    `bind(optimizer, total_steps)` (hooks) → `apply_masks()` → after every optimizer step `after_optimizer_step()`
    → `unbind()` and `pruning_state()` at the end.

    Gradients of inactive weights are masked as they are produced (a tensor hook), so the optimizer, gradient
    clipping and the optimizer moments only see active weights; after every real optimizer step the weights are
    masked again, so inactive weights are exactly zero whatever the optimizer does.

    Args:
        model (`nn.Module`): the model (unwrapped; DDP shares the parameters).
        config ([`DynSparseConfig`]): the method config.
    """

    def __init__(self, model: nn.Module, config: DynSparseConfig):
        if not isinstance(config, DynSparseConfig):
            raise TypeError(f"DynSparseUpdater needs a DynSparseConfig, got {type(config).__name__}")
        config.validate()  # again: lists may have been changed in place since construction
        refuse_adapter_model(model, "DynSparse")
        refuse_mid_training(model, "DynSparse", "One training-time method at a time: start DynSparse from a model "
                            "without them", allow=("DynSparse",))
        self.model = model
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.modules: dict[str, nn.Linear] = {}
        self.masks: dict[str, BlockMask] = {}
        self.num_active: dict[str, int] = {}
        for name, module in select_sparse_modules(model, config.target_modules, config.exclude_modules):
            mask = BlockMask(name, module.weight, config.block_shape)
            num_active = max(1, round((1.0 - config.sparsity) * mask.num_blocks))
            mask.init_random(num_active, self.generator)
            self.modules[name] = module
            self.masks[name] = mask
            self.num_active[name] = num_active
        self._dense_linear_weights = sum(m.weight.numel() for _, m in non_embedding_linears(model))
        self._sparse_ids = {id(m) for m in self.modules.values()}
        self.step_count = 0  # optimizer steps that really happened
        self.updates_done = 0
        self.last_pruning_ratio = 0.0
        self.schedule: UpdateSchedule | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.track_changes = False  # keep the pre-update masks of the last update (tests, analysis)
        self.last_update: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.restored = False
        self._handles: list[Any] = []
        self._real_steps = 0
        self._seen_steps = 0
        self._grad_scores: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------------------------------------------- binding
    def bind(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> None:
        """Registers the gradient-masking hooks and (when given) the optimizer step hooks; builds the schedule."""
        self.unbind()
        self.schedule = UpdateSchedule(self.config, total_steps)
        if self.config.regrowth == "gradient" and optimizer is None:
            raise ValueError("DynSparseConfig.regrowth='gradient' needs the optimizer (pass optimizer=...)")
        self.optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        for name, module in self.modules.items():
            self.masks[name].to_(module.weight.device)
            self._handles.append(module.weight.register_hook(self._grad_hook(name)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._pre_step_hook))
            self._handles.append(self.optimizer.register_step_post_hook(self._post_step_hook))
        self._real_steps = self._seen_steps = 0
        mark_training(self.model, "DynSparse")

    def unbind(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        mark_training(self.model, None)

    def _capturing(self) -> bool:
        """Whether the coming optimizer step is followed by a gradient-based regrowth (needs dense gradients)."""
        return (
            self.config.regrowth == "gradient"
            and self.schedule is not None
            and self.schedule.is_update_step(self.step_count + 1)
        )

    def _grad_hook(self, name: str):
        mask = self.masks[name]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._capturing():
                return grad  # masked in the optimizer pre-step hook, after scoring the dense gradient
            return mask.masked(grad)

        return hook

    def _pre_step_hook(self, optimizer, args, kwargs) -> None:
        if not self._capturing():
            return
        with torch.no_grad():
            for name, module in self.modules.items():
                grad = module.weight.grad
                if grad is None:
                    self._grad_scores[name] = torch.zeros(self.masks[name].grid)
                    continue
                self._grad_scores[name] = self.masks[name].block_scores(grad, "l1")
                self.masks[name].apply_(grad)

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        self._real_steps += 1

    # ------------------------------------------------------------------------------------------------- training
    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zeroes every inactive weight (in place) and, under DDP, makes every rank hold rank 0's masks."""
        for name, module in self.modules.items():
            self.masks[name].to_(module.weight.device)
        self._sync_masks()
        for name, module in self.modules.items():
            self.masks[name].apply_(module.weight.data)

    def after_optimizer_step(self, optimizer_stepped: bool | None = None) -> bool:
        """Call after `optimizer.step()`. Counts the step, updates the pattern when due, re-masks the weights.

        Args:
            optimizer_stepped (`bool`, *optional*): whether the optimizer really stepped. Leave `None` when an
                optimizer is bound: the step hooks know (accumulation micro-steps and fp16-skipped steps do not
                count). Without an optimizer, `None` counts every call as a step.

        Returns:
            `bool`: whether the pattern was updated.
        """
        if self.schedule is None:
            raise RuntimeError("DynSparseUpdater.bind(optimizer, total_steps) must be called before training")
        if optimizer_stepped is None:
            if self.optimizer is not None:
                new_steps = self._real_steps - self._seen_steps
                self._seen_steps = self._real_steps
            else:
                new_steps = 1
        else:
            new_steps = int(bool(optimizer_stepped))
        updated = False
        for _ in range(new_steps):
            self.step_count += 1
            if self.schedule.is_update_step(self.step_count):
                self.update_pattern(self.step_count)
                updated = True
        if new_steps:
            with torch.no_grad():
                for name, module in self.modules.items():
                    self.masks[name].apply_(module.weight.data)
        self._grad_scores = {}
        return updated

    @torch.no_grad()
    def update_pattern(self, step: int) -> None:
        """One pattern update: in every layer prune the fraction pr(step) of active blocks with the lowest Lp norm
        and regrow as many among the blocks inactive before the update. Regrown weights and their optimizer moments
        start at zero; pruned weights and their moments are zeroed."""
        pr = self.schedule.pruning_ratio(step) if self.schedule is not None else self.config.pruning_ratio
        self.last_pruning_ratio = pr
        self.last_update = {}
        for name, module in self.modules.items():
            mask = self.masks[name]
            weight = module.weight
            active = mask.mask.flatten()
            # Drawn for every layer at every update, whatever the counts, so the RNG stream is reproducible.
            random_scores = torch.rand(mask.num_blocks, generator=self.generator).to(weight.device)
            n_active = int(active.sum())
            k = min(int(round(pr * n_active)), mask.num_blocks - n_active)
            if k <= 0:
                continue
            scores = mask.block_scores(weight, self.config.block_metric).flatten()
            scores = scores.masked_fill(~active, float("inf"))
            pruned = torch.topk(scores, k, largest=False).indices
            if self.config.regrowth == "gradient" and name in self._grad_scores:
                grow_scores = self._grad_scores[name].to(weight.device).flatten().clone()
            else:
                grow_scores = random_scores
            grow_scores = grow_scores.masked_fill(active, float("-inf"))  # only blocks inactive before the update
            regrown = torch.topk(grow_scores, k).indices
            new = active.clone()
            new[pruned] = False
            new[regrown] = True
            survivors = (active & new).view(mask.grid)
            if self.track_changes:
                self.last_update[name] = (active.view(mask.grid).clone(), new.view(mask.grid).clone())
            mask.apply_(weight.data, survivors)
            self._zero_optimizer_state(weight, mask, survivors)
            mask.mask.copy_(new.view(mask.grid))
            mask.ever_active |= mask.mask
        self._sync_masks()
        self.updates_done += 1

    def _zero_optimizer_state(self, weight: torch.Tensor, mask: BlockMask, keep: torch.Tensor) -> None:
        if self.optimizer is None:
            return
        state = self.optimizer.state.get(weight)
        if not state:
            return
        for value in state.values():
            if torch.is_tensor(value) and value.shape == weight.shape:
                mask.apply_(value, keep)

    def _sync_masks(self) -> None:
        """Under DDP, broadcasts rank 0's masks (one collective): identical on every rank by construction (same
        seed, same weights, all-reduced gradients), this makes it a guarantee."""
        if not _distributed() or not self.masks:
            return
        device = torch.device("cpu")
        if torch.distributed.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flat = torch.cat([m.mask.flatten() for m in self.masks.values()]).to(device=device, dtype=torch.uint8)
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for m in self.masks.values():
            n = m.num_blocks
            m.mask.copy_(flat[offset : offset + n].view(m.grid).bool())
            m.ever_active |= m.mask
            offset += n

    # -------------------------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """Current sparsity, pruning ratio, explored degrees of freedom and non-embedding forward FLOPs per token
        (2 × weights of every non-embedding `Linear`; a training step costs about 3×)."""
        total = sum(m.numel for m in self.masks.values())
        active = sum(m.num_active() * m.block_numel for m in self.masks.values())
        explored = sum(int(m.ever_active.sum()) * m.block_numel for m in self.masks.values())
        dense_flops = 2 * self._dense_linear_weights
        sparse_flops = dense_flops - 2 * (total - active)
        pr = self.schedule.pruning_ratio(self.step_count) if self.schedule is not None else self.last_pruning_ratio
        return {
            "dynsparse/sparsity": 1.0 - active / total,
            "dynsparse/pruning_ratio": pr,
            "dynsparse/explored_dof": explored / total,
            "dynsparse/updates": float(self.updates_done),
            "dynsparse/flops_per_token_sparse": float(sparse_flops),
            "dynsparse/flops_per_token_dense": float(dense_flops),
        }

    def module_sparsity(self) -> dict[str, float]:
        """Measured zero fraction of every sparse weight."""
        return {
            name: float((module.weight == 0).sum()) / module.weight.numel() for name, module in self.modules.items()
        }

    def pruning_state(self, **kwargs: Any) -> PruningState:
        """The [`PruningState`] describing the trained sparse model, for the export path."""
        metrics = {k.split("/", 1)[1]: v for k, v in self.metrics().items()}
        metrics.pop("pruning_ratio", None)
        metrics["optimizer_steps"] = self.step_count
        metrics.update(kwargs.pop("metrics", {}))
        return PruningState(
            config=self.config,
            layout=self.config.layout,
            module_sparsity=self.module_sparsity(),
            module_numel={name: module.weight.numel() for name, module in self.modules.items()},
            metrics=metrics,
            **kwargs,
        )

    # ---------------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks, ever-active masks, RNG state and counters: all that resuming needs besides weights and optimizer."""
        return {
            "masks": {n: m.mask.cpu().clone() for n, m in self.masks.items()},
            "ever_active": {n: m.ever_active.cpu().clone() for n, m in self.masks.items()},
            "rng_state": self.generator.get_state(),
            "step_count": self.step_count,
            "updates_done": self.updates_done,
            "last_pruning_ratio": self.last_pruning_ratio,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.masks) - set(state["masks"])
        extra = set(state["masks"]) - set(self.masks)
        if missing or extra:
            raise ValueError(
                f"DynSparse state does not match the model's sparse modules: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(extra)[:5]}"
            )
        saved = state.get("config", {})
        for key in ("sparsity", "block_size", "seed"):
            if key in saved and saved[key] != self.config.to_dict()[key]:
                raise ValueError(
                    f"DynSparse checkpoint was written with {key}={saved[key]!r}, the config says "
                    f"{self.config.to_dict()[key]!r}"
                )
        for name, mask in self.masks.items():
            loaded = state["masks"][name]
            if tuple(loaded.shape) != mask.grid:
                raise ValueError(f"DynSparse mask of {name!r} has shape {tuple(loaded.shape)}, expected {mask.grid}")
            mask.mask.copy_(loaded.bool())
            mask.ever_active.copy_(state["ever_active"][name].bool())
        self.generator.set_state(state["rng_state"].to(torch.uint8).cpu())
        self.step_count = int(state["step_count"])
        self.updates_done = int(state["updates_done"])
        self.last_pruning_ratio = float(state.get("last_pruning_ratio", 0.0))
        self.restored = True

    def save(self, directory: str | os.PathLike) -> str:
        """Writes the state to `directory/dynsparse_state.safetensors` (tensors + JSON counters; no pickle)."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {f"mask::{n}": t for n, t in state["masks"].items()}
        tensors.update({f"ever_active::{n}": t for n, t in state["ever_active"].items()})
        tensors["rng_state"] = state["rng_state"]
        meta = {k: state[k] for k in ("step_count", "updates_done", "last_pruning_ratio", "config")}
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, STATE_FILE)
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"dynsparse": json.dumps(meta)})
        os.replace(tmp, path)
        return path

    def load(self, directory: str | os.PathLike) -> None:
        """Restores the state written by [`save`] from `directory` (or the file path itself)."""
        from safetensors import safe_open

        path = os.fspath(directory)
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No DynSparse state at {path!r}")
        with safe_open(path, framework="pt") as fh:
            meta = json.loads(fh.metadata()["dynsparse"])
            state = {"masks": {}, "ever_active": {}, **meta}
            for key in fh.keys():
                if key == "rng_state":
                    state["rng_state"] = fh.get_tensor(key)
                else:
                    kind, name = key.split("::", 1)
                    state["masks" if kind == "mask" else "ever_active"][name] = fh.get_tensor(key)
        self.load_state_dict(state)
