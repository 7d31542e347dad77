"""`ruff check` (rules in pyproject.toml's [tool.ruff]) is clean on the package, the recipes, benchmarks and tests."""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED = ["hf_prune", "hf_prune_ort", "benchmarks", "integrations", "tests"]


def _ruff() -> list[str]:
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")


def _check(*paths: str) -> subprocess.CompletedProcess:
    cmd = [*_ruff(), "check", "--no-cache", "--output-format", "concise", "--config", os.path.join(ROOT, "pyproject.toml"),
           *paths]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_clean():
    result = _check(*CHECKED)
    assert result.returncode == 0, f"ruff check {' '.join(CHECKED)} found:\n{result.stdout}{result.stderr}"


def test_ruff_config_finds_what_it_should(tmp_path):
    # the project's rule set is the one in force: an unused import and an `l` name are findings
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n\ndef f(xs):\n    return [l for l in xs]\n")
    result = _check(str(bad))
    assert result.returncode == 1
    assert "F401" in result.stdout and "E741" in result.stdout, result.stdout
