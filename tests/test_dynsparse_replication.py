"""The DynSparse replication's statistics (known numbers), resumable bookkeeping, and seed handling of run_mlm."""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "integrations"))
from dynsparse_replication import Replication  # noqa: E402
from paired_stats import mean_std, paired_difference, t_quantile_975  # noqa: E402


def test_t_quantiles_and_paired_interval_on_known_numbers():
    assert t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)
    with pytest.raises(ValueError, match="df must be an int >= 1"):
        t_quantile_975(0)
    assert mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    # differences 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3)
    d = paired_difference([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    half = 4.303 / math.sqrt(3)
    assert d["mean"] == 2.0 and d["std"] == 1.0
    assert d["low"] == pytest.approx(2.0 - half) and d["high"] == pytest.approx(2.0 + half)
    assert not d["significant"]  # [-0.484, 4.484] contains 0
    assert paired_difference([2.0, 2.1, 1.9], [1.0, 1.0, 1.0])["significant"]
    d = paired_difference([1.0, 1.1, 0.9], [1.0, 1.0, 1.0])
    assert d["mean"] == pytest.approx(0.0, abs=1e-12) and not d["significant"]
    assert paired_difference([1.0], [2.0])["low"] is None
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1.0, 2.0], [1.0])


PROTOCOL = {"hidden": 8, "layers": 1, "heads": 1, "seq_len": 8, "batch_size": 2, "max_steps": 1, "sparsity": 0.9,
            "num_updates": 1, "pruning_ratio": 0.5, "sparse_base_lr": 5e-4, "dense_lrs": [1e-3, 3e-3, 1e-2],
            "seeds": [0, 1, 2], "sweep_seeds": [0]}


def _fake(calls, stop_after=None):
    def train(arm, seed):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append((arm["arm"], seed))
        loss = {"dense": 5.0 + abs(math.log10(arm["lr"]) + 2.5)}.get(arm["mode"], 6.0) + 0.01 * seed
        return {"mode": arm["mode"], "block_size": arm["block_size"], "regrowth": arm["regrowth"], "hidden": 8,
                "learning_rate": arm["lr"], "eval_mlm_loss": loss, "flops_per_token": 1.0e6}
    return train


def test_resume_skips_finished_runs(tmp_path):
    path = tmp_path / "rep.json"
    first = []
    with pytest.raises(KeyboardInterrupt):
        Replication(path, PROTOCOL, _fake(first, stop_after=5)).run(progress=False)
    saved = json.loads(path.read_text())
    assert saved["finished_runs"] == 5 and not saved["complete"] and saved["total_runs"] == 28
    rest = []
    doc = Replication(path, PROTOCOL, _fake(rest)).run(progress=False)
    assert not set(first) & set(rest) and len(first) + len(rest) == 28 and doc["complete"]
    for key, run in saved["runs"].items():  # finished runs kept as they were
        assert doc["runs"][key] == run
    # the dense row is the best swept lr (3e-3 for the fake), run on the remaining seeds
    assert ("dense@lr=3.0e-03", 1) in rest and ("dense@lr=1.0e-02", 1) not in rest
    assert "dense@lr=3.0e-03" in doc["arms"] and doc["arms"]["dense@lr=3.0e-03"]["eval_mlm_loss"]["n"] == 3
    assert len(doc["dense_sweep"]) == 6 and sum(r["best"] for r in doc["dense_sweep"]) == 2
    assert all("run_wall_seconds" in r for r in doc["runs"].values())
    again = []
    Replication(path, PROTOCOL, _fake(again)).run(progress=False)
    assert again == []
    with pytest.raises(ValueError, match="another protocol.*max_steps"):
        Replication(path, {**PROTOCOL, "max_steps": 2}, _fake([]))


def test_extra_seeds_extend_a_finished_replication_in_place(tmp_path):
    path = tmp_path / "rep.json"
    Replication(path, PROTOCOL, _fake([])).run(progress=False)
    more = {**PROTOCOL, "extra_seeds": {"static_b1": [3, 4], "dynsparse_b1": [3, 4]}}
    calls = []
    doc = Replication(path, more, _fake(calls)).run(progress=False)
    assert sorted(calls) == [("dynsparse_b1", 3), ("dynsparse_b1", 4), ("static_b1", 3), ("static_b1", 4)]
    assert doc["complete"] and doc["total_runs"] == 28 + 4 and doc["protocol"]["extra_seeds"] == more["extra_seeds"]
    assert doc["arms"]["static_b1"]["seeds"] == [0, 1, 2, 3, 4] and doc["arms"]["static_b16"]["eval_mlm_loss"]["n"] == 3
    pair = next(c for c in doc["comparisons"] if (c["a"], c["b"]) == ("dynsparse_b1", "static_b1"))
    assert pair["seeds"] == [0, 1, 2, 3, 4] and pair["n"] == 5
    assert "static_b1 also on seeds [3, 4]" in path.with_suffix(".md").read_text()
    again = []  # the plain protocol resumes the file with its extra seeds: nothing to train, nothing dropped
    assert Replication(path, PROTOCOL, _fake(again)).run(progress=False)["finished_runs"] == 32 and again == []
    for bad, match in (({"gradient_b4": [3]}, "extra_seeds names arm 'gradient_b4'; allowed: static_b1"),
                       ({"static_b1": [2]}, "must be distinct seeds not in seeds"),
                       ({"static_b1": []}, "must be distinct seeds not in seeds")):
        with pytest.raises(ValueError, match=match):
            Replication(tmp_path / "new.json", {**PROTOCOL, "extra_seeds": bad}, _fake([]))


def test_extra_seeds_command_line():
    from dynsparse_bert import _extra_seeds

    assert _extra_seeds(["static_b1,dynsparse_b1:3,4", "gradient_b16:5"]) == {
        "static_b1": [3, 4], "dynsparse_b1": [3, 4], "gradient_b16": [5]}
    with pytest.raises(SystemExit, match="ARM\\[,ARM...\\]:SEED"):
        _extra_seeds(["static_b1"])


def test_seed_same_identical_different_masks_differ():
    from transformers import AutoTokenizer

    from dynsparse_bert_mlm import run_mlm, tokenizer_path

    tok = AutoTokenizer.from_pretrained(tokenizer_path())
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 2000, (16,), generator=g)} for _ in range(16)]
    kw = dict(tokenizer=tok, train=data, evaluation=data[:4], hidden=16, layers=1, heads=1, seq_len=16, batch_size=4,
              max_steps=4, num_updates=2, block_size=1, sparsity=0.5, output_dir="/tmp/hf_prune_test_seed")
    a, b, c = run_mlm("dynsparse", seed=0, **kw), run_mlm("dynsparse", seed=0, **kw), run_mlm("dynsparse", seed=1, **kw)
    assert a["mask_digest"] == b["mask_digest"] and a["loss_curve"] == b["loss_curve"] and len(a["loss_curve"]) == 4
    assert a["eval_mlm_loss"] == b["eval_mlm_loss"]
    assert c["mask_digest"] != a["mask_digest"] and c["loss_curve"] != a["loss_curve"]


def test_unigram_reference_on_known_numbers_and_kept_in_the_file(tmp_path):
    from dynsparse_bert_mlm import unigram_mlm_loss

    cls, sep = 101, 102
    train = [{"input_ids": torch.tensor([cls, 1, 1, sep])}, {"input_ids": torch.tensor([cls, 2, 3, sep])}]
    evaluation = [{"input_ids": torch.tensor([cls, 1, 0, sep])}]
    # train body counts over a 4-token vocab {0: 0, 1: 2, 2: 1, 3: 1}; add-one: p(1) = 3/8, p(0) = 1/8
    assert unigram_mlm_loss(train, evaluation, 4) == pytest.approx(-(math.log(3 / 8) + math.log(1 / 8)) / 2)

    path = tmp_path / "rep.json"
    doc = Replication(path, PROTOCOL, _fake([]), reference={"unigram_eval_mlm_loss": 7.1629}).run(progress=False)
    assert doc["reference"] == {"unigram_eval_mlm_loss": 7.1629}
    assert "unigram model, add-one smoothed) scores 7.1629" in path.with_suffix(".md").read_text()
    again = Replication(path, PROTOCOL, _fake([])).run(progress=False)  # resumed without one: the file's is kept
    assert again["reference"] == {"unigram_eval_mlm_loss": 7.1629}
    assert Replication(tmp_path / "plain.json", PROTOCOL, _fake([])).run(progress=False)["reference"] == {}
    assert "unigram" not in (tmp_path / "plain.md").read_text()


def test_a_wider_dense_sweep_extends_a_finished_replication_and_moves_the_dense_row(tmp_path):
    path = tmp_path / "rep.json"
    Replication(path, PROTOCOL, _fake([])).run(progress=False)
    assert "dense@lr=3.0e-03" in json.loads(path.read_text())["arms"]
    calls = []  # the fake dense loss is lowest at 10^-2.5 = 3.16e-3: the new 3.2e-3 point becomes the dense row
    doc = Replication(path, {**PROTOCOL, "dense_lrs": [3.2e-3, 1e-3]}, _fake(calls)).run(progress=False)
    assert calls == [("dense@lr=3.2e-03", 0), ("dense_matched@lr=3.2e-03", 0), ("dense@lr=3.2e-03", 1),
                     ("dense@lr=3.2e-03", 2)]
    assert doc["protocol"]["dense_lrs"] == [1e-3, 3e-3, 3.2e-3, 1e-2] and doc["complete"] and doc["total_runs"] == 32
    assert "dense@lr=3.2e-03" in doc["arms"] and "dense@lr=3.0e-03" not in doc["arms"]
    assert doc["arms"]["dense@lr=3.2e-03"]["eval_mlm_loss"]["n"] == 3
    assert [r["lr"] for r in doc["dense_sweep"] if r["best"]] == [3.2e-3, 1e-3]
    assert ("dynsparse_b1", "dense@lr=3.2e-03") in [(c["a"], c["b"]) for c in doc["comparisons"]]
    again = []  # the plain command resumes the wider file: nothing to train, nothing dropped
    assert Replication(path, PROTOCOL, _fake(again)).run(progress=False)["finished_runs"] == 32 and again == []


def test_trend_puts_budgets_side_by_side_and_refuses_other_protocols(tmp_path):
    from dynsparse_replication import trend, trend_markdown

    short = Replication(tmp_path / "a.json", PROTOCOL, _fake([]), reference={"unigram_eval_mlm_loss": 7.5}).run(
        progress=False)
    long = Replication(tmp_path / "b.json", {**PROTOCOL, "max_steps": 5, "num_updates": 2}, _fake([])).run(
        progress=False)
    t = trend({"b.json": long, "a.json": short})
    assert [b["max_steps"] for b in t["budgets"]] == [1, 5] and t["budgets"][0]["tokens"] == 16
    assert t["arms"]["dense"]["1 steps"]["lr"] == 3e-3 and t["arms"]["static_b1"]["5 steps"]["n"] == 3
    pair = t["comparisons"]["dynsparse_b1 − dense"]["5 steps"]
    assert pair["n"] == 3 and pair["mean"] == pytest.approx(6.0 - (5.0 + abs(math.log10(3e-3) + 2.5)))
    text = trend_markdown(t)
    assert "| dense (best swept lr) | 5.0329 ± 0.0100 (3), lr 3.0e-03 | 5.0329 ± 0.0100 (3), lr 3.0e-03 |" in text
    assert "| unigram reference (no training) | 7.5000 | - |" in text and "| arm | 1 steps (16 tokens) | 5 steps (80" in text
    with pytest.raises(ValueError, match="b.json differs from a.json in more than the budget \\(hidden\\)"):
        trend({"a.json": short, "b.json": {**long, "protocol": {**long["protocol"], "hidden": 16}}})


def test_the_dense_row_is_the_lowest_mean_over_every_seed_not_only_the_sweep_pick(tmp_path):
    path = tmp_path / "rep.json"
    Replication(path, PROTOCOL, _fake([])).run(progress=False)
    plain = _fake([])

    def collapses_on_seed_1(arm, seed):  # the new lr wins on the sweep seed, then collapses on seed 1
        out = plain(arm, seed)
        if arm["arm"] == "dense@lr=3.2e-03" and seed == 1:
            out["eval_mlm_loss"] = 7.5
        return out

    doc = Replication(path, {**PROTOCOL, "dense_lrs": [3.2e-3]}, collapses_on_seed_1).run(progress=False)
    rows = {r["lr"]: r for r in doc["dense_sweep"] if r["mode"] == "dense"}
    assert rows[3.2e-3]["sweep_best"] and not rows[3.2e-3]["best"]  # picked by seed 0, ran on 1 and 2 ...
    assert rows[3e-3]["best"] and not rows[3e-3]["sweep_best"]  # ... but 3e-3 is lower over all three seeds
    assert rows[3.2e-3]["all_seeds"]["n"] == 3 and rows[3.2e-3]["all_seeds"]["mean"] > rows[3e-3]["all_seeds"]["mean"]
    assert "dense@lr=3.0e-03" in doc["arms"] and "dense@lr=3.2e-03" not in doc["arms"]
    assert ("dynsparse_b1", "dense@lr=3.0e-03") in [(c["a"], c["b"]) for c in doc["comparisons"]]
    assert "| dense | 3.0e-03 * |" in path.with_suffix(".md").read_text()
    assert "| dense | 3.2e-03 + |" in path.with_suffix(".md").read_text()
