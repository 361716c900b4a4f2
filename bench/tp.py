"""Tensor parallelism: tp=2 against tp=1 on a random Llama-3-8B-shaped float16 model (2 GPUs).

Usage, on a machine with 2 GPUs: ``python bench/tp.py [--layers 8] [--prompt 128] [--tokens 256]
[--ranks 2] [--model-dir DIR] [--out DIR]``.

It writes the random checkpoint once (:mod:`bench.model`: N(0, 0.02^2) float16 weights drawn with
CuPy and written shard by shard, never a torch model), then runs two jobs of this script's
``--worker``: ``python`` (tp=1), then ``mpiexec -n RANKS python`` (tp=RANKS). Each job:

1. teacher-forced decode with the model alone (eager forward steps on a paged cache): tp=1 takes its
   own greedy tokens after a random prompt, tp=RANKS is fed those and its top-1 is compared at each
   of the ``--tokens`` positions (float16 sums in another order may flip near-ties);
2. (tp=RANKS) the collectives of one batch-1 decode step timed alone: 2 x layers + 1 all-reduces of
   ``[1, hidden]`` (the embedding, o_proj and down) and the all-gather of the ``[1, vocab / RANKS]`` logits;
3. decode tokens/s at batch 1 through ``LLM`` (the engine as users run it: CUDA graphs, rank 0
   sampling, the followers driven by broadcasts).

Defaults to 8 decoder layers of Llama-3-8B's width (the full 32 are 16 GB to write and load per
run; ``--layers 32`` for them): the speed ratio and the communication share are what to read, the
absolute tokens/s are those of the 8-layer model. Prints a table naming the GPU; writes ``tp.json``
to ``--out``. ``--backend cpu --size tiny`` runs the same on the CPU (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.model import llama_config, model_directory  # noqa: E402
from bench.provenance import commit  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "bos_token_id": 1, "eos_token_id": 2}
BLOCK = 16


def step_input(token_ids: list[int], start: int, num_blocks: int) -> Any:
    """The StepInput of one sequence's tokens at positions ``start..`` on blocks 0, 1, 2... in order."""
    from infinilm_nb.runtime.batch import StepInput

    positions = np.arange(start, start + len(token_ids), dtype=np.int32)
    return StepInput(
        token_ids=np.asarray(token_ids, dtype=np.int32),
        positions=positions,
        slot_mapping=positions.copy(),  # block b holds positions b * BLOCK.. so the slot is the position
        query_start_loc=np.array([0, len(token_ids)], dtype=np.int32),
        context_lens=np.array([start + len(token_ids)], dtype=np.int32),
        block_tables=np.arange(num_blocks, dtype=np.int32)[None, :],
        max_query_len=len(token_ids),
    )


def teacher_forced(model: Any, prompt: list[int], steps: int, reference: list[int] | None) -> list[int]:
    """Top-1 token after the prompt and after each of ``steps - 1`` fed tokens: ``reference``'s, or
    (None) the model's own greedy choice."""
    from infinilm_nb.runtime.cache import PagedKVCache

    blocks = -(-(len(prompt) + steps) // BLOCK)
    cache = PagedKVCache(model.backend, model.config, blocks, BLOCK, model.dtype, model.parallel)
    logits = model.forward(step_input(prompt, 0, blocks).to(model.backend), cache)
    tops: list[int] = []
    for i in range(steps):
        tops.append(int(logits[0].argmax()))
        if i + 1 < steps:
            fed = reference[i] if reference is not None else tops[-1]
            logits = model.forward(step_input([fed], len(prompt) + i, blocks).to(model.backend), cache)
    return tops


def time_step_messages(group: Any, backend: Any, config: Any, dtype: Any, reps: int = 200) -> dict[str, float]:
    """Seconds of one batch-1 decode step's collectives, run alone: launched eagerly (median of 5
    rounds of ``reps`` steps) and, on a GPU, replayed from a CUDA graph as decode steps run them."""
    xp = backend.xp
    hidden = xp.zeros((1, config.hidden_size), dtype)
    logits = xp.zeros((1, config.vocab_size // group.world_size), dtype)
    gathered = xp.empty((group.world_size, *logits.shape), dtype)
    count = 2 * config.num_hidden_layers + 1

    def step() -> None:
        for _ in range(count):
            group.all_reduce(hidden)
        group.all_gather(logits, gathered)

    for _ in range(5):
        step()
    rounds = []
    for _ in range(5):
        backend.synchronize()
        group.barrier()
        start = time.perf_counter()
        for _ in range(reps):
            step()
        backend.synchronize()
        rounds.append((time.perf_counter() - start) / reps)
    result = {"step_comm_s": float(np.median(rounds)), "messages": count + 1}
    if backend.on_gpu:
        from bench.timing import time_graph  # every rank captures and replays the same collectives

        result["step_comm_graph_s"] = time_graph([step], reps=20)
    return result


def progress(message: str) -> None:
    """A line on stderr with the seconds since the job started, so a cut-off run shows where it was."""
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


STARTED = time.perf_counter()


def llm_decode(model_dir: str, backend: str, prompt: list[int], tokens: int) -> dict[str, float]:
    """Batch-1 greedy decode through LLM: seconds to the first token and decode tokens/s (rank 0;
    under mpiexec the other ranks end inside ``LLM(...)`` once rank 0 closes it)."""
    from infinilm_nb import LLM, SamplingParams

    llm = LLM(model_dir, backend=backend, max_num_seqs=1, max_model_len=len(prompt) + tokens + BLOCK,
              gpu_memory_utilization=0.5)
    progress("LLM ready (weights loaded, decode graphs captured)")
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    progress("LLM warm-up generated")
    stream = llm.stream({"prompt_token_ids": prompt}, params)
    for _ in stream:
        pass
    llm.close()
    progress("LLM decode done")
    generated = len(stream.output.outputs[0].token_ids)
    return {"ttft_s": stream.time_to_first_token,
            "decode_tok_s": (generated - 1) / (stream.elapsed - stream.time_to_first_token)}


def worker(args: argparse.Namespace) -> int:
    """One job (tp = the MPI world size): teacher forcing, collectives, LLM decode; rank 0 writes JSON."""
    from infinilm_nb.backend import get_backend
    from infinilm_nb.runtime.distributed import CommunicationGroup, RankInfo, bind_device, install_abort_on_error
    from infinilm_nb.runtime.llama import load_model

    info = RankInfo.detect()
    install_abort_on_error(info)
    backend = get_backend(args.backend)
    if backend.on_gpu and info.world_size > 1:
        bind_device(info)
    group = CommunicationGroup(info, backend) if info.world_size > 1 else None
    model = load_model(args.model_dir, backend, max_model_len=args.prompt + args.tokens + BLOCK, progress=False,
                       group=group)
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, args.prompt).tolist()
    reference = json.loads(Path(args.reference).read_text())["tokens"] if args.reference else None
    result: dict[str, Any] = {"tp": info.world_size, "tokens": teacher_forced(model, prompt, args.tokens, reference)}
    if reference is not None:
        result["agreement"] = float(np.mean(np.array(result["tokens"]) == np.array(reference)))
    if group is not None:
        result.update(time_step_messages(group, backend, model.config, model.dtype))
        group.close()  # before LLM makes its own: ranks must free communicators in the same order
    if info.rank == 0:  # the figures so far, kept in case the LLM phase does not finish
        progress(f"tp={info.world_size}: " + json.dumps({k: v for k, v in result.items() if k != "tokens"}))
        Path(args.json).write_text(json.dumps(result))
    # A phase (or an exit) that hangs prints every rank's Python stack and ends the job, instead of
    # using up the run.
    faulthandler.dump_traceback_later(args.llm_timeout, exit=True)
    del model
    if backend.on_gpu:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    result.update(llm_decode(args.model_dir, args.backend, prompt, args.tokens))
    Path(args.json).write_text(json.dumps(result))
    return 0


def device_name(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def print_report(one: dict[str, Any], many: dict[str, Any], args: argparse.Namespace, title: str) -> None:
    ranks = many["tp"]
    comm_s = many.get("step_comm_graph_s", many["step_comm_s"])
    print(title)
    print(f"{'':<40} {'tp=1':>10} {f'tp={ranks}':>10}")
    if "decode_tok_s" in one and "decode_tok_s" in many:
        print(f"{'decode tokens/s (batch 1, LLM)':<40} {one['decode_tok_s']:>10.1f} {many['decode_tok_s']:>10.1f}")
        print(f"{'time to first token (ms)':<40} {1e3 * one['ttft_s']:>10.1f} {1e3 * many['ttft_s']:>10.1f}")
    else:
        print(f"{'decode through LLM':<40} {'ok' if 'decode_tok_s' in one else 'FAILED':>10} "
              f"{'ok' if 'decode_tok_s' in many else 'FAILED':>10}  (stacks above)")
    print(f"{'teacher-forced top-1 agreement':<40} {'':>10} {100 * many['agreement']:>9.1f}%")
    print(f"{'collectives of one decode step (ms)':<40} {'':>10} {1e3 * many['step_comm_s']:>10.3f}  eager")
    if "step_comm_graph_s" in many:
        print(f"{'':<40} {'':>10} {1e3 * many['step_comm_graph_s']:>10.3f}  in a CUDA graph")
    print(f"  {many['messages']} messages, {1e6 * comm_s / many['messages']:.1f} us each", end="")
    if "decode_tok_s" not in one or "decode_tok_s" not in many:
        print()
        return
    step_s = 1 / many["decode_tok_s"]
    print(f"; {100 * comm_s / step_s:.0f}% of the tp={ranks} decode step ({1e3 * step_s:.2f} ms)")
    print(f"speed-up tp={ranks} / tp=1: {many['decode_tok_s'] / one['decode_tok_s']:.2f}x; "
          f"{args.tokens} tokens after a {args.prompt}-token prompt")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", choices=["8b", "tiny"], default="8b", help="tiny: a small model for a smoke run")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--llm-timeout", type=float, default=240,
                        help="seconds for the LLM phase of a job before every rank prints its stack and the job ends")
    parser.add_argument("--model-dir", default=None, help="where the checkpoint is written once and reused")
    parser.add_argument("--out", default=None, help="directory for tp.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    from infinilm_nb.runtime.distributed import MPI_ENV, find_mpiexec

    launcher = find_mpiexec()
    if launcher is None:
        parser.error("mpiexec not found: pip install 'infinilm-nb[mpi]'")
    overrides = TINY if args.size == "tiny" else {}
    config = llama_config(args.layers, **overrides)
    size = "tiny" if args.size == "tiny" else "llama3-8b"
    keep = args.model_dir or Path(tempfile.gettempdir()) / f"infinilm-nb-bench-tp-{size}-{args.layers}"
    with model_directory(config, keep=keep) as directory, tempfile.TemporaryDirectory() as tmp:
        if args.backend == "cuda":
            from bench.model import free_gpu_memory

            free_gpu_memory()  # the weights were drawn on GPU 0: give its memory back to the jobs
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)  # keep the caller's
        env = {**os.environ, **MPI_ENV, "PYTHONPATH": path}
        job = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir", str(directory),
               "--backend", args.backend, "--prompt", str(args.prompt), "--tokens", str(args.tokens),
               "--llm-timeout", str(args.llm_timeout)]
        one, many = Path(tmp) / "tp1.json", Path(tmp) / "tpn.json"
        # A job that fails in its LLM phase has written its earlier figures: report them, then fail.
        codes = [subprocess.run([*job, "--json", str(one)], env=env).returncode,
                 subprocess.run([launcher, "-n", str(args.ranks), *job, "--json", str(many), "--reference", str(one)],
                                env=env).returncode]
        if not one.exists() or not many.exists():
            print(f"tensor parallelism: a job failed before its first figures (exit codes {codes})", file=sys.stderr)
            return 1
        results = json.loads(one.read_text()), json.loads(many.read_text())
    title = (f"tensor parallelism, {device_name(args.backend)}  {datetime.date.today()}  commit {commit()}  "
             f"{args.layers}-layer {size} model, float16" if args.backend == "cuda" else
             f"tensor parallelism, cpu  {datetime.date.today()}  commit {commit()}  {args.layers}-layer {size}")
    print_report(*results, args, title)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"title": title, "tp1": results[0], f"tp{args.ranks}": results[1]}
        (Path(args.out) / "tp.json").write_text(json.dumps(record, indent=1))
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
