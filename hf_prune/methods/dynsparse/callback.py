"""`DynSparseCallback`: DynSparse inside a stock `transformers.Trainer` (and inside `PruningTrainer`)."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ...state import set_pruning_state
from .config import DynSparseConfig
from .updater import STATE_FILE, DynSparseUpdater

logger = logging.getLogger(__name__)


class DynSparseCallback(TrainerCallback):
    """Always-sparse training with a moving pattern in a stock `Trainer`.

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DynSparseCallback(DynSparseConfig(sparsity=0.9, block_size=16))])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    ```

    At `on_train_begin` the masks are created (or restored from the checkpoint being resumed) and applied; after every
    optimizer step that really happened the weights are re-masked and, when due, the pattern is updated; each log
    entry gains `dynsparse/sparsity`, `dynsparse/pruning_ratio`, `dynsparse/explored_dof`, `dynsparse/updates`,
    `dynsparse/flops_per_token_sparse` and `dynsparse/flops_per_token_dense`; each checkpoint gains
    `dynsparse_state.safetensors` (masks, RNG state, counters); at the end the model carries its `PruningState`.

    Args:
        config ([`DynSparseConfig`], *optional*): the method config (or give `updater`).
        updater ([`DynSparseUpdater`], *optional*): an existing updater (what the `PruningTrainer` plugin passes).
        save_state (`bool`, *optional*, defaults to `True`): write `dynsparse_state.safetensors` into each checkpoint.
            The `PruningTrainer` plugin passes `False`: that trainer already saves the same state as its plugin
            state (`hf_prune_plugin_state.*`) and restores it before training begins.
    """

    def __init__(self, config: DynSparseConfig | None = None, *, updater: DynSparseUpdater | None = None,
                 save_state: bool = True):
        if updater is None and not isinstance(config, DynSparseConfig):
            raise TypeError(f"DynSparseCallback needs a DynSparseConfig, got {type(config).__name__}")
        self.config = updater.config if updater is not None else config
        self.updater = updater
        self.save_state = save_state

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.updater is None:
            self.updater = DynSparseUpdater(model, self.config)
        if state.global_step > 0 and not self.updater.restored:
            self.updater.load(self._resume_dir(args, state))
        self.updater.bind(optimizer, state.max_steps)
        self.updater.apply_masks()

    @staticmethod
    def _resume_dir(args, state) -> str:
        candidates = []
        if isinstance(args.resume_from_checkpoint, str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        for directory in candidates:
            if os.path.isfile(os.path.join(directory, STATE_FILE)):
                return directory
        raise FileNotFoundError(
            f"Resuming at step {state.global_step} but no {STATE_FILE} found in {candidates}; the DynSparse pattern "
            "cannot continue exactly. Pass a checkpoint written with DynSparseCallback, or call "
            "callback.updater.load(dir) before training."
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.updater.after_optimizer_step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.updater is None or logs is None:
            return
        metrics = self.updater.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_save(self, args, state, control, **kwargs):
        if self.save_state and state.is_world_process_zero:
            directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(directory):
                self.updater.save(directory)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.updater.unbind()
        set_pruning_state(model if model is not None else self.updater.model, self.updater.pruning_state())
