"""One benchmark row in a fresh subprocess (its wall time and peak RSS are its own): the row's JSON result."""

from __future__ import annotations

import json
import subprocess
import sys


def run_in_subprocess(cmd: list[str], label: str, stderr_tail: int = 4000) -> dict:
    """Runs `cmd`, whose last stdout line is the row's JSON; exits naming `label` with the stderr tail on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-stderr_tail:], file=sys.stderr)
        raise SystemExit(f"{label} failed")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("   ", result, flush=True)
    return result
