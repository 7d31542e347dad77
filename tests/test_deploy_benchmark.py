"""benchmarks/deploy_smollm2.py on tiny LLaMAs: exports, the greedy check, interleaved rounds, resuming."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer
from export_utils import REPO_ROOT

from hf_prune import MagnitudeConfig, oneshot

pytest.importorskip("onnxruntime")


def _bench():
    spec = importlib.util.spec_from_file_location("deploy_smollm2", REPO_ROOT / "benchmarks" / "deploy_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dense_vs_24_rounds_resume_and_greedy_check(tmp_path):
    torch.manual_seed(0)
    dense = tiny_llama().eval()
    tokenizer = tiny_tokenizer()
    ids = tokenizer(_bench().PROMPTS[0], return_tensors="pt")["input_ids"]
    # the first greedy token is the end of sequence: the check stops there, the timed runs must not
    dense.generation_config.eos_token_id = int(dense.generate(ids, max_new_tokens=1, do_sample=False)[0, -1])
    dense.save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    oneshot(dense, MagnitudeConfig(pattern="2:4"), show_progress=False)
    dense.save_pretrained(tmp_path / "sparse")
    bench = _bench()
    args = ["--dense", str(tmp_path / "dense"), "--sparse", str(tmp_path / "sparse"), "--work", str(tmp_path / "w"),
            "--results-dir", str(tmp_path / "results"), "--new-tokens", "5", "--prompts", "2", "--threads", "1"]
    record = bench.main(args + ["--rounds", "1"])
    assert record["sparse"]["linear_sparsity"] == pytest.approx(0.5)
    assert record["dense"]["linear_sparsity"] < 0.01
    for key in ("dense", "sparse"):
        assert [c["equal"] for c in record[key]["greedy_check"]] == [True, True]
        assert record[key]["export"]["verification"]["max_abs_logit_diff"] <= record[key]["export"]["logit_tolerance"]
    assert [c["new_tokens"] for c in record["dense"]["greedy_check"]] == [1, 1]  # all prompts are [UNK] words
    assert set(record["summary"]) == {"ort_1t", "eager_1t"}
    onnx_file = tmp_path / "w" / "onnx-admm-24" / "model.onnx"
    mtime = onnx_file.stat().st_mtime_ns

    record = bench.main(args + ["--rounds", "2"])  # continues: one more round, the exports reused
    assert len(record["rounds"]) == 2 and record["rounds"][1]["order"] == ["admm-2:4", "dense"]
    assert onnx_file.stat().st_mtime_ns == mtime
    for cell in record["summary"].values():
        best = cell["best_tokens_per_s"]
        assert best["dense"] > 0 and cell["ratio_of_best"] == pytest.approx(best["admm-2:4"] / best["dense"])
        assert len(cell["ratio_per_round"]) == 2
    saved = json.loads((tmp_path / "results" / "deploy_smollm2.json").read_text())
    assert len(saved["rounds"]) == 2
    table = (tmp_path / "results" / "deploy_smollm2.md").read_text()
    assert "| **2:4 / dense** |" in table and "PyTorch `generate` for every prompt, both models: **yes**" in table
    with pytest.raises(SystemExit, match="holds rounds of another protocol"):
        bench.main(args + ["--new-tokens", "6"])
