"""Run a Python snippet under ``mpiexec -n N`` and return its completed process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infinilm_nb.runtime.distributed import MPI_ENV, find_mpiexec

ROOT = Path(__file__).resolve().parents[2]


def mpiexec(ranks: int, args: list[str], timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks python ARGS`` from the repo root, CPU backend, output captured."""
    launcher = find_mpiexec()
    full_env = {**os.environ, **MPI_ENV, "INFINILM_NB_BACKEND": "cpu", "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("NUMBA_ENABLE_CUDASIM", None)
    return subprocess.run(
        [launcher, "-n", str(ranks), sys.executable, *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )

