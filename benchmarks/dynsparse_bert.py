"""DynSparse benchmarks on a small BERT (CPU).

1. Overhead: training step time with DynSparse (hook + masking + pattern updates) vs the same model dense, in a plain
   loop; and the cost of one pattern update. Dense and sparse runs are interleaved and repeated; medians reported.
2. Replication over seeds (MLM from scratch on the shipped Wikipedia articles, via
   `integrations/dynsparse_bert_mlm.py`; protocol in `benchmarks/dynsparse_replication.py`): static, DynSparse
   (random and gradient regrowth) at s = 0.9 with 1x1 and 16x16 blocks, and a dense learning-rate sweep of the dense
   and FLOP-matched dense models; mean ± std over seeds and paired differences with 95 % t intervals. Resumable: the
   same command again skips the finished runs (kept in the JSON after each run) and trains the rest;
   `--extra-seeds static_b1,dynsparse_b1:3,4` adds seeds to some sparse arms of the same file (one comparison made
   tighter without re-running the rest).

    python benchmarks/dynsparse_bert.py --part overhead
    OMP_NUM_THREADS=1 python benchmarks/dynsparse_bert.py --part replication --max-steps 200 --num-updates 20

Writes a markdown table and JSON to benchmarks/results/ (replication: `dynsparse_replication_<label>.{json,md}`,
label `steps<max_steps>_seeds<n>` unless `--label` is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "integrations"))

import torch  # noqa: E402
from transformers import BertForMaskedLM  # noqa: E402

from hf_prune import DynSparseConfig, attach  # noqa: E402
from hf_prune.cpu import machine_state  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def overhead(hidden=256, layers=4, heads=4, seq_len=128, batch_size=16, steps=30, update_every=10, repeats=3,
             block_size=1, sparsity=0.9) -> dict:
    from dynsparse_bert_mlm import bert_config

    config = bert_config(30522, hidden, layers, heads, seq_len)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, 30522, (batch_size, seq_len), generator=g) for _ in range(4)]

    def run(sparse: bool) -> tuple[float, list[float]]:
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        pruner = None
        if sparse:
            pruner = attach(model, DynSparseConfig(sparsity=sparsity, block_size=block_size, update_interval=update_every),
                            optimizer=opt, total_steps=steps + 1)
        update_times = []
        ids = data[0]
        model(input_ids=ids, labels=ids).loss.backward()  # warm-up step, not timed
        opt.zero_grad()
        start = time.perf_counter()
        for i in range(steps):
            ids = data[i % len(data)]
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            if pruner is not None:
                t0 = time.perf_counter()
                updated = pruner.step()
                if updated:
                    update_times.append(time.perf_counter() - t0)
            opt.zero_grad()
        return (time.perf_counter() - start) / steps, update_times

    dense, sparse, updates = [], [], []
    for _ in range(repeats):
        dense.append(run(False)[0])
        t, u = run(True)
        sparse.append(t)
        updates.extend(u)
    d, s = statistics.median(dense), statistics.median(sparse)
    return {
        "model": f"BERT h={hidden} L={layers} seq={seq_len} batch={batch_size}", "block_size": block_size,
        "sparsity": sparsity, "steps": steps, "update_every": update_every, "repeats": repeats,
        "dense_step_s": d, "dynsparse_step_s": s, "overhead": s / d - 1.0,
        "update_s_median": statistics.median(updates) if updates else None, "dense_step_s_all": dense,
        "dynsparse_step_s_all": sparse, "threads": torch.get_num_threads(),
    }


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _extra_seeds(specs: list[str]) -> dict[str, list[int]]:
    """`["static_b1,dynsparse_b1:3,4"]` -> `{"static_b1": [3, 4], "dynsparse_b1": [3, 4]}`."""
    extra: dict[str, list[int]] = {}
    for spec in specs:
        arms, sep, seeds = spec.partition(":")
        if not sep or not arms or not seeds:
            raise SystemExit(f"--extra-seeds wants ARM[,ARM...]:SEED[,SEED...] (e.g. static_b1,dynsparse_b1:3,4), "
                             f"got {spec!r}")
        for arm in arms.split(","):
            extra.setdefault(arm, []).extend(s for s in _ints(seeds) if s not in extra.get(arm, []))
    return extra


def replication(a) -> dict:
    """Runs (or resumes) the multi-seed replication and prints its tables."""
    from dynsparse_replication import Replication, markdown

    protocol = {
        "hidden": a.hidden or 128, "layers": a.layers, "heads": 4, "seq_len": a.seq_len or 64,
        "batch_size": a.batch_size, "max_steps": a.max_steps, "sparsity": 0.9, "num_updates": a.num_updates,
        "pruning_ratio": 0.5, "sparse_base_lr": a.lr, "dense_lrs": _floats(a.dense_lrs), "seeds": _ints(a.seeds),
        "sweep_seeds": _ints(a.sweep_seeds) if a.sweep_seeds else _ints(a.seeds)[:1],
    }
    if a.extra_seeds:
        protocol["extra_seeds"] = _extra_seeds(a.extra_seeds)
    label = a.label or f"steps{a.max_steps}_seeds{len(protocol['seeds'])}"
    data = {}

    def load_data():
        """Tokenizer and data, loaded once, when needed: a finished replication only re-summarises."""
        if not data:
            from dynsparse_bert_mlm import mlm_datasets, tokenizer_path
            from transformers import AutoTokenizer

            data["tokenizer"] = AutoTokenizer.from_pretrained(tokenizer_path())
            data["train"], data["evaluation"] = mlm_datasets(data["tokenizer"], protocol["seq_len"])

    def train(arm: dict, seed: int) -> dict:
        from dynsparse_bert_mlm import run_mlm

        load_data()
        return run_mlm(
            arm["mode"], tokenizer=data["tokenizer"], train=data["train"], evaluation=data["evaluation"],
            hidden=protocol["hidden"], layers=protocol["layers"], heads=protocol["heads"], seq_len=protocol["seq_len"],
            batch_size=protocol["batch_size"], max_steps=protocol["max_steps"], lr=arm["lr"],
            sparsity=protocol["sparsity"], block_size=arm["block_size"], num_updates=protocol["num_updates"],
            pruning_ratio=protocol["pruning_ratio"], regrowth=arm["regrowth"], seed=seed,
            output_dir=f"/tmp/hf_prune_dynsparse_replication_{label}",
        )

    path = RESULTS / f"dynsparse_replication_{label}.json"
    reference = None
    if not (path.exists() and json.loads(path.read_text()).get("reference")):
        from dynsparse_bert_mlm import unigram_mlm_loss

        load_data()
        reference = {"unigram_eval_mlm_loss": unigram_mlm_loss(data["train"], data["evaluation"], len(data["tokenizer"]))}
    doc = Replication(path, protocol, train, reference=reference).run()
    print(markdown(doc))
    return doc


def budget_trend(files: list[str] | None) -> dict:
    """Prints and writes (`dynsparse_replication_trend.{json,md}`) the replications side by side by budget."""
    from dynsparse_replication import trend, trend_markdown

    paths = [Path(f) for f in files] if files else sorted(RESULTS.glob("dynsparse_replication_steps*_seeds*.json"))
    missing = [str(f) for f in paths if not f.is_file()]
    if missing or not paths:
        raise SystemExit(f"--part trend: no such replication file: {', '.join(missing) or RESULTS / 'dynsparse_replication_steps*_seeds*.json'}")
    try:
        t = trend({f.name: json.loads(f.read_text()) for f in paths})
    except ValueError as e:
        raise SystemExit(str(e)) from None
    text = trend_markdown(t)
    print(text)
    (RESULTS / "dynsparse_replication_trend.json").write_text(json.dumps(t, indent=2) + "\n")
    (RESULTS / "dynsparse_replication_trend.md").write_text(text + "\n")
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["overhead", "replication", "trend", "all"], default="all",
                   help="trend: the finished replications side by side by budget (no training)")
    p.add_argument("--steps", type=int, default=30, help="overhead: timed steps per run")
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=200, help="replication: optimizer steps per run")
    p.add_argument("--hidden", type=int, default=None, help="default: 256 (overhead), 128 (replication)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: 128 (overhead), 64 (replication)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-updates", type=int, default=None,
                   help="replication: pattern updates per run (default: the paper's 160 for 1x1 / 80 for 16x16, meant "
                   "for long runs; short runs want fewer)")
    p.add_argument("--seeds", default="0,1,2", help="replication: comma list of seeds (init, data order, masks)")
    p.add_argument("--sweep-seeds", default=None, help="replication: seeds of the dense lr sweep (default: the first)")
    p.add_argument("--dense-lrs", default="3.2e-4,1e-3,3.2e-3,1e-2", help="replication: the dense learning-rate sweep")
    p.add_argument("--lr", type=float, default=5e-4,
                   help="replication: dense lr eta(0) of the sparse rule; sparse arms train at sparse_learning_rate(lr)")
    p.add_argument("--extra-seeds", action="append", default=[], metavar="ARMS:SEEDS",
                   help="replication: more seeds for some sparse arms, e.g. static_b1,dynsparse_b1:3,4 (repeatable; "
                   "added to the label's file, whose other runs are kept)")
    p.add_argument("--trend-files", nargs="*", default=None, metavar="JSON",
                   help="trend: replication files (default: every dynsparse_replication_steps*_seeds*.json in "
                   "benchmarks/results)")
    p.add_argument("--label", default="", help="suffix of the result files (e.g. 'short')")
    a = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = f"_{a.label}" if a.label else ""
    if a.part in ("overhead", "all"):
        rows = [overhead(hidden=a.hidden or 256, layers=a.layers, seq_len=a.seq_len or 128, batch_size=a.batch_size, steps=a.steps,
                         update_every=a.update_every, repeats=a.repeats, block_size=b) for b in (1, 16)]
        table = ["| model | block | dense s/step | DynSparse s/step | overhead | one update (s) |", "|---|---|---|---|---|---|"]
        for r in rows:
            table.append(f"| {r['model']} | {r['block_size']} | {r['dense_step_s']:.3f} | {r['dynsparse_step_s']:.3f} | "
                         f"{100 * r['overhead']:+.1f}% | {r['update_s_median']:.4f} |")
        text = "\n".join(table)
        print(text)
        state = machine_state()
        (RESULTS / f"dynsparse_overhead{suffix}.json").write_text(
            json.dumps([dict(r, machine_state=state) for r in rows], indent=2) + "\n")
        (RESULTS / f"dynsparse_overhead{suffix}.md").write_text(text + "\n")
    if a.part in ("replication", "all"):
        replication(a)
    if a.part == "trend":
        budget_trend(a.trend_files)


if __name__ == "__main__":
    main()
