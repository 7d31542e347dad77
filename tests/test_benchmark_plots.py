"""benchmarks/plots.py: each plot drawn from the committed benchmark JSON into a PNG."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plots():
    spec = importlib.util.spec_from_file_location("benchmark_plots", ROOT / "benchmarks" / "plots.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


@pytest.mark.parametrize("name", ["oneshot", "cofi", "recover"])
def test_each_plot_is_drawn_from_the_committed_results(plots, name, tmp_path):
    out = plots.PLOTS_FROM_RESULTS[name](out=tmp_path / "sub" / f"{name}.png")
    width, height = _png_size(out)
    assert out == tmp_path / "sub" / f"{name}.png" and width > 500 and height > 300
    assert (ROOT / "docs" / "assets" / "plots" / plots.PLOT_FILES[name]).is_file()  # the committed one exists


def test_plot_after_run_keeps_the_committed_png_for_other_results(plots, tmp_path):
    results = tmp_path / "recover_smollm2_steps40.json"
    shutil.copy(ROOT / "benchmarks" / "results" / "recover_smollm2.json", results)
    assert plots.plot_after_run("recover", results) == tmp_path / "recover_smollm2_steps40.png"


def test_plots_refuse_results_without_their_rows(plots, tmp_path):
    empty = tmp_path / "recover.json"
    empty.write_text(json.dumps({"protocol": {}, "runs": [{"row": "dense", "perplexity": 20.0}]}))
    with pytest.raises(ValueError, match="no masked-LoRA rows"):
        plots.plot_recovery(empty, out=tmp_path / "r.png")
    with pytest.raises(FileNotFoundError, match="run the benchmark first"):
        plots.plot_oneshot(tmp_path / "missing.json", out=tmp_path / "o.png")
    with pytest.raises(ValueError, match=r"rows \[1\] lack some"):
        plots.plot_perplexity_vs_throughput([{"label": "a", "perplexity": 1, "tokens_per_s": 2}, {"label": "b"}],
                                            tmp_path / "t.png")
    assert not (tmp_path / "r.png").exists() and not (tmp_path / "t.png").exists()
