"""bench/tp.py (tp=2 against tp=1) end to end on a tiny random model: on the CPU here, on 2 GPUs there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.mpi


def run_bench(tmp_path: Path, backend: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    args = [sys.executable, "bench/tp.py", "--backend", backend, "--size", "tiny", "--layers", "2", "--prompt", "16",
            "--tokens", "24", "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path), "--llm-timeout", "120"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "teacher-forced top-1 agreement" in done.stdout and "collectives of one decode step" in done.stdout
    return json.loads((tmp_path / "tp.json").read_text())


def test_bench_runs_on_the_cpu(tmp_path: Path):
    result = run_bench(tmp_path, "cpu")
    assert result["tp2"]["agreement"] == 1.0  # float32: the same tokens
    assert result["tp2"]["messages"] == 6 and result["tp1"]["decode_tok_s"] > 0


@pytest.mark.gpu
def test_bench_runs_on_two_gpus(tmp_path: Path):
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    result = run_bench(tmp_path, "cuda")
    assert result["tp2"]["agreement"] >= 0.9  # float16 sums in another order may flip a near-tie
