"""``infinilm-nb demo`` end to end on the real SmolLM2 (slow: needs the 98 MB wheel, fetched once per run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infinilm_nb.runtime.distributed import find_mpiexec

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.mpi]


@pytest.mark.parametrize("ranks", [1, 3])
def test_demo_answers_its_question(smollm2_home: Path, ranks: int):
    if find_mpiexec() is None:
        pytest.skip("mpiexec not found")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run(
        [sys.executable, "-m", "infinilm_nb", "demo", "--ranks", str(ranks), "--backend", "cpu", "--max-tokens", "16"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "> What is the capital of France?\nThe capital of France is Paris.\n"
    assert "prompt: 37 tokens" in done.stderr and "generation: 8 tokens" in done.stderr

