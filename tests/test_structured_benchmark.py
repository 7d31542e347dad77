"""benchmarks/structured_smollm2.py helpers: the depth-only row's layer count, the size formula it rests on, the
results table (rows of earlier runs, without speed columns, still render), which rows `--distill-rows` distils and
from which saved model, the `--per-layer` row, and the whole script on a tiny model."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from hf_prune.methods.structured.targets import adapter_for, full_shape

from cofi_helpers import tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("structured_smollm2_bench",
                                                  os.path.join(ROOT, "benchmarks", "structured_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_world(bench, tmp_path, monkeypatch, calibration_texts=4):
    """The benchmark pointed at a tiny saved LLaMA with random texts, and shape A at a tiny target."""
    from conftest import random_texts, tiny_tokenizer

    dense_dir = tmp_path / "dense"
    tiny_llama(9, vocab_size=128).save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    monkeypatch.setattr(bench, "smollm2_path", lambda: str(dense_dir))
    monkeypatch.setattr(bench, "wikipedia_split", lambda: (random_texts(calibration_texts, seed=1),
                                                           random_texts(2, words=300, seed=2)))
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path / "results"))
    monkeypatch.setitem(bench.SHAPES, "A", {"target_kv_heads": 2, "target_intermediate_size": 20})


def test_non_embedding_formula_matches_the_model_and_depth_lands_nearest(bench, monkeypatch):
    model = tiny_llama()  # 4 layers, 4 KV groups, FFN 48, hidden 32, tied embeddings
    ad = adapter_for(model)
    stats = bench._row_stats(model, 16)
    assert bench._non_embedding(ad.dims, full_shape(ad.dims)) == stats["non_embedding_params"]
    monkeypatch.setitem(bench.SHAPES, "T", {"target_sparsity": 0.5})
    assert bench.depth_for(model, "T") == 2  # half the non-embedding parameters: 2 of 4 layers
    monkeypatch.setitem(bench.SHAPES, "T", {"target_layers": 1})
    assert bench.depth_for(model, "T") == 1
    rows = bench.planned_rows("T", model)
    assert rows["T depth only (1 layers, block influence)"] == {"target_layers": 1}
    assert rows["T importance only"] == {"target_layers": 1, "reconstruct": False}


def test_table_renders_rows_with_and_without_speed(bench):
    base = {"params": 2e6, "non_embedding_params": 1e6, "flops_per_token": 4e6}
    speed = {"tokens_per_s": {"ort_b1": 30.0, "eager_b8": 100.0}, "speedup": {"ort_b1": 1.5, "eager_b8": 1.25},
             "flops_ratio": 2.0, "speedup_over_flops_ratio": {"ort_b1": 0.75, "eager_b8": 0.625}}
    data = {"settings": {"calibration_windows": 2, "seq_len": 8, "eval_windows": 1, "damping": 0.01},
            "rows": {"dense": {"shape": "dense", "perplexity": 20.0, **base},
                     "B old row": {"shape": "B", "perplexity": 40.0, "pruning_wall_s": 3.0, **base},
                     "B timed": {"shape": "B", "perplexity": 41.0, **base, "speed": speed}}}
    lines = bench.table(data).splitlines()
    assert lines[3].startswith("| B old row | 40.00 |") and lines[3].endswith("| 3 s |  | | |  |")
    assert lines[4].endswith("| 30.0 (1.50x) | 100.0 (1.25x) | 2.00x | 0.75, 0.62 |")


def _rows(*names, **extra):
    return {n: {"shape": n.split()[0], "perplexity": 10.0 + i, **extra} for i, n in enumerate(names)}


RECON_128 = "A importance + reconstruction + distillation (128 steps, lr 0.0001)"  # the name rows were recorded under


def test_distill_rows_pick_the_named_before_training_rows_of_the_shapes(bench):
    assert bench.distilled_name("A importance + reconstruction", 128, 1e-4) == RECON_128
    data = {"rows": {"dense": {"shape": "dense", "perplexity": 20.0},
                     **_rows("A importance only", "A importance + reconstruction",
                             "A importance + reconstruction, per-layer shapes",
                             "A depth only (21 layers, block influence)",
                             "A Torch-Pruning 1.6.1 (magnitude, ratio 0.16)", "B importance + reconstruction"),
                     RECON_128: {"shape": "A", "perplexity": 30.0, "distill_wall_s": 5.0}}}
    default = bench.main.__globals__["DISTILL_ROWS"].split(",")
    # the default picks the uniform reconstruction row alone; at 128 steps, lr 1e-4 it is recorded already
    assert bench.distill_picks(data, ["A"], default, 128, 1e-4) == []
    assert bench.distill_picks(data, ["A", "B"], default, 64, 1e-4) == [
        ("A importance + reconstruction", "A importance + reconstruction + distillation (64 steps, lr 0.0001)"),
        ("B importance + reconstruction", "B importance + reconstruction + distillation (64 steps, lr 0.0001)")]
    every = "importance only,importance + reconstruction,depth only,Torch-Pruning".split(",")
    picks = bench.distill_picks(data, ["A"], every, 128, 2e-4)
    assert [p[0] for p in picks] == ["A importance only", "A importance + reconstruction",
                                     "A importance + reconstruction, per-layer shapes",
                                     "A depth only (21 layers, block influence)",
                                     "A Torch-Pruning 1.6.1 (magnitude, ratio 0.16)"]  # never the distilled row
    assert picks[-1][1] == "A Torch-Pruning 1.6.1 (magnitude, ratio 0.16) + distillation (128 steps, lr 0.0002)"
    assert [p[0] for p in bench.distill_picks(data, ["A"], every, 128, 1e-4)] == [
        "A importance only", "A importance + reconstruction, per-layer shapes",
        "A depth only (21 layers, block influence)", "A Torch-Pruning 1.6.1 (magnitude, ratio 0.16)"]
    assert [p[0] for p in bench.distill_picks(data, ["A"], ["per-layer"], 128, 1e-4)] == [
        "A importance + reconstruction, per-layer shapes"]


def test_per_layer_row_is_the_reconstruction_row_with_per_layer_shapes(bench, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "T", {"target_sparsity": 0.5})
    model = tiny_llama()
    assert "T importance + reconstruction, per-layer shapes" not in bench.planned_rows("T", model)
    rows = bench.planned_rows("T", model, per_layer=True)
    assert list(rows)[1:3] == ["T importance + reconstruction", "T importance + reconstruction, per-layer shapes"]
    assert rows["T importance + reconstruction, per-layer shapes"] == {"target_sparsity": 0.5, "reconstruct": True,
                                                                        "uniform": False}


def test_table_pairs_each_distilled_row_with_its_source(bench):
    base = {"params": 2e6, "non_embedding_params": 1e6, "flops_per_token": 4e6}
    distilled = {"distill_wall_s": 100.0, "perplexity_32x512": 33.0, **base}
    data = {"settings": {"calibration_windows": 2, "seq_len": 8, "eval_windows": 1, "damping": 0.01},
            "rows": {"dense": {"shape": "dense", "perplexity": 20.0, **base},
                     "A importance + reconstruction": {"shape": "A", "perplexity": 45.0, **base},
                     "A depth only (21 layers, block influence)": {"shape": "A", "perplexity": 300.0, **base},
                     RECON_128: {"shape": "A", "perplexity": 30.5, **distilled},  # an earlier run's: no from_row
                     "A depth only (21 layers, block influence) + distillation (128 steps, lr 0.0001)": {
                         "shape": "A", "perplexity": 80.25, "from_row": "A depth only (21 layers, block influence)",
                         **distilled}}}
    lines = bench.table(data).splitlines()
    assert lines[5].startswith(f"| {RECON_128} | 30.50 |") and "| 100 s distillation; 32 x 512 ppl 33.00 |" in lines[5]
    assert lines[-1] == ("Before -> after distillation (held-out perplexity, 8 x 512): **A**: importance + "
                         "reconstruction 45.00 -> 30.50 (128 steps, lr 0.0001), depth only (21 layers, block "
                         "influence) 300.00 -> 80.25 (128 steps, lr 0.0001).")
    del data["rows"]["A importance + reconstruction"], data["rows"]["A depth only (21 layers, block influence)"]
    assert "Before -> after" not in bench.table(data)  # no source row recorded: nothing to pair


class _Args:
    device, seq_len, distill_steps, distill_seq_len, distill_lr, distill_bf16 = "cpu", 16, 2, 16, 1e-4, "false"
    distill_save_steps = distill_eval_every = 0


@pytest.mark.parametrize("uniform", [True, False])
def test_distilled_row_starts_from_the_saved_model_which_equals_the_repruned_one(bench, tmp_path, monkeypatch,
                                                                                   uniform):
    import torch

    from hf_prune import StructuredConfig, oneshot

    from conftest import random_texts, tiny_tokenizer

    tok, teacher = tiny_tokenizer(), tiny_llama(9, vocab_size=128)
    config = StructuredConfig(target_kv_heads=2, target_intermediate_size=20, uniform=uniform,
                              num_calibration_samples=4, max_seq_length=16, calibration_batch_size=4)

    def prune():
        return oneshot(teacher, config, calibration=random_texts(4, seed=1), tokenizer=tok, show_progress=False)

    saved = bench._save_model(prune(), tok, str(tmp_path / "row"))
    loaded, repruned = bench.load_student(saved, "cpu"), prune()
    # uniform: a plain config of the smaller shape; per-layer: the original config with the structure record
    assert loaded.config.num_key_value_heads == (2 if uniform else 4)
    assert loaded.state_dict().keys() == repruned.state_dict().keys()
    assert all(torch.equal(v, repruned.state_dict()[k]) for k, v in loaded.state_dict().items())

    asked = []
    monkeypatch.setattr(bench, "perplexity", lambda model, **kw: float(kw["input_ids"].numel()))
    source = {"shape": "T", "perplexity": 50.0, "sparsity": 0.25, "target": {"kv_heads": 2}, "reconstruct": True}
    name = bench.distilled_name("T importance + reconstruction", 2, 1e-4)
    record = bench.distill_row("T importance + reconstruction", source, name, teacher, random_texts(4, seed=2), tok,
                               torch.arange(600) % 128, lambda model: 7.0,
                               lambda row, r: asked.append((row, r)) or saved, str(tmp_path / "runs"), _Args)
    assert asked == [("T importance + reconstruction", source)]
    assert record["from_row"] == "T importance + reconstruction" and record["shape"] == "T"
    assert record["perplexity"] == 7.0 and record["perplexity_32x512"] == 600.0  # held-out ids capped at 32 x 512
    assert record["distillation_tokens"] == 2 * 2 * 4 * 16  # 2 steps of batch 2 x grad_accum 4 x 16 tokens
    assert (record["sparsity"], record["target"], record["reconstruct"]) == (0.25, {"kv_heads": 2}, True)
    assert record["params"] == sum(p.numel() for p in repruned.parameters())
    assert record["model_dir"] == str(tmp_path / "runs" / bench._slug(name))
    again = bench.load_student(record["model_dir"], "cpu")  # the distilled model saved and reloads, trained
    assert again.config.num_key_value_heads == loaded.config.num_key_value_heads
    assert not torch.equal(again.lm_head.weight, repruned.lm_head.weight)


def test_main_distils_the_picked_rows_of_a_tiny_model_and_resumes(bench, tmp_path, monkeypatch, capsys):
    import json

    _tiny_world(bench, tmp_path, monkeypatch)
    argv = ["--shapes", "A", "--calibration-windows", "4", "--seq-len", "16", "--eval-windows", "2", "--per-layer",
            "--runs", str(tmp_path / "runs"), "--distill-steps", "2", "--distill-seq-len", "16", "--distill-bf16",
            "false", "--distill-rows", "importance only,per-layer"]
    bench.main(argv)
    rows = json.loads((tmp_path / "results" / "structured_smollm2.json").read_text())["rows"]
    per_layer = "A importance + reconstruction, per-layer shapes"
    assert rows[per_layer]["config"] == {"target_kv_heads": 2, "target_intermediate_size": 20, "reconstruct": True,
                                         "uniform": False}
    distilled = [n for n, r in rows.items() if "from_row" in r]
    assert distilled == ["A importance only + distillation (2 steps, lr 0.0001)",
                         f"{per_layer} + distillation (2 steps, lr 0.0001)"]
    assert [rows[n]["from_row"] for n in distilled] == ["A importance only", per_layer]
    assert rows[distilled[1]]["non_embedding_params"] == rows[per_layer]["non_embedding_params"]
    md = (tmp_path / "results" / "structured_smollm2.md").read_text()
    assert f"**A**: importance only {rows['A importance only']['perplexity']:.2f} -> " in md
    capsys.readouterr()
    bench.main(argv)  # every row recorded: nothing is pruned or distilled again (a new row prints "A ... {json}")
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("A ")] == []


def test_a_checkpointed_distillation_resumes_with_its_trajectory(bench, tmp_path, monkeypatch):
    """`--distill-save-steps` / `--distill-eval-every`: a distillation stopped after its first checkpoint and run
    again continues from it, keeps the perplexity points taken before, and ends with the uninterrupted run's model."""
    import json
    import shutil

    from safetensors.torch import load_file

    _tiny_world(bench, tmp_path, monkeypatch)

    def run(name):
        monkeypatch.setattr(bench, "RESULTS", str(tmp_path / name))
        bench.main(["--shapes", "A", "--calibration-windows", "4", "--seq-len", "16", "--eval-windows", "2",
                    "--no-depth", "--runs", str(tmp_path / name / "runs"), "--distill-steps", "4",
                    "--distill-seq-len", "16", "--distill-bf16", "false", "--distill-lr", "1e-2",
                    "--distill-save-steps", "2", "--distill-eval-every", "2"])
        return json.loads((tmp_path / name / "structured_smollm2.json").read_text())["rows"]

    row = "A importance + reconstruction + distillation (4 steps, lr 0.01)"
    whole = run("whole")[row]
    assert [p["step"] for p in whole["trajectory"]] == [2, 4]
    assert whole["trajectory"][-1]["perplexity_32x512"] == pytest.approx(whole["perplexity_32x512"], rel=1e-3)
    # the second run: its one-shot rows copied, its distillation stopped after the checkpoint of step 2
    shutil.copytree(tmp_path / "whole", tmp_path / "stopped")
    ckpt = tmp_path / "stopped" / "runs" / "structured_smollm2" / (bench._slug(row) + ".checkpoints")
    shutil.rmtree(ckpt / "checkpoint-4")
    shutil.rmtree(ckpt.parent / bench._slug(row))  # a stopped run saved no distilled model
    trajectory = json.loads((ckpt / "trajectory.json").read_text())
    trajectory["points"] = trajectory["points"][:1]
    (ckpt / "trajectory.json").write_text(json.dumps(trajectory))
    data = json.loads((tmp_path / "stopped" / "structured_smollm2.json").read_text())
    del data["rows"][row]
    (tmp_path / "stopped" / "structured_smollm2.json").write_text(json.dumps(data))
    for r in data["rows"].values():  # the copied rows' saved models: point them at the copy
        if r.get("model_dir"):
            r["model_dir"] = r["model_dir"].replace(str(tmp_path / "whole"), str(tmp_path / "stopped"))
    (tmp_path / "stopped" / "structured_smollm2.json").write_text(json.dumps(data))
    resumed = run("stopped")[row]
    assert [p["step"] for p in resumed["trajectory"]] == [2, 4]
    assert resumed["trajectory"][0] == whole["trajectory"][0]  # the earlier session's point, kept
    assert resumed["perplexity_32x512"] == pytest.approx(whole["perplexity_32x512"], rel=1e-4)
    a, b = (load_file(os.path.join(r["model_dir"], "model.safetensors")) for r in (whole, resumed))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_save_keeps_the_rows_a_concurrent_run_recorded(bench, tmp_path):
    """Two distillations side by side (one per core) each read the JSON at their start: the second to finish must
    not drop the first one's row."""
    import json

    out = tmp_path / "r.json"
    out.write_text(json.dumps({"rows": {"dense": {"perplexity": 20.0}, "B distilled": {"perplexity": 90.0}}}))
    mine = {"settings": {"seq_len": 512}, "rows": {"dense": {"perplexity": 20.5}, "A distilled": {"perplexity": 30.0}}}
    bench.merge_save(str(out), mine)
    saved = json.loads(out.read_text())
    assert saved["rows"] == {"dense": {"perplexity": 20.5}, "A distilled": {"perplexity": 30.0},
                             "B distilled": {"perplexity": 90.0}}  # this run's values win, the other's row is added
    assert saved["settings"] == {"seq_len": 512}
    assert not (tmp_path / "r.json.tmp").exists()


def test_rebuild_reuses_the_rows_saved_model_when_its_record_lost_the_path(bench, tmp_path):
    """A concurrent run's save can replace a row's record by its own older copy (without `model_dir`): the model
    saved under the row's directory is used, not pruned again (which would refuse to overwrite it)."""
    row = "B importance + reconstruction"
    saved = tmp_path / bench._slug(row)
    saved.mkdir()
    (saved / "config.json").write_text("{}")

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned again")

    record = {"shape": "B", "model_dir": None}
    args = type("Args", (), {"speed_saved_only": False})()
    assert bench.rebuild(row, record, None, no_pruning, no_pruning, None, str(tmp_path), args) == str(saved)
    assert record["model_dir"] == str(saved)
    assert bench.rebuild("B importance only", {"shape": "B"}, None, no_pruning, no_pruning, None, str(tmp_path),
                         type("Args", (), {"speed_saved_only": True})()) is None  # nothing saved, none rebuilt


def test_unit_ablation_cuts_each_unit_kind_of_the_shape_alone(bench, monkeypatch):
    model = tiny_llama()  # 4 layers, 4 KV groups, FFN 48, hidden 32
    monkeypatch.setitem(bench.SHAPES, "T", {"target_layers": 3, "target_kv_heads": 2, "target_intermediate_size": 24,
                                            "target_hidden_size": 16})
    rows = bench.unit_rows("T", model)
    assert rows["T cut layers 3 only, importance only"] == {"target_layers": 3, "reconstruct": False}
    assert rows["T cut hidden 16 only, importance only"] == {"target_hidden_size": 16, "reconstruct": False}
    assert rows["T cut FFN 24 only, importance + reconstruction"] == {"target_intermediate_size": 24,
                                                                      "reconstruct": True}
    both = "T cut layers 3 + KV groups 2 + FFN 24 only, importance + reconstruction"
    assert rows[both] == {"target_layers": 3, "target_kv_heads": 2, "target_intermediate_size": 24, "reconstruct": True}
    # each kind and the cut without the hidden one, importance only (5); refit rows only where something is refit:
    # KV groups, FFN and the combination (3), none for depth or hidden alone
    assert len(rows) == 5 + 3 and "T cut hidden 16 only, importance + reconstruction" not in rows
    monkeypatch.setitem(bench.SHAPES, "T", {"target_intermediate_size": 24})  # a single cut: no combination row
    assert list(bench.unit_rows("T", model)) == ["T cut FFN 24 only, importance only",
                                                 "T cut FFN 24 only, importance + reconstruction"]
    # alone, a hidden size the query heads do not divide becomes the nearest one they do (a plain config needs it)
    # (8 query heads; the shape's own 4 heads, after its KV cut, divide 20, 8 do not: 20 / 8 = 2.5 -> 24)
    monkeypatch.setitem(bench.SHAPES, "T", {"target_kv_heads": 2, "target_hidden_size": 20})
    rows = bench.unit_rows("T", model)
    assert rows["T cut hidden 24 only, importance only"] == {"target_hidden_size": 24, "reconstruct": False}
    assert rows["T cut KV groups 2 only, importance only"] == {"target_kv_heads": 2, "reconstruct": False}


def test_lever_baseline_adds_importance_only_at_each_calibration_size(bench, tmp_path, monkeypatch):
    import json

    _tiny_world(bench, tmp_path, monkeypatch, calibration_texts=6)
    common = ["--levers", "--shapes", "A", "--calibration-windows", "4", "--seq-len", "16", "--eval-windows", "2",
              "--runs", str(tmp_path / "runs"), "--lever-windows", "6", "--lever-damping", "0.1"]
    bench.main(common)
    bench.main([*common, "--lever-baseline"])
    rows = json.loads((tmp_path / "results" / "structured_smollm2_levers.json").read_text())["rows"]
    assert list(rows) == ["A importance + reconstruction, 6 windows, damping 0.01",
                          "A importance + reconstruction, 4 windows, damping 0.1", "A importance only, 6 windows"]
    base, refit = rows["A importance only, 6 windows"], rows["A importance + reconstruction, 6 windows, damping 0.01"]
    assert base["config"]["reconstruct"] is False and base["calibration_windows"] == 6
    assert base["mean_error_reconstructed"] is None and refit["mean_error_reconstructed"] < base[
        "mean_error_importance_only"]
