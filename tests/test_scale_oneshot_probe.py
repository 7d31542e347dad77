"""benchmarks/scale_oneshot.py: config overrides (`--set`), the block probe (`--probe-blocks`: stop a run once its
resume record counts N blocks, seconds per block from the record's clock) and the table, without a real model."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
from export_utils import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def _bench():
    """A fresh copy of the benchmark module (benchmarks/ is on the path), so a monkeypatched `__file__` stays here."""
    sys.modules.pop("scale_oneshot", None)
    return importlib.import_module("scale_oneshot")


def test_overrides_parse_json_values_and_reject_bad_pairs():
    bench = _bench()
    assert bench.parse_overrides(["matmul_precision=bfloat16", "iterations=10", "owl=true"]) == {
        "matmul_precision": "bfloat16", "iterations": 10, "owl": True}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench.parse_overrides(["iterations"])
    bench.check_overrides(["admm"], {"matmul_precision": "bfloat16"}, 0.5)
    with pytest.raises(SystemExit, match="does not suit the admm config.*iteratons"):
        bench.check_overrides(["admm"], {"iteratons": 10}, 0.5)
    with pytest.raises(SystemExit, match="does not suit the admm config.*matmul_precision"):
        bench.check_overrides(["admm"], {"matmul_precision": "fp8"}, 0.5)


def test_probe_stops_the_run_at_n_blocks_and_reads_seconds_per_block(tmp_path, monkeypatch):
    """A stand-in for the one-shot subprocess writes its resume record block by block and would run forever; the
    probe must stop it at the third block and report the record's elapsed time over the blocks."""
    from hf_prune.oneshot.resume import RECORD, partial_dir

    bench = _bench()
    out = tmp_path / "1b-offload-admm"
    record = partial_dir(out.resolve()) / RECORD
    fake = tmp_path / "fake_run.py"
    fake.write_text(textwrap.dedent(f"""
        import json, pathlib, time
        record = pathlib.Path({str(record)!r})
        record.parent.mkdir(parents=True, exist_ok=True)
        for done in range(1, 1000):
            record.write_text(json.dumps({{"blocks_done": done, "num_blocks": 22, "elapsed_s": 10.0 * done}}))
            time.sleep(0.05)
    """))
    monkeypatch.setattr(bench, "__file__", str(fake))
    row = bench._probe_subprocess(["--run-one"], out, blocks=3, poll_s=0.01)
    assert row["blocks_done"] >= 3 and row["num_blocks"] == 22
    assert row["s_per_block"] == pytest.approx(10.0)
    assert row["estimated_whole_run_s"] == pytest.approx(220.0)
    done_at_stop = json.loads(record.read_text())["blocks_done"]
    import time

    time.sleep(0.3)  # the stand-in was stopped: its record no longer advances
    assert json.loads(record.read_text())["blocks_done"] == done_at_stop


def test_table_lists_probes_and_keeps_lever_runs_out_of_the_ratio():
    bench = _bench()
    base = dict(model="1b", mode="offload", sparsity=0.5, calibration=[64, 512], peak_above_baseline_mb=800.0,
                peak_above_baseline_over_model=0.39, model_fp16_mb=2040.0, output_mb=1232.0)
    rows = [dict(base, method="admm", wall_s=4000.0), dict(base, method="sparsegpt", wall_s=2000.0),
            dict(base, method="admm", wall_s=100.0, overrides={"iterations": 1}),
            dict(mode="offload-probe", model="1b", method="admm", blocks_done=3, num_blocks=22, s_per_block=150.0,
                 estimated_whole_run_s=3300.0, load_average=[2.0, 2.0, 2.0], overrides={"matmul_precision": "bfloat16"})]
    table = bench.oneshot_table(rows)
    assert "ADMM / SparseGPT whole-run wall (best of 1 / 1): 2.00x" in table
    assert "offloaded admm (matmul_precision=bfloat16), first 3 of 22 blocks: 150.0 s a block" in table
