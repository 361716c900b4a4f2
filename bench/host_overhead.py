"""Host overhead per decode step of :class:`LLMEngine`, on the cpu backend with a fake model.

The fake model's forward returns random logits at once, so what is timed is the engine's own host
path (schedule, sampling parameters, update, detokenize, stop checks, outputs). ``execute`` (the
forward and the sampler) is timed apart and subtracted; the best of 5 runs is reported. "stream" steps build every request's output
per token (``step()``), "generate" steps only finished ones (``step(finished_only=True)``, as
``LLM.generate``).

    python bench/host_overhead.py [--batch 1 8 64] [--steps 200] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "runtime"))

from hf_models import save_tokenizer  # noqa: E402

from infinilm_nb import SamplingParams  # noqa: E402
from infinilm_nb.backend import get_backend  # noqa: E402
from infinilm_nb.runtime.block_manager import BlockManager  # noqa: E402
from infinilm_nb.runtime.cache import BlockAllocator  # noqa: E402
from infinilm_nb.runtime.engine import LLMEngine  # noqa: E402
from infinilm_nb.runtime.scheduler import Scheduler  # noqa: E402
from infinilm_nb.runtime.tokenizer import Tokenizer  # noqa: E402

VOCAB = 512
BLOCK_SIZE = 16


class FakeModel:
    """Random logits for each sequence of a step, instantly."""

    def __init__(self, vocab_size: int) -> None:
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self._logits = np.random.default_rng(0).standard_normal((256, vocab_size)).astype(np.float32)

    def forward(self, step, cache) -> np.ndarray:
        return self._logits[: step.num_seqs]


def make_engine(tokenizer: Tokenizer, batch: int, max_tokens: int) -> LLMEngine:
    """An engine with ``batch`` requests queued, each generating ``max_tokens`` tokens."""
    blocks = batch * (-(-(max_tokens + 64) // BLOCK_SIZE)) + 8
    scheduler = Scheduler(BlockManager(BlockAllocator(blocks), BLOCK_SIZE), batch, 8192)
    engine = LLMEngine(FakeModel(VOCAB), None, tokenizer, get_backend("cpu"), scheduler, 4096, set(), seed=0)
    rng = np.random.default_rng(1)
    for i in range(batch):
        prompt = [int(t) for t in rng.integers(10, VOCAB, 32)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, ignore_eos=True,
                                stop=["zzzq"] if i % 2 else None)
        engine.add_request(str(i), None, prompt, params)
    return engine


def measure(tokenizer: Tokenizer, batch: int, steps: int, finished_only: bool = False) -> float:
    """Host µs per decode step over ``steps`` decode steps."""
    engine = make_engine(tokenizer, batch, steps + 2)
    engine.step()  # the prefill
    forward = 0.0
    execute = engine.execute

    def timed_execute(*args, **kwargs):
        nonlocal forward
        start = time.perf_counter()
        result = execute(*args, **kwargs)
        forward += time.perf_counter() - start
        return result

    engine.execute = timed_execute
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(finished_only)
    return (time.perf_counter() - start - forward) / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest batch")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        save_tokenizer(directory, VOCAB)
        tokenizer = Tokenizer.from_pretrained(directory)
        for batch in args.batch:
            measure(tokenizer, batch, 20)  # warm up
            for mode, finished_only in (("stream", False), ("generate", True)):
                host = min(measure(tokenizer, batch, args.steps, finished_only) for _ in range(5))  # least noisy
                print(f"batch {batch:3d} {mode:8s}: host {host:8.1f} us/step  {host / batch:6.1f} us/seq")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(measure, tokenizer, max(args.batch), args.steps)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
