"""The decoder CoFi benchmark reuses a finished structured baseline when only CoFi's own knobs changed."""

import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("cofi_smollm2_bench", os.path.join(ROOT, "benchmarks", "cofi_smollm2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finished_run_is_reused_only_when_the_settings_that_matter_match(tmp_path):
    bench = _bench()
    settings = {"seed": 0, "lr": 1e-4, "gate_lr": 0.1, "lagrangian_lr": 0.1, "warmup": 0.5, "structure": {"a": 1}}
    path = tmp_path / "baseline_run.json"
    path.write_text(json.dumps({"perplexity": 117.0, "settings": settings}))
    cofi_only = {**settings, "gate_lr": 0.5, "lagrangian_lr": 1.0, "warmup": 0.0}
    assert bench._done(str(path), cofi_only, ignore=bench.COFI_ONLY)["perplexity"] == 117.0
    assert bench._done(str(path), cofi_only) is None  # the CoFi run itself is redone when its knobs change
    assert bench._done(str(path), {**settings, "lr": 2e-4}, ignore=bench.COFI_ONLY) is None
    assert bench._done(str(path), {**settings, "structure": {"a": 2}}, ignore=bench.COFI_ONLY) is None
    assert bench._done(str(tmp_path / "missing.json"), settings) is None
