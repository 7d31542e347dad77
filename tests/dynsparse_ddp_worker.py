"""Worker of test_dynsparse_ddp: DDP over gloo, different data per rank, DynSparse through `attach`.
Writes every rank's mask fingerprint at every step to OUT/rank{r}.pt."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dynsparse_utils import batch, tiny_llama  # noqa: E402

from hf_prune import DynSparseConfig, attach  # noqa: E402


def main(out, regrowth):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    config = DynSparseConfig(sparsity=0.8, block_size=16, update_interval=2, regrowth=regrowth, seed=7)
    pruner = attach(ddp, config, optimizer=opt, total_steps=8)
    history = []
    for step in range(8):
        ddp(**batch(100 * rank + step)).loss.backward()  # each rank sees different data
        opt.step()
        pruner.step()
        opt.zero_grad()
        history.append(torch.cat([m.mask.flatten() for m in pruner.updater.masks.values()]).clone())
    torch.save({"history": torch.stack(history), "updates": pruner.updater.updates_done,
                "weights": {k: v.clone() for k, v in model.state_dict().items()}}, os.path.join(out, f"rank{rank}.pt"))
    # Free DDP (its reducer holds gloo work) on every rank before the process group goes: with torch 2.13 a DDP
    # module still alive at destroy_process_group() hung or aborted the exit about one run in seven, with or without
    # hf_prune.
    dist.barrier()
    del ddp, pruner, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
