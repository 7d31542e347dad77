"""Uploading an export to the Hub with `huggingface_hub` (create_repo + upload_folder), card included as written."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi


class PushError(RuntimeError):
    """Uploading failed; the local export is untouched."""


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
):
    """Uploads an export directory (compressed weights, config, the hf_prune model card) to `repo_id`.

    The files go up exactly as `save_pretrained` wrote them (our `README.md` is not replaced by a generic card).
    With `verify=True` the export is checked first (`describe_export`); a broken export is never uploaded.
    Returns the `huggingface_hub.CommitInfo`. Raises [`PushError`] saying which step failed.
    """
    from .info import describe_export

    directory = Path(directory)
    if verify:
        desc = describe_export(directory, verify=True)
        if not desc["verified"]:
            raise ValueError(f"Refusing to push {str(directory)!r}: the export does not verify: {desc['errors']}")
    api = HfApi(token=token)
    step = "creating the repository"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            step = f"creating branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "uploading the files"
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
        raise PushError(
            f"Pushing {str(directory)!r} to {repo_id!r} failed while {step}: {type(err).__name__}: {err}. "
            f"The local export in {str(directory)!r} is intact; retry with hf_prune.push_pruned."
        ) from err
