"""Uploading an export to the Hub with `huggingface_hub` (create_repo + upload_folder), card included as written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from huggingface_hub import HfApi

DEFAULT_TIMEOUT = 120.0  # seconds without progress on one request (connect, send, or wait for the answer)


class PushError(RuntimeError):
    """Uploading failed; the local export is untouched. `step` names what failed, `cause` the error."""

    def __init__(self, message: str, *, step: str | None = None, repo_id: str | None = None, cause: str | None = None):
        super().__init__(message)
        self.step, self.repo_id, self.cause = step, repo_id, cause


def check_timeout(seconds: float | None) -> float | None:
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0):
        raise ValueError(f"timeout must be a number of seconds > 0 (or None for no limit), got {seconds!r}")
    return seconds


@contextlib.contextmanager
def hub_timeout(seconds: float | None):
    """Bounds every request `huggingface_hub` makes in the block to `seconds` without progress.

    `huggingface_hub` 1.x/2.x gives its shared HTTP client no timeout (`timeout=None`): a server that accepts the
    connection and never answers hangs `create_repo` / `upload_folder` forever, and neither takes a timeout
    argument. The shared client's timeout is set for the block and restored after (other threads using the Hub
    meanwhile get the same bound). `None` leaves it as it is.
    """
    if check_timeout(seconds) is None:
        yield
        return
    from huggingface_hub.utils import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = type(previous)(seconds)
    try:
        yield
    finally:
        session.timeout = previous


def push_pruned(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    verify: bool = True,
    timeout: float | None = DEFAULT_TIMEOUT,
):
    """Uploads an export directory (compressed weights, config, the hf_prune model card) to `repo_id`.

    The files go up exactly as `save_pretrained` wrote them (our `README.md` is not replaced by a generic card).
    With `verify=True` the export is checked first (`describe_export`); a broken export is never uploaded.
    `timeout`: seconds one request may go without progress (connecting, sending, waiting for the answer) before
    the push fails (default 120; `None`: no limit). Returns the `huggingface_hub.CommitInfo`. Raises [`PushError`]
    saying which step failed and what to retry (a retry is safe: the repository is created only if missing and
    the upload commits every file again).
    """
    from .info import describe_export

    directory = Path(directory)
    check_timeout(timeout)
    if verify:
        desc = describe_export(directory, verify=True)
        if not desc["verified"]:
            raise ValueError(f"Refusing to push {str(directory)!r}: the export does not verify: {desc['errors']}")
    api = HfApi(token=token)
    steps = ["creating the repository"]  # the step in progress, for the error message
    try:
        with hub_timeout(timeout):
            repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
            if revision is not None and not revision.startswith("refs/pr"):
                steps.append(f"creating branch {revision!r}")
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            steps.append("uploading the files")
            return api.upload_folder(
                folder_path=str(directory),
                repo_id=repo_id,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or "Upload pruned model (hf_prune)",
                commit_description=commit_description,
                create_pr=create_pr,
                ignore_patterns=[".*", "**/.*"],
            )
    except Exception as err:  # network and HTTP errors of every kind: report the step, keep the export
        cause = f"{type(err).__name__}: {err}"
        if "Timeout" in type(err).__name__ and timeout is not None:
            cause += f" (no progress for {timeout:g} s; pass a larger timeout= / --timeout on a slow connection)"
        raise PushError(
            f"Pushing {str(directory)!r} to {repo_id!r} failed while {steps[-1]}: {cause}. The local export in "
            f"{str(directory)!r} is intact; retry with hf_prune.push_pruned({str(directory)!r}, {repo_id!r}) or "
            f"`hf-prune push {directory} {repo_id}` (safe: the repository is created only if missing).",
            step=steps[-1], repo_id=repo_id, cause=cause,
        ) from err
