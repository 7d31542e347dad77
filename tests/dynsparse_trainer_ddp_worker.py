"""Worker of test_dynsparse_trainer_ddp: DynSparse through `PruningTrainer` under torchrun (2 CPU processes, gloo).

Trains 8 steps with a checkpoint at step 3 (mid-epoch, between pattern updates), then resumes a fresh model and
trainer from that checkpoint. Writes every rank's per-step mask fingerprints, losses and final weights of both runs
to OUT/rank{r}.pt.
"""

import gc
import os
import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from dynsparse_utils import ToyMLMData, tiny_bert_mlm  # noqa: E402

from hf_prune import DynSparseConfig, PruningTrainer  # noqa: E402

CONFIG = DynSparseConfig(sparsity=0.8, block_size=16, num_updates=3, pruning_ratio=0.5, seed=7)


class MaskRecorder(TrainerCallback):
    """After every step: the concatenated masks of every sparse layer and the number of pattern updates so far."""

    def __init__(self, updater):
        self.updater, self.masks, self.updates = updater, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.masks[state.global_step] = torch.cat([m.mask.flatten() for m in self.updater.masks.values()]).clone()
        self.updates[state.global_step] = self.updater.updates_done


def train(out, resume=None) -> dict:
    args = TrainingArguments(
        output_dir=out, max_steps=8, per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1,
        save_strategy="steps", save_steps=3, report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, ddp_backend="gloo",
    )
    model = tiny_bert_mlm(seed=0)
    trainer = PruningTrainer(model=model, args=args, train_dataset=ToyMLMData(), pruning_config=CONFIG)
    recorder = MaskRecorder(trainer.pruning_plugin.updater)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.args.world_size == 2
    result = {
        "masks": {str(k): v for k, v in recorder.masks.items()},
        "updates": {str(k): v for k, v in recorder.updates.items()},
        "losses": {str(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e},
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "generator": trainer.pruning_plugin.updater.generator.get_state(),
    }
    # Free DDP (its reducer holds gloo work) on every rank before the process group goes (see dynsparse_ddp_worker).
    dist.barrier()
    trainer.accelerator.free_memory()
    del trainer, model, recorder
    gc.collect()
    return result


def main(out):
    full = train(os.path.join(out, "full"))
    resumed = train(os.path.join(out, "resumed"), resume=os.path.join(out, "full", "checkpoint-3"))
    torch.save({"full": full, "resumed": resumed}, os.path.join(out, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
