"""Worker of test_cofi_ddp: `PruningTrainer` with CoFi under torchrun (2 CPU processes, gloo), through the freeze.
Writes every rank's final gates, lambdas, fixed masks and weights to OUT/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cofi_helpers import ToyDataset, tiny_bert, training_args  # noqa: E402

from hf_prune import CoFiConfig, PruningTrainer  # noqa: E402
from hf_prune.methods.cofi.structure import describe_structure  # noqa: E402


def main(out):
    student, teacher = tiny_bert(0), tiny_bert(1)
    cfg = CoFiConfig(target_sparsity=0.5, sparsity_warmup_steps=3, finetune_steps=3, gate_learning_rate=0.05,
                     lagrangian_learning_rate=0.05, target_attention_layers=2)
    args = training_args(out, max_steps=8, per_device_train_batch_size=4, ddp_backend="gloo")
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=cfg,
                             train_dataset=ToyDataset())
    trainer.train()
    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and trainer.args.world_size == 2
    small = trainer.export_pruned_model()
    torch.save({"state": {k: v.clone() for k, v in student.state_dict().items()},
                "structure": describe_structure(small), "steps": trainer.state.global_step},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
