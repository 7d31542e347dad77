"""Worker of test_cofi_ddp: `PruningTrainer` with CoFi under torchrun (2 CPU processes, gloo), through the freeze.
Writes every rank's final gates, lambdas, fixed masks and weights to OUT/rank{r}.pt. `KIND`: `encoder` (a tiny BERT
with a layer-count target) or `decoder` (a tiny LLaMA with GQA and a target architecture)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cofi_helpers import ToyDataset, ToyLMDataset, tiny_bert, tiny_llama, training_args  # noqa: E402

from hf_prune import CoFiConfig, PruningTrainer  # noqa: E402
from hf_prune.methods.cofi.structure import describe_structure  # noqa: E402


DECODER_TARGETS = dict(target_layers=3, target_kv_heads=2, target_intermediate_size=20, target_hidden_size=24)


def main(out, kind="encoder"):
    schedule = dict(sparsity_warmup_steps=3, finetune_steps=3, gate_learning_rate=0.05, lagrangian_learning_rate=0.05)
    if kind == "decoder":
        student, teacher, data = tiny_llama(0), tiny_llama(0), ToyLMDataset()
        cfg = CoFiConfig(**DECODER_TARGETS, **schedule)
    else:
        student, teacher, data = tiny_bert(0), tiny_bert(1), ToyDataset()
        cfg = CoFiConfig(target_sparsity=0.5, target_attention_layers=2, **schedule)
    args = training_args(out, max_steps=8, per_device_train_batch_size=4, ddp_backend="gloo")
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=args, pruning_config=cfg, train_dataset=data)
    trainer.train()
    rank = dist.get_rank()
    assert dist.get_world_size() == 2 and trainer.args.world_size == 2
    small = trainer.export_pruned_model()
    torch.save({"state": {k: v.clone() for k, v in student.state_dict().items()},
                "structure": describe_structure(small), "steps": trainer.state.global_step},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
