"""Tensor parallelism under ``mpiexec -n 2 / 3 / 4`` on the CPU against one rank, and its failure paths."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from infinilm_nb import LLM, SamplingParams
from infinilm_nb.backend import get_backend
from infinilm_nb.runtime.llama import load_model
from tests.distributed.mpi import mpiexec
from tests.distributed.tp_worker import generate, script
from tests.helpers import rel_err
from tests.runtime.hf_models import TP_TINY, save_tiny_model

pytestmark = pytest.mark.mpi

MODELS = {
    "untied": ("llama", {}),
    "tied_with_biases": ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    "one_kv_head": ("qwen2", {"num_key_value_heads": 1}),  # replicated on every rank
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models that 2 and 3 ranks split (12 q / 6 KV heads, FFN 96, vocab 300; or one KV head)."""
    root = tmp_path_factory.mktemp("tp")
    return {
        name: save_tiny_model(root / name, family, **(TP_TINY | extra)) for name, (family, extra) in MODELS.items()
    }


@pytest.fixture(scope="module")
def four_heads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/runtime/hf_models.TINY: 4 q heads / 2 KV heads (3 ranks do not split it; 4 replicate each KV head)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")


def run_worker(ranks: int, dirs: list[Path], out: Path, llm: Path | None = None) -> dict[str, np.ndarray]:
    args = ["-m", "tests.distributed.tp_worker", str(out), "--models", *map(str, dirs)]
    done = mpiexec(ranks, args + (["--llm", str(llm)] if llm else []), timeout=120)
    assert done.returncode == 0, done.stderr
    return dict(np.load(out))


def check_against_one_rank(got: dict[str, np.ndarray], dirs: list[Path]) -> None:
    for index, directory in enumerate(dirs):
        model = load_model(directory, get_backend("cpu"), progress=False)
        for kind in ("paged", "static"):
            want = script(model, kind)
            rows = got[f"{index}/{kind}"]
            assert rel_err(rows, want) < 1e-5, (directory.name, kind)
            assert np.abs(rows - want).max() < 1e-5 * max(1.0, np.abs(want).max()), (directory.name, kind)
            assert np.array_equal(rows.argmax(-1), want.argmax(-1)), (directory.name, kind)


@pytest.mark.parametrize("ranks,llm_model", [(2, "untied"), (3, "tied_with_biases")])
def test_ranks_give_the_logits_and_tokens_of_one_rank(models: dict[str, Path], tmp_path: Path, ranks: int, llm_model: str):
    """Prefill, mixed and decode steps with paged and static caches; then LLM.generate driven by rank 0."""
    dirs = list(models.values())
    got = run_worker(ranks, dirs, tmp_path / "out.npz", llm=models[llm_model])
    check_against_one_rank(got, dirs)
    assert got["llm"].tolist() == generate(str(models[llm_model]))


def test_more_ranks_than_kv_heads_replicate_them(four_heads: Path, tmp_path: Path):
    """4 ranks over 2 KV heads: ranks 0, 1 hold KV head 0 and ranks 2, 3 KV head 1."""
    check_against_one_rank(run_worker(4, [four_heads], tmp_path / "out.npz"), [four_heads])


def test_cli_generate_prints_once_under_mpiexec(models: dict[str, Path]):
    model = models["untied"]
    args = ["-m", "infinilm_nb", "generate", "--model", str(model), "--prompt", "Hello, world", "--max-tokens", "8",
            "--backend", "cpu", "--cache", "static"]
    done = mpiexec(2, args, timeout=120)
    assert done.returncode == 0, done.stderr
    params = SamplingParams(max_tokens=8, temperature=0)
    want = LLM(model, backend="cpu", cache="static").generate("Hello, world", params)[0].outputs[0].text
    assert done.stdout == want + "\n"
    assert done.stderr.count("generation: 8 tokens") == 1
    assert done.stderr.count("Loading weights: 100%") == 1  # one progress bar: rank 0's


def test_a_rank_count_that_does_not_split_the_model_stops_every_rank(four_heads: Path):
    start = time.monotonic()
    done = mpiexec(3, ["-m", "infinilm_nb", "generate", "--model", str(four_heads), "--prompt", "x", "--backend", "cpu"],
                   timeout=60)
    assert done.returncode != 0
    message = "tensor parallel size 3 does not divide num_attention_heads (4); sizes that fit this model: 1, 2, 4"
    assert done.stderr.count(message) == 3, done.stderr  # every rank says it, before any weight is read
    assert "Loading weights" not in done.stderr
    assert time.monotonic() - start < 30


def test_a_rank_failing_in_a_step_brings_every_rank_down(models: dict[str, Path]):
    code = (
        "from infinilm_nb import LLM, SamplingParams\n"
        "from infinilm_nb.runtime.distributed import RankInfo\n"
        "from infinilm_nb.runtime.engine import LLMEngine\n"
        "if RankInfo.detect().rank == 1:\n"
        "    calls, real = [], LLMEngine.execute\n"
        "    def execute(self, step, sampling=None):\n"
        "        calls.append(step)\n"
        "        if len(calls) == 3: raise RuntimeError('rank 1 fails on purpose')\n"
        "        return real(self, step, sampling)\n"
        "    LLMEngine.execute = execute\n"
        f"llm = LLM({str(models['untied'])!r}, backend='cpu', max_model_len=64)\n"
        "llm.generate('Hello', SamplingParams(max_tokens=20, ignore_eos=True))\n"
        "print('rank 0 finished')\n"
    )
    start = time.monotonic()
    done = mpiexec(2, ["-c", code], timeout=60)
    assert done.returncode != 0
    assert "[rank 1]" in done.stderr and "rank 1 fails on purpose" in done.stderr
    assert "rank 0 finished" not in done.stdout
    assert time.monotonic() - start < 30


def test_a_rank_failing_to_load_stops_the_job_even_when_the_cli_catches_the_error(models: dict[str, Path]):
    """The CLI turns a ValueError into a message and status 2; on one rank alone that would leave
    the others waiting for it in a collective, so a load failure aborts the job instead."""
    code = (
        "import sys\n"
        "from infinilm_nb.cli import main\n"
        "from infinilm_nb.runtime.distributed import RankInfo\n"
        "from infinilm_nb.runtime.weights import ModelWeights\n"
        "if RankInfo.detect().rank == 1:\n"
        "    def broken(self, name): raise ValueError('rank 1 cannot read ' + name)\n"
        "    ModelWeights.__getitem__ = broken\n"
        f"sys.exit(main(['generate', '--model', {str(models['untied'])!r}, '--prompt', 'x', '--backend', 'cpu']))\n"
    )
    start = time.monotonic()
    done = mpiexec(2, ["-c", code], timeout=60)
    assert done.returncode != 0
    assert "[rank 1]" in done.stderr and "rank 1 cannot read embed_tokens" in done.stderr
    assert time.monotonic() - start < 30
