"""Which kvdemo code a result was measured with: ``kvdemo_commit`` and ``kvdemo_tree_dirty`` for result JSONs."""

from __future__ import annotations

import os
import subprocess

from .config import REPO_ROOT

ENV_COMMIT = "KVDEMO_COMMIT"  # wins when set: the GPU machine's copy of the tree may carry an older .git


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def source_revision() -> dict:
    """``kvdemo_commit``: ``KVDEMO_COMMIT`` where set (then ``kvdemo_tree_dirty`` is None: unknown), else ``git
    rev-parse HEAD``; ``kvdemo_tree_dirty``: tracked files changed (None outside a git checkout)."""
    pinned = os.environ.get(ENV_COMMIT)
    if pinned:
        return {"kvdemo_commit": pinned, "kvdemo_tree_dirty": None}
    head = _git("rev-parse", "HEAD")
    if not head:
        return {"kvdemo_commit": None, "kvdemo_tree_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"kvdemo_commit": head.strip(),
            "kvdemo_tree_dirty": bool(status.strip()) if status is not None else None}
