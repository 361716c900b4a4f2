"""What a benchmark's figures are of: the commit, as every bench prints and stores it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The commit measured: INFINILM_NB_COMMIT (the GPU machine gets no .git), else ``git describe``
    of the repository, "-dirty" when the tree is not HEAD's (the GPU machine's copy of .git can lag
    the tree it runs)."""
    if os.environ.get("INFINILM_NB_COMMIT"):
        return os.environ["INFINILM_NB_COMMIT"]
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=REPO)
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"
