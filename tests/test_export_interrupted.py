"""Saves killed with SIGKILL at every filesystem step and after several delays, fresh and overwriting: the target
is always the whole old export, the whole new one, or absent (never a mix), the user's other files survive, and the
next save leaves no temporary directory behind. Also: modes follow the umask."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from export_utils import REPO_ROOT, TESTS_DIR, prune, tiny_model
from hf_prune.export import load_compressed_state_dict

# Runs in a fresh interpreter: prunes model B once, then for every case forks a process that saves B into a fresh
# copy of the case directory and is killed (at the k-th filesystem call, or after a delay); prints one JSON line a case.
CHILD = r"""
import builtins, json, os, shutil, signal, sys, time
import torch
torch.set_num_threads(1)
import hf_prune.output_dir as save
import hf_prune.export.shards as shards
from export_utils import prune, tiny_model

root, old, mode, arg = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
model = prune(tiny_model("llama", seed=1), "unstructured", 0.5)
calls = {"n": 0, "kill_at": None}

def counted(fn):
    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapper

real_open = builtins.open
def open_counted(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        return counted(real_open)(file, mode, *a, **k)
    return real_open(file, mode, *a, **k)

def install():
    for mod, name in [(os, "rename"), (os, "replace"), (os, "link"), (os, "chmod"), (os, "unlink"), (os, "mkdir"),
                      (shutil, "rmtree"), (save, "_exchange"), (shards, "save_file")]:
        setattr(mod, name, counted(getattr(mod, name)))
    builtins.open = open_counted

def case_dir(name):
    work = os.path.join(root, name)
    os.makedirs(work)
    if old != "-":
        shutil.copytree(old, os.path.join(work, "out"))
    return work

def run(name, kill_at=None, delay=None):
    work = case_dir(name)
    pid = os.fork()
    if pid == 0:
        calls["kill_at"] = kill_at
        install()
        model.save_pretrained(os.path.join(work, "out"), overwrite=True)
        os._exit(0)
    if delay is not None:
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    print(json.dumps({"case": name, "killed": killed, "code": None if killed else os.WEXITSTATUS(status)}), flush=True)
    return killed

if mode == "steps":
    k = 1
    while run(f"k{k}", kill_at=k):
        k += 1
else:
    for i, delay in enumerate(json.loads(arg)):
        run(f"d{i}", delay=delay)
"""


def _run_child(root: Path, old: Path | None, mode: str, arg: str = "-") -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(old) if old else "-", mode, arg],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state(out: Path, old_sd: dict | None, new_sd: dict) -> str:
    if not out.exists() or not (out / "config.json").exists():
        return "absent"
    loaded = load_compressed_state_dict(out)  # verifies the checksums, so a mix of two exports cannot pass
    if old_sd is not None and _same(loaded, old_sd):
        return "old"
    if _same(loaded, new_sd):
        return "new"
    return "mixed"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    old = root / "old"
    prune(tiny_model("llama", seed=0), "unstructured", 0.5).save_pretrained(old)
    (old / "tokenizer.json").write_text('{"user": "file"}')  # the user's files beside the export
    (old / "checkpoint-10").mkdir()
    (old / "checkpoint-10" / "trainer_state.json").write_text("{}")
    new = root / "new"
    prune(tiny_model("llama", seed=1), "unstructured", 0.5).save_pretrained(new)
    return old, load_compressed_state_dict(old), load_compressed_state_dict(new)


def _check_cases(root: Path, results: list[dict], old_sd, new_sd, *, overwrite: bool) -> set[str]:
    seen = set()
    for result in results:
        work = root / result["case"]
        out = work / "out"
        state = _state(out, old_sd, new_sd)
        seen.add(state)
        if result["killed"]:
            allowed = {"old", "new"} if overwrite else {"absent", "new"}
            assert state in allowed, (result, state, sorted(p.name for p in work.iterdir()))
        else:
            assert result["code"] == 0 and state == "new"
        if overwrite:  # the user's files survive whatever moment the save died at
            assert (out / "tokenizer.json").read_text() == '{"user": "file"}', result
            assert (out / "checkpoint-10" / "trainer_state.json").is_file(), result
        # the next save cleans up what the killed one left, and finishes
        prune(tiny_model("llama", seed=1), "unstructured", 0.5).save_pretrained(out, overwrite=True)
        assert sorted(p.name for p in work.iterdir()) == ["out"], result
        assert _state(out, old_sd, new_sd) == "new"
    return seen


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_kill_at_every_filesystem_step(tmp_path, exports, overwrite):
    old, old_sd, new_sd = exports
    results = _run_child(tmp_path, old if overwrite else None, "steps")
    assert len(results) > 8 and results[-1]["killed"] is False  # every step was a kill point, then a full save
    seen = _check_cases(tmp_path, results, old_sd if overwrite else None, new_sd, overwrite=overwrite)
    assert seen == ({"old", "new"} if overwrite else {"absent", "new"})


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "overwrite"])
def test_kill_after_delays(tmp_path, exports, overwrite):
    old, old_sd, new_sd = exports
    delays = [0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.4, 1.5]
    results = _run_child(tmp_path, old if overwrite else None, "delays", json.dumps(delays))
    assert len(results) == len(delays)
    _check_cases(tmp_path, results, old_sd if overwrite else None, new_sd, overwrite=overwrite)


def test_stale_temporaries_of_other_targets_and_live_savers_are_kept(tmp_path):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.hf_prune-tmp-{dead.pid}-abc"
    legacy = tmp_path / ".out.hf_prune-tmp-q1w2e3"  # hf_prune 0.1 names had no pid
    live = tmp_path / f".out.hf_prune-tmp-{os.getppid()}-xyz"  # a process that is running
    other = tmp_path / f".other.hf_prune-tmp-{dead.pid}-abc"  # another target's
    for path in (stale, legacy, live, other):
        path.mkdir()
        (path / "config.json").write_text("{}")
    model.save_pretrained(tmp_path / "out")
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_modes_follow_the_umask(tmp_path, umask):
    model = prune(tiny_model("llama"), "unstructured", 0.5)
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "fresh")
        (tmp_path / "fresh" / "tokenizer.json").write_text("{}")
        model.save_pretrained(tmp_path / "fresh", overwrite=True)
    finally:
        os.umask(previous)
    out = tmp_path / "fresh"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
