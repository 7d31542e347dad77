"""Worker of test_distillation's DDP test: logit distillation through `PruningTrainer` under torchrun (2 CPU
processes, gloo). Writes every rank's final student weights, step count and logged kd losses to OUT/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cofi_helpers import ToyLMDataset, tiny_llama, training_args  # noqa: E402

from hf_prune import DistillationConfig, PruningTrainer  # noqa: E402


def main(out):
    teacher, student = tiny_llama(0), tiny_llama(1, num_hidden_layers=2, intermediate_size=24)
    args = training_args(out, max_steps=4, per_device_train_batch_size=4, logging_steps=1, ddp_backend="gloo",
                         learning_rate=1e-2)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=None,
                             distillation_config=DistillationConfig(temperature=2.0, alpha=0.5),
                             train_dataset=ToyLMDataset())
    trainer.train()
    assert dist.get_world_size() == 2 and trainer.args.world_size == 2
    torch.save({"state": {k: v.clone() for k, v in student.state_dict().items()}, "steps": trainer.state.global_step,
                "kd": [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]},
               os.path.join(out, f"rank{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
