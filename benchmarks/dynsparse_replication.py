"""The multi-seed DynSparse replication protocol, resumable: which runs exist, in which order they train, how finished
runs are kept in one JSON file, and the statistics over seeds (mean ± std per arm, paired differences with 95 %
t intervals). Training itself is a function passed in (`benchmarks/dynsparse_bert.py` passes one around
`integrations/dynsparse_bert_mlm.run_mlm`), so the bookkeeping is testable without training.

Order of the runs (so that an interrupted replication has its most important comparisons first):
1. static and DynSparse (random regrowth) at 1x1 and 16x16 blocks, every seed;
2. the dense learning-rate sweep: `dense` and `dense_matched` at every `dense_lrs` value on the `sweep_seeds`;
3. per dense mode, the best swept lr (lowest mean eval loss on the sweep seeds) on the remaining seeds: the dense row;
4. DynSparse with gradient regrowth at 1x1 and 16x16, every seed;
5. `extra_seeds` (optional, e.g. `{"static_b1": [3, 4], "dynsparse_b1": [3, 4]}`): more seeds for some sparse arms,
   to tighten one comparison without re-running the rest. They accumulate in the file: asking for extra seeds extends
   a finished replication in place, and the plain command resumes whatever extra seeds the file holds.
   `dense_lrs` accumulate the same way: a wider sweep on a finished file trains only the new lrs (and, if one of them
   becomes the best, the dense rows at that lr on the other seeds).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from hf_prune.cpu import machine_state
from paired_stats import mean_std, paired_difference

logger = logging.getLogger(__name__)

BLOCKS = (1, 16)
DENSE_MODES = ("dense", "dense_matched")
PROTOCOL_DEFAULTS = {"extra_seeds": {}}  # what a file written before a key existed means by its absence


def sparse_arm(mode: str, block: int, base_lr: float, regrowth: str = "random") -> dict:
    name = "gradient" if regrowth == "gradient" else mode
    return {"arm": f"{name}_b{block}", "mode": mode, "block_size": block, "regrowth": regrowth, "lr": base_lr}


def dense_arm(mode: str, lr: float) -> dict:
    return {"arm": f"{mode}@lr={lr:.1e}", "mode": mode, "block_size": 1, "regrowth": "random", "lr": lr}


def run_key(arm: dict, seed: int) -> str:
    return f"{arm['arm']}/seed={seed}"


def sparse_arms(base_lr: float) -> dict[str, dict]:
    """Every sparse arm of the protocol by name: static, DynSparse random and gradient regrowth, per block size."""
    arms = [sparse_arm(mode, b, base_lr) for b in BLOCKS for mode in ("static", "dynsparse")]
    arms += [sparse_arm("dynsparse", b, base_lr, "gradient") for b in BLOCKS]
    return {arm["arm"]: arm for arm in arms}


def check_protocol(protocol: dict) -> None:
    """Clear errors for a protocol that cannot run, before any training."""
    seeds, sweep = protocol["seeds"], protocol["sweep_seeds"]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"replication: seeds must be distinct and non-empty, got {seeds}")
    if not sweep or not set(sweep) <= set(seeds):
        raise ValueError(f"replication: sweep_seeds must be a non-empty subset of seeds {seeds}, got {sweep}")
    lrs = protocol["dense_lrs"]
    if not lrs or any(not lr > 0 for lr in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"replication: dense_lrs must be distinct positive numbers, got {lrs}")
    names = sparse_arms(protocol["sparse_base_lr"])
    for arm, extra in protocol.get("extra_seeds", {}).items():
        if arm not in names:
            raise ValueError(f"replication: extra_seeds names arm {arm!r}; allowed: {', '.join(names)}")
        if not extra or len(set(extra)) != len(extra) or set(extra) & set(seeds):
            raise ValueError(f"replication: extra_seeds of {arm} must be distinct seeds not in seeds {seeds}, "
                             f"got {extra}")


class Replication:
    """Runs the protocol's missing runs one at a time, saving `path` (JSON) and its markdown twin after each.

    Args:
        path (`Path`): the results JSON; if it exists its finished runs are kept and skipped. It must hold the same
            protocol (else a `ValueError` names the differing fields: pick another label).
        protocol (`dict`): model/training sizes plus `seeds`, `sweep_seeds`, `dense_lrs`, `sparse_base_lr`, and
            optionally `extra_seeds` (arm name -> more seeds; merged with the file's). `dense_lrs` are merged with
            the file's too (a wider sweep extends it in place).
        train_fn (`Callable[[dict, int], dict]`): trains one arm at one seed; returns at least `eval_mlm_loss`.
        reference (`dict`, *optional*): losses that need no training, printed beside the arms (e.g.
            `{"unigram_eval_mlm_loss": 7.16}`); kept from the file when not given.
    """

    def __init__(self, path: Path, protocol: dict, train_fn: Callable[[dict, int], dict],
                 reference: dict | None = None):
        check_protocol(protocol)
        self.path, self.protocol, self.train_fn = Path(path), protocol, train_fn
        self.runs: dict[str, dict] = {}
        self.reference = dict(reference or {})
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            old = {**PROTOCOL_DEFAULTS, **saved.get("protocol", {})}
            asked = {**PROTOCOL_DEFAULTS, **protocol}
            grows = ("extra_seeds", "dense_lrs")  # asking for more of these extends the file in place
            diff = sorted(k for k in set(old) | set(asked) if k not in grows and old.get(k) != asked.get(k))
            if diff:
                raise ValueError(
                    f"{self.path} holds a replication with another protocol (differs in {', '.join(diff)}: "
                    + "; ".join(f"{k}: saved {old.get(k)!r}, asked {protocol.get(k)!r}" for k in diff)
                    + "); use another --label or move that file away"
                )
            self.runs = saved.get("runs", {})
            self.reference = self.reference or saved.get("reference", {})
            # extra seeds accumulate: asking for more extends the file, asking for none resumes what it holds
            extra = {arm: list(seeds) for arm, seeds in old["extra_seeds"].items()}
            for arm, seeds in asked["extra_seeds"].items():
                extra[arm] = extra.get(arm, []) + [s for s in seeds if s not in extra.get(arm, [])]
            self.protocol = {**protocol, "extra_seeds": extra} if extra else dict(protocol)
            # so does the dense sweep: new lrs are swept, and the dense rows follow the best lr of the wider sweep
            self.protocol["dense_lrs"] = sorted(set(old["dense_lrs"]) | set(asked["dense_lrs"]))
            check_protocol(self.protocol)

    # --- planning -------------------------------------------------------------------------------------------------
    def _core(self) -> list[tuple[dict, int]]:
        base = self.protocol["sparse_base_lr"]
        return [(sparse_arm(mode, b, base), s) for b in BLOCKS for mode in ("static", "dynsparse")
                for s in self.protocol["seeds"]]

    def _sweep(self) -> list[tuple[dict, int]]:
        return [(dense_arm(mode, lr), s) for mode in DENSE_MODES for lr in self.protocol["dense_lrs"]
                for s in self.protocol["sweep_seeds"]]

    def _gradient(self) -> list[tuple[dict, int]]:
        base = self.protocol["sparse_base_lr"]
        return [(sparse_arm("dynsparse", b, base, "gradient"), s) for b in BLOCKS for s in self.protocol["seeds"]]

    def _extra(self) -> list[tuple[dict, int]]:
        arms = sparse_arms(self.protocol["sparse_base_lr"])
        return [(arms[name], s) for name, extra in self.protocol.get("extra_seeds", {}).items() for s in extra]

    def _dense_means(self, mode: str, seeds: list[int]) -> dict[float, float]:
        """Swept lr -> mean eval loss over `seeds`, for the lrs of `mode` that finished on all of them."""
        means = {}
        for lr in self.protocol["dense_lrs"]:
            losses = self._losses(dense_arm(mode, lr)["arm"])
            if all(s in losses for s in seeds):
                means[lr] = sum(losses[s] for s in seeds) / len(seeds)
        return means

    def best_dense_lr(self, mode: str) -> float | None:
        """The swept lr of `mode` with the lowest mean eval loss over the sweep seeds (None until the sweep is done)."""
        means = self._dense_means(mode, self.protocol["sweep_seeds"])
        return min(means, key=means.get) if len(means) == len(self.protocol["dense_lrs"]) else None

    def dense_row_lr(self, mode: str) -> float | None:
        """The lr of the dense row: among the swept lrs that ran on every seed, the one with the lowest mean over
        all of them (more evidence than the sweep seeds: a wider sweep can pick an lr that then fails on another
        seed); the sweep's best until one has run on every seed."""
        means = self._dense_means(mode, self.protocol["seeds"])
        return min(means, key=means.get) if means else self.best_dense_lr(mode)

    def _dense_rest(self) -> list[tuple[dict, int]] | None:
        rest = []
        for mode in DENSE_MODES:
            lr = self.best_dense_lr(mode)
            if lr is None:
                return None
            rest += [(dense_arm(mode, lr), s) for s in self.protocol["seeds"] if s not in self.protocol["sweep_seeds"]]
        return rest

    def total_runs(self) -> int:
        """Planned runs plus finished ones the plan no longer holds (a former dense row, before a wider sweep)."""
        planned = {run_key(arm, s) for phase in (self._core, self._sweep, self._gradient, self._extra)
                   for arm, s in phase()}
        rest = self._dense_rest()
        if rest is None:  # the sweep is not finished: the dense rows' lr is unknown; counted as new (an upper bound)
            return len(planned | set(self.runs)) + len(DENSE_MODES) * (
                len(self.protocol["seeds"]) - len(self.protocol["sweep_seeds"]))
        return len(planned | {run_key(arm, s) for arm, s in rest} | set(self.runs))

    def next_run(self) -> tuple[dict, int] | None:
        """The first unfinished run in protocol order (None when the replication is complete)."""
        for phase in (self._core, self._sweep, self._dense_rest, self._gradient, self._extra):
            jobs = phase()
            if jobs is None:  # cannot happen in order (the sweep precedes), kept for a hand-edited file
                raise RuntimeError("replication: the dense sweep is incomplete, cannot pick the dense lr")
            for arm, seed in jobs:
                if run_key(arm, seed) not in self.runs:
                    return arm, seed
        return None

    # --- running --------------------------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> dict:
        """Trains every missing run (saving after each) and returns the saved document."""
        from tqdm.auto import tqdm

        total = self.total_runs()
        bar = tqdm(total=total, initial=len(self.runs), desc="replication runs", disable=not progress)
        if len(self.runs):
            logger.info("resuming %s: %d of %d runs finished", self.path, len(self.runs), total)
        while (job := self.next_run()) is not None:
            arm, seed = job
            bar.set_postfix_str(run_key(arm, seed))
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            result = dict(self.train_fn(arm, seed))
            result.update(arm=arm["arm"], seed=seed, run_wall_seconds=time.perf_counter() - start,
                          load_before=load_before, load_after=os.getloadavg()[0], machine_state=machine_state(),
                          finished_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.runs[run_key(arm, seed)] = result
            self.save()
            logger.info("%s: eval loss %.4f in %.0f s", run_key(arm, seed), result["eval_mlm_loss"],
                        result["run_wall_seconds"])
            bar.update(1)
        bar.close()
        return self.save()

    def save(self) -> dict:
        """Writes the JSON (atomically: temp file then rename) and the markdown table; returns the document."""
        doc = {"protocol": self.protocol, "complete": self.next_run() is None, "finished_runs": len(self.runs),
               "total_runs": self.total_runs(), **self.summary(), "reference": self.reference, "runs": self.runs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for target, text in ((self.path, json.dumps(doc, indent=2) + "\n"),
                             (self.path.with_suffix(".md"), markdown(doc) + "\n")):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        return doc

    # --- statistics -----------------------------------------------------------------------------------------------
    def _losses(self, arm_name: str) -> dict[int, float]:
        return {r["seed"]: r["eval_mlm_loss"] for r in self.runs.values() if r["arm"] == arm_name}

    def table_arms(self) -> list[str]:
        """The rows of the main table: the dense modes at their row's lr, then the sparse arms."""
        names = []
        for mode in DENSE_MODES:
            lr = self.dense_row_lr(mode)
            if lr is not None:
                names.append(dense_arm(mode, lr)["arm"])
        base = self.protocol["sparse_base_lr"]
        for b in BLOCKS:
            names += [sparse_arm("static", b, base)["arm"], sparse_arm("dynsparse", b, base)["arm"],
                      sparse_arm("dynsparse", b, base, "gradient")["arm"]]
        return names

    def comparisons(self) -> list[tuple[str, str]]:
        pairs = []
        for b in BLOCKS:
            pairs += [(f"dynsparse_b{b}", f"static_b{b}"), (f"gradient_b{b}", f"static_b{b}"),
                      (f"gradient_b{b}", f"dynsparse_b{b}")]
        pairs += [("static_b16", "static_b1"), ("dynsparse_b16", "dynsparse_b1")]
        for mode in DENSE_MODES:
            lr = self.dense_row_lr(mode)
            if lr is not None:
                pairs += [(f"dynsparse_b{b}", dense_arm(mode, lr)["arm"]) for b in BLOCKS]
        return pairs

    def summary(self) -> dict:
        arms = {}
        for name in self.table_arms():
            runs = sorted((r for r in self.runs.values() if r["arm"] == name), key=lambda r: r["seed"])
            if not runs:
                continue
            first = runs[0]
            arms[name] = {
                "eval_mlm_loss": mean_std([r["eval_mlm_loss"] for r in runs]), "seeds": [r["seed"] for r in runs],
                "mode": first["mode"], "block_size": first.get("block_size"), "regrowth": first.get("regrowth"),
                "hidden": first.get("hidden"), "learning_rate": first.get("learning_rate"),
                "explored_dof": mean_std([r.get("explored_dof", 1.0) for r in runs])["mean"],
                "flops_per_token": first.get("flops_per_token"), "updates": first.get("updates"),
                "run_wall_seconds": mean_std([r["run_wall_seconds"] for r in runs]),
            }
        sweep = []
        for mode in DENSE_MODES:
            best, row = self.best_dense_lr(mode), self.dense_row_lr(mode)
            for lr in self.protocol["dense_lrs"]:
                losses = self._losses(dense_arm(mode, lr)["arm"])
                on_sweep = [losses[s] for s in self.protocol["sweep_seeds"] if s in losses]
                if on_sweep:
                    sweep.append({"mode": mode, "lr": lr, "sweep_seeds": [s for s in self.protocol["sweep_seeds"]
                                                                          if s in losses],
                                  "eval_mlm_loss": mean_std(on_sweep), "all_seeds": mean_std(list(losses.values())),
                                  "best": lr == row, "sweep_best": lr == best})
        comparisons = []
        for a, b in self.comparisons():
            la, lb = self._losses(a), self._losses(b)
            seeds = sorted(set(la) & set(lb))
            if seeds:
                comparisons.append({"a": a, "b": b, "seeds": seeds,
                                    **paired_difference([la[s] for s in seeds], [lb[s] for s in seeds])})
        return {"arms": arms, "dense_sweep": sweep, "comparisons": comparisons}


def reading(c: dict) -> str:
    """One comparison in plain words."""
    if c["n"] < 2:
        return "one seed: no interval"
    if not c["significant"]:
        return "not significant (interval contains 0)"
    return f"{c['a']} {'lower' if c['mean'] < 0 else 'higher'} loss, significant"


def markdown(doc: dict) -> str:
    p = doc["protocol"]
    lines = [
        f"Replication, {doc['finished_runs']} of {doc['total_runs']} runs finished"
        f"{'' if doc['complete'] else ' (INCOMPLETE: rerun the same command to resume)'}: BERT h={p['hidden']} "
        f"L={p['layers']} seq={p['seq_len']} batch={p['batch_size']}, {p['max_steps']} steps, s={p['sparsity']}, "
        f"{p['num_updates']} pattern updates, seeds {p['seeds']} (dense lr sweep on seeds {p['sweep_seeds']})"
        + "".join(f"; {arm} also on seeds {extra}" for arm, extra in p.get("extra_seeds", {}).items()) + ".",
        "",
        "| arm | block | hidden | lr | MLM eval loss (mean ± std) | n | DOF | non-emb FLOPs/token | s/run (mean) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, a in doc["arms"].items():
        loss = a["eval_mlm_loss"]
        block = a["block_size"] if a["mode"] in ("static", "dynsparse") else "-"
        lines.append(f"| {name} | {block} | {a['hidden']} | {a['learning_rate']:.2e} | {loss['mean']:.4f} ± "
                     f"{loss['std']:.4f} | {loss['n']} | {a['explored_dof']:.3f} | {a['flops_per_token'] / 1e6:.2f}M | "
                     f"{a['run_wall_seconds']['mean']:.0f} |")
    if doc.get("reference", {}).get("unigram_eval_mlm_loss") is not None:
        lines += ["", f"Reference, no training: predicting every masked token by its training-set frequency (a unigram "
                  f"model, add-one smoothed) scores {doc['reference']['unigram_eval_mlm_loss']:.4f} on the same eval "
                  "tokens; an arm above that has not yet learned more than token counts."]
    if doc["dense_sweep"]:
        lines += ["", "Dense learning-rate sweep (mean eval loss on the sweep seeds, and on every seed an lr ran on; "
                  "* = the dense row: the lowest mean over all seeds among the lrs run on every seed; + = the sweep "
                  "seeds' pick, which then runs on the other seeds):", "",
                  "| mode | lr | MLM eval loss (sweep seeds) | n | MLM eval loss (every seed run) | n |",
                  "|---|---|---|---|---|---|"]
        for r in doc["dense_sweep"]:
            every = r.get("all_seeds", r["eval_mlm_loss"])
            marks = (" *" if r["best"] else "") + (" +" if r.get("sweep_best", r["best"]) else "")
            lines.append(f"| {r['mode']} | {r['lr']:.1e}{marks} | {r['eval_mlm_loss']['mean']:.4f} ± "
                         f"{r['eval_mlm_loss']['std']:.4f} | {r['eval_mlm_loss']['n']} | {every['mean']:.4f} ± "
                         f"{every['std']:.4f} | {every['n']} |")
    if doc["comparisons"]:
        lines += ["", "Paired differences a − b of eval loss over the common seeds (negative: a better), 95 % t "
                  "interval:", "", "| a | b | n | mean diff | 95 % interval | reading |", "|---|---|---|---|---|---|"]
        for c in doc["comparisons"]:
            interval = f"[{c['low']:+.4f}, {c['high']:+.4f}]" if c["low"] is not None else "-"
            lines.append(f"| {c['a']} | {c['b']} | {c['n']} | {c['mean']:+.4f} | {interval} | {reading(c)} |")
    return "\n".join(lines)


# --- the trend with budget ----------------------------------------------------------------------------------------
BUDGET_KEYS = ("max_steps", "num_updates", "dense_lrs", "extra_seeds")  # what may differ between budget points


def _row(arm: str) -> str:
    """An arm's name across budgets: the dense rows are named by their mode (their best lr may differ)."""
    return arm.split("@")[0]


def trend(docs: dict[str, dict]) -> dict:
    """The same arms and comparisons side by side across replications that differ only in budget.

    Args:
        docs (`dict[str, dict]`): file name -> a saved replication document.

    Returns a dict with `budgets` (ordered by steps), `arms` (row -> per budget: mean, std, n, lr) and `comparisons`
    (`"a − b"` -> per budget: the paired difference). Raises `ValueError` naming the file and the fields when two
    documents differ in more than their budget.
    """
    if not docs:
        raise ValueError("trend: no replication files")
    ordered = sorted(docs.items(), key=lambda kv: kv[1]["protocol"]["max_steps"])
    first_name, first = ordered[0]
    fixed = {k: v for k, v in first["protocol"].items() if k not in BUDGET_KEYS}
    budgets, arms, comparisons = [], {}, {}
    for name, doc in ordered:
        p = doc["protocol"]
        diff = sorted(k for k in set(fixed) | set(p) if k not in BUDGET_KEYS and fixed.get(k) != p.get(k))
        if diff:
            raise ValueError(f"trend: {name} differs from {first_name} in more than the budget ({', '.join(diff)})")
        budget = f"{p['max_steps']} steps"
        budgets.append({"budget": budget, "file": name, "max_steps": p["max_steps"], "num_updates": p["num_updates"],
                        "tokens": p["max_steps"] * p["batch_size"] * p["seq_len"], "complete": doc["complete"],
                        "unigram_eval_mlm_loss": doc.get("reference", {}).get("unigram_eval_mlm_loss")})
        for arm, a in doc["arms"].items():
            arms.setdefault(_row(arm), {})[budget] = {**a["eval_mlm_loss"], "lr": a["learning_rate"]}
        for c in doc["comparisons"]:
            comparisons.setdefault(f"{_row(c['a'])} − {_row(c['b'])}", {})[budget] = {
                k: c[k] for k in ("mean", "low", "high", "n", "significant")}
    return {"budgets": budgets, "arms": arms, "comparisons": comparisons}


def trend_markdown(t: dict) -> str:
    names = [b["budget"] for b in t["budgets"]]

    def tokens(n: int) -> str:
        return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e3 else str(n)

    head = "| " + " | ".join(f"{b['budget']} ({tokens(b['tokens'])} tokens){'' if b['complete'] else ', incomplete'}"
                             for b in t["budgets"]) + " |"
    rule = "|---" * (len(names) + 1) + "|"
    lines = ["MLM eval loss, mean ± std over seeds (n), by training budget:", "", "| arm " + head, rule]
    for row, per in t["arms"].items():
        cells = [f"{per[n]['mean']:.4f} ± {per[n]['std']:.4f} ({per[n]['n']})"
                 + (f", lr {per[n]['lr']:.1e}" if row in DENSE_MODES else "") if n in per else "-" for n in names]
        lines.append(f"| {row}{' (best swept lr)' if row in DENSE_MODES else ''} | " + " | ".join(cells) + " |")
    if any(b["unigram_eval_mlm_loss"] is not None for b in t["budgets"]):
        cells = [f"{b['unigram_eval_mlm_loss']:.4f}" if b["unigram_eval_mlm_loss"] is not None else "-"
                 for b in t["budgets"]]
        lines.append("| unigram reference (no training) | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences a − b over the common seeds, 95 % t interval (* = significant; negative: a "
              "better):", "", "| a − b " + head, rule]
    for pair, per in t["comparisons"].items():
        cells = []
        for n in names:
            c = per.get(n)
            if c is None:
                cells.append("-")
            elif c["low"] is None:
                cells.append(f"{c['mean']:+.4f} (n={c['n']})")
            else:
                cells.append(f"{c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}]{' *' if c['significant'] else ''}"
                             f" (n={c['n']})")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
