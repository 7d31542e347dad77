"""benchmarks/structured_smollm2.py helpers: the depth-only row's layer count, the size formula it rests on, and the
results table (rows of earlier runs, without speed columns, still render)."""

from __future__ import annotations

import importlib.util
import os

import pytest

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
