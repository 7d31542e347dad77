"""Saving into shared directories and to the Hub (issue 27, classes 7-10, 12, 13, 18): everything the CLI writes goes
through the one save protocol (`hf_prune/output_dir.py`); read-only parents, symlinked targets, concurrent saves,
sources overlapping outputs; push timeouts and retries."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import hf_prune
import hf_prune.output_dir as output_dir
from hf_prune.cli import main
from hf_prune.export import load_compressed_state_dict
from hf_prune.output_dir import OutputWriteError

from conftest import random_texts
from export_utils import REPO_ROOT, TESTS_DIR, prune, run_python, tiny_model


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def models():
    return prune(tiny_model("llama", seed=0), "unstructured", 0.5), prune(tiny_model("llama", seed=1), "2:4", 0.5)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(random_texts(4, seed=0)))
    return path


# ------------------------------------------------------------------- 7: the tokenizer inside the atomic write
@pytest.mark.parametrize("fresh, offload", [(True, False), (False, False), (False, True)],
                         ids=["fresh", "overwrite", "overwrite-offload"])
def test_cli_tokenizer_enospc_leaves_the_target_as_it_was(model_dir, text_file, tmp_path, capsys, monkeypatch, fresh,
                                                          offload):
    from transformers import PreTrainedTokenizerBase

    out = tmp_path / "out"
    args = ["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(out),
            *(["--offload"] if offload else [])]
    if not fresh:
        assert main(args) == 0
        assert (out / "tokenizer.json").stat().st_size > 0  # the tokenizer is part of the export
    before = _files(out) if out.exists() else None

    def disk_full(self, directory, *a, **k):
        Path(directory, "tokenizer.json").write_bytes(b"")  # what a full disk leaves: a 0-byte file
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory, "tokenizer.json")))

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    assert main(args + ["--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "was left as it was" in err, err
    if fresh:
        assert not out.exists()
    else:
        assert _files(out) == before
    # an offloaded run keeps its progress (every block pruned) beside the target, so that the rerun only finishes
    partial = [".out.hf_prune-partial"] if offload else []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["calib.txt", "model", *([] if fresh else ["out"]),
                                                                 *partial])
    if offload:
        record = json.loads((tmp_path / partial[0] / "resume.json").read_text())
        assert record["blocks_done"] == record["num_blocks"] == 2


def test_save_pruned_writes_the_tokenizer_in_the_same_write(models, tmp_path):
    from conftest import tiny_tokenizer

    out = tmp_path / "out"
    hf_prune.save_pruned(models[0], out, tokenizer=tiny_tokenizer())
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(os.listdir(out))


# ------------------------------------------------------------------------------- 8: a read-only parent
@pytest.fixture
def read_only_parent(tmp_path, monkeypatch):
    """`tmp_path/ro` made read-only. Tests run as root, which ignores modes, so every way of creating, renaming or
    removing an entry directly in it is also made to fail with EROFS (as a read-only root filesystem would)."""
    parent = tmp_path / "ro"
    (parent / "out").mkdir(parents=True)  # the writable mount point
    parent.chmod(0o555)

    def in_parent(path) -> bool:
        return Path(os.path.abspath(path)).parent == parent

    def guard(fn, *positions):
        def wrapper(*args, **kwargs):
            if any(in_parent(args[i]) for i in positions if i < len(args)) or kwargs.get("dir") == parent:
                raise OSError(errno.EROFS, "Read-only file system", str(args[0] if args else kwargs.get("dir")))
            return fn(*args, **kwargs)
        return wrapper

    for module, name, positions in [(os, "rename", (0, 1)), (os, "replace", (0, 1)), (os, "mkdir", (0,)),
                                    (os, "rmdir", (0,)), (output_dir, "_exchange", (0, 1))]:
        monkeypatch.setattr(module, name, guard(getattr(module, name), *positions))
    real_mkdtemp = output_dir.tempfile.mkdtemp
    monkeypatch.setattr(output_dir.tempfile, "mkdtemp", guard(real_mkdtemp))
    monkeypatch.setattr(output_dir.os, "access", lambda path, mode, **k: Path(path) != parent)
    yield parent
    parent.chmod(0o755)


def test_read_only_parent_saves_inside_the_mount_point(models, read_only_parent):
    a, b = models
    out = read_only_parent / "out"
    a.save_pretrained(out)
    assert _same(load_compressed_state_dict(out), a.state_dict()) and sorted(os.listdir(read_only_parent)) == ["out"]
    (out / "keep.txt").write_text("mine")
    b.save_pretrained(out, overwrite=True)
    assert _same(load_compressed_state_dict(out), b.state_dict())
    assert (out / "keep.txt").read_text() == "mine"
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # the hidden build directory is gone
    with pytest.raises(FileExistsError, match="already holds a model"):
        a.save_pretrained(out)
    with pytest.raises(OutputWriteError, match="Read-only file system"):  # nowhere to build: a clear error
        a.save_pretrained(read_only_parent / "new")


def test_read_only_parent_moves_config_last_and_never_leaves_a_mix(models, read_only_parent, monkeypatch):
    a, b = models
    out = read_only_parent / "out"
    a.save_pretrained(out, max_shard_size=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    moved = []
    real_replace = os.replace

    def failing_replace(src, dst):
        moved.append(Path(dst).name)
        if len(moved) == 2:
            raise OSError(errno.EIO, "I/O error (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputWriteError, match="may be incomplete"):
        b.save_pretrained(out, overwrite=True)
    # the old export was taken down (config.json first) before any new file moved in: no config.json, no mix
    assert not (out / "config.json").exists() and not list(out.glob("model-*.safetensors"))
    monkeypatch.setattr(os, "replace", real_replace)
    b.save_pretrained(out, overwrite=True)
    assert _same(load_compressed_state_dict(out), b.state_dict())
    moved.clear()
    monkeypatch.setattr(os, "replace", lambda s, d: (moved.append(Path(d).name), real_replace(s, d))[1])
    a.save_pretrained(out, overwrite=True)
    assert moved[-1] == "config.json" and "model.safetensors" in moved


# ------------------------------------------------------------------------------------ 9: symlinked targets
def test_symlinked_targets(models, tmp_path):
    a, b = models
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    a.save_pretrained(link, max_shard_size=20_000)  # a link to an empty directory is saved into
    assert link.is_symlink() and len(list(real.glob("model-*.safetensors"))) > 1
    b.save_pretrained(link, overwrite=True)  # replaces the content where the link points, the link stays
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert _same(load_compressed_state_dict(real), b.state_dict())
    assert not list(real.glob("model-*.safetensors"))  # the old shards are gone
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no temporary directory or link left
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is a symlink to .*nowhere.*, which does not exist"):
        a.save_pretrained(dangling)
    (tmp_path / "file").write_text("x")
    (tmp_path / "to_file").symlink_to(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        a.save_pretrained(tmp_path / "to_file")


# ------------------------------------------------------------------------------------ 10: concurrent saves
CONCURRENT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
from export_utils import prune, tiny_model
root = sys.argv[1]
models = [prune(tiny_model("llama", seed=0), "unstructured", 0.5), prune(tiny_model("llama", seed=1), "2:4", 0.5)]
for r in range(8):
    target = os.path.join(root, f"round{r}")
    if r % 2:
        os.mkdir(target)  # an existing empty directory (rename(2) would replace it silently)
    go_r, go_w = os.pipe()
    pids = []
    for who in (0, 1):
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # both start together
            try:
                models[who].save_pretrained(target)
                os._exit(0)
            except FileExistsError as err:
                os._exit(3 if "already holds a model" in str(err) else 4)
            except BaseException:
                os._exit(5)
        pids.append(pid)
    os.close(go_r)
    os.write(go_w, b"xx")
    os.close(go_w)
    codes = [os.WEXITSTATUS(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps({"round": r, "codes": codes}), flush=True)
"""


def test_concurrent_saves_to_one_new_target_exactly_one_wins(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, "-c", CONCURRENT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(REPO_ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rounds) == 8
    for r in rounds:
        assert sorted(r["codes"]) == [0, 3], r  # exactly one success, the other the "exists" error
        winner = models[r["codes"].index(0)]
        target = tmp_path / f"round{r['round']}"
        assert _same(load_compressed_state_dict(target), winner.state_dict()), r
    assert sorted(os.listdir(tmp_path)) == sorted(f"round{i}" for i in range(8))  # no build directory left


# ------------------------------------------------------------------- 18: outputs overlapping the source
def test_cli_outputs_overlapping_the_source_are_refused(model_dir, text_file, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model_dir)
    before = _files(model_dir)
    oneshot = ["oneshot", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--overwrite"]
    cases = [
        (oneshot + ["--output", str(model_dir)], "is the source"),
        (oneshot + ["--output", str(tmp_path)], "contains the source"),
        (oneshot + ["--output", str(model_dir / "pruned")], "is inside the source"),
        (oneshot + ["--output", str(link)], "is the source"),
        (oneshot + ["--offload", "--output", str(tmp_path)], "contains the source"),
        (["recover", str(model_dir), "--data", str(text_file), "--steps", "1", "--overwrite", "--output",
          str(model_dir)], "is the source"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Choose an --output outside it" in err, (args, err)
    assert _files(model_dir) == before


# ----------------------------------------------------------------------------------------- 12, 13: the Hub
class SilentServer:
    """Accepts connections on 127.0.0.1 and never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.sock.getsockname()[1]

    def close(self):
        self.sock.close()
        for conn in self.held:
            conn.close()


SILENT_PUSH = r"""
import json, tempfile, time
import hf_prune
from hf_prune.cli import main
from export_utils import prune, tiny_model
model = prune(tiny_model("llama"), "unstructured", 0.5)
local = tempfile.mkdtemp() + "/export"
model.save_pretrained(local)
out = {}
started = time.monotonic()
try:
    hf_prune.push_pruned(local, "me/x", timeout=1)
except hf_prune.export.PushError as err:
    out["api"] = str(err)
out["api_s"] = time.monotonic() - started
started = time.monotonic()
try:
    model.push_to_hub("me/x", timeout=1)
except hf_prune.export.PushError as err:
    out["method"] = str(err)
out["method_s"] = time.monotonic() - started
out["cli"] = main(["push", local, "me/x", "--timeout", "1"])
print("REPORT" + json.dumps(out))
"""


def test_push_to_a_server_that_never_answers_times_out(tmp_path):
    server = SilentServer()
    try:
        env = {"HF_ENDPOINT": server.endpoint, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
        proc = run_python(SILENT_PUSH, env=env, timeout=240)  # without a timeout this would hang until killed
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("REPORT", 1)[1])
    for key in ("api", "method"):
        assert "failed while creating the repository" in out[key] and "Timeout" in out[key], out[key]
        assert "no progress for 1 s" in out[key] and "--timeout" in out[key]
        assert out[key + "_s"] < 60  # bounded by the 1 s timeout, not by the 120 s default nor forever
    assert out["cli"] == 2 and "no progress for 1 s" in proc.stderr


def test_push_timeout_is_checked_before_any_work(models, tmp_path):
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        hf_prune.push_pruned(tmp_path, "me/x", timeout=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        models[0].push_to_hub("me/x", timeout=-1)


RETRY = r"""
import json, os, tempfile
import hf_prune
from export_utils import prune, tiny_model
model = prune(tiny_model("llama"), "unstructured", 0.5)
out = {}
try:
    model.push_to_hub("me/retry")
except hf_prune.export.PushError as err:
    out["error"] = str(err)
out["temporaries"] = [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("hf_prune-push-")]
model.push_to_hub("me/retry")        # the retry the message advises: the repository exists now (409 + url)
local = tempfile.mkdtemp() + "/export"
model.save_pretrained(local)
hf_prune.push_pruned(local, "me/retry", commit_message="again")  # and the local way, to the existing repo
print("REPORT" + json.dumps(out))
"""


def test_failed_push_names_no_deleted_folder_and_the_retry_works(hub, tmp_path):
    hub.fail_next["/api/models/me/retry/commit"] = 500
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = run_python(RETRY, env={**hub.client_env(tmp_path / "hf_home"), "TMPDIR": str(tmp)}, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("REPORT", 1)[1])
    assert "failed while uploading the files" in out["error"] and "retry model.push_to_hub('me/retry')" in out["error"]
    assert "hf_prune-push-" not in out["error"] and out["temporaries"] == []  # names no folder; none is left
    repo = hub.repos["me/retry"]
    assert [c["summary"] for c in repo.commits][-1] == "again" and len(repo.commits) == 2
    assert {"config.json", "model.safetensors", "README.md"} <= set(repo.branches["main"])
