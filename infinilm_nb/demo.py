"""``infinilm-nb demo``: the embedded model answers a question, run as MPI ranks.

It fetches SmolLM2-135M-Instruct once (:func:`infinilm_nb.models.fetch_smollm2`), picks a rank count
and runs ``mpiexec -n R python -m infinilm_nb generate --chat ...``, which streams the greedy answer
and ends with the prompt and generation speeds in tokens/s.

The rank count (:func:`default_ranks`): SmolLM2 has 9 query heads and 3 KV heads, so tensor
parallelism of 1 or 3 ranks splits it. On a GPU machine, one rank per GPU, as many as split the
model; on the CPU, one rank, which measured fastest (README, "make demo").
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

QUESTION = "What is the capital of France?"


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``infinilm-nb demo``."""
    parser.add_argument("--ranks", type=int, default=None,
                        help="MPI ranks, the tensor parallel size (default: the fastest here, see the README)")
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--prompt", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    parser.add_argument("--max-tokens", type=int, default=128)


def default_ranks(backend: str, model_dir: Path) -> int:
    """The demo's rank count: on cuda the most GPUs (one rank each) that split the model; else 1."""
    if backend != "cuda":
        return 1
    import cupy

    from .runtime.config import ModelConfig, ParallelConfig

    config = ModelConfig.from_pretrained(model_dir)
    fits = [1]
    for n in range(2, cupy.cuda.runtime.getDeviceCount() + 1):
        try:
            ParallelConfig(n).check(config)
        except ValueError:
            continue
        fits.append(n)
    return fits[-1]


def demo_command(model_dir: Path, ranks: int, backend: str, prompt: str, max_tokens: int) -> list[str]:
    """The command line the demo runs: ``generate --chat`` under ``mpiexec -n ranks``.

    Without an ``mpiexec`` one rank runs directly; more ranks are a ``ValueError`` saying what to install."""
    from .runtime.distributed import find_mpiexec

    command = [sys.executable, "-m", "infinilm_nb", "generate", "--chat", "--model", str(model_dir),
               "--prompt", prompt, "--backend", backend, "--max-tokens", str(max_tokens)]
    launcher = find_mpiexec()
    if launcher is None:
        if ranks > 1:
            raise ValueError(f"--ranks {ranks} needs mpiexec: pip install 'infinilm-nb[mpi]' (MPICH's wheel)")
        return command
    return [launcher, "-n", str(ranks), *command]


def demo_main(args: argparse.Namespace) -> int:
    """Fetch the model, then run the question through ``mpiexec``; returns its exit status."""
    from .backend import resolve_name
    from .models import fetch_smollm2
    from .runtime.config import ModelConfig, ParallelConfig
    from .runtime.distributed import MPI_ENV

    model_dir = fetch_smollm2()
    backend = resolve_name(args.backend)
    ranks = args.ranks if args.ranks is not None else default_ranks(backend, model_dir)
    ParallelConfig(ranks).check(ModelConfig.from_pretrained(model_dir), "SmolLM2-135M-Instruct (--ranks)")
    command = demo_command(model_dir, ranks, backend, args.prompt, args.max_tokens)
    print(f"infinilm-nb demo: {ranks} rank{'s' if ranks > 1 else ''} on {backend}: {shlex.join(command)}",
          file=sys.stderr)
    print(f"> {args.prompt}", flush=True)
    return subprocess.run(command, env={**os.environ, **MPI_ENV}, check=False).returncode
