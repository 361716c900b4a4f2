"""Where paged decode attention stops: time it at every partition count beside the floors of the same grid.

Usage: ``python bench/attention_sweep.py [--out DIR] [--cases 1x8192,16x1024] [--budget S]``. For each
(batch, context) case of the kernel bench (32 q / 8 kv heads, d = 128, block 16, float16) it prints,
for each number of partitions a token's keys are cut into:

* ``mma`` and ``cuda-core``: the split kernels (attention_mma, in the warps a block the dispatcher
  chooses, and the CUDA-core one), forced to that count through ``attention._plan``; the dispatcher's
  own count is marked;
* ``+merge``: the tensor-core split with the merge kernel after it instead of the merge in its last
  partition block (``attention.MERGE_IN_PARTITION`` off; the CUDA-core split always has the kernel);
* ``read``: a bare paged read of the same K and V bytes with the same grid and block size (one block
  per (token, KV head, partition), 128 threads, the same block table lookups, 16-byte loads, 4 keys'
  rows in flight per thread, nothing computed): what the memory system gives that geometry;
* ``empty``: the same grid doing nothing: the launch and block scheduling floor.

Writes ``attention_sweep.jsonl`` as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

from bench.kernels import ATTENTION_CASES, BLOCK_SIZE, HEAD_DIM, KV_HEADS, DecodeAttentionCase  # noqa: E402
from bench.timing import copy_bandwidth, gpu_name, time_graph  # noqa: E402
from numba import cuda, int64, uint32  # noqa: E402

from infinilm_nb.kernels import attention, attention_mma, attention_plan  # noqa: E402
from infinilm_nb.kernels.common import compiled, launch_stream, multiprocessors  # noqa: E402
from infinilm_nb.kernels.mma import load_words_stream  # noqa: E402

THREADS = 128  # the attention blocks' (4 warps)
CHUNKS = HEAD_DIM // 8  # 16-byte chunks of a K or V row
ROWS = THREADS // CHUNKS  # key rows a block pass covers
UNROLL = 4
MAGIC = uint32(0x9E3779B9)


def _paged_read_kernel(k, v, block_tables, part_keys, length, sink):
    """Read the K and V rows of keys ``[z * part_keys, (z + 1) * part_keys)`` of sequence ``x``, KV head
    ``y``, through the block table, and nothing else."""
    b, g, z = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
    chunk = cuda.threadIdx.x % CHUNKS
    start = z * part_keys
    stop = min(start + part_keys, length)
    acc = uint32(0)
    for base in range(start + cuda.threadIdx.x // CHUNKS, stop, ROWS * UNROLL):
        for u in range(UNROLL):
            key = min(base + ROWS * u, stop - 1)
            block = block_tables[b, key // BLOCK_SIZE]
            at = ((int64(block) * BLOCK_SIZE + key % BLOCK_SIZE) * KV_HEADS + g) * HEAD_DIM + chunk * 8
            kw = load_words_stream(k, at)
            vw = load_words_stream(v, at)
            acc ^= kw[0] ^ kw[1] ^ kw[2] ^ kw[3] ^ vw[0] ^ vw[1] ^ vw[2] ^ vw[3]
    if acc == MAGIC:
        sink[0] = 1


def _empty_kernel(sink):
    if cuda.blockIdx.z == 1 << 30:
        sink[0] = 1


def part_counts(tokens: int, keys: int, most: int) -> list[int]:
    """The distinct partition counts the launcher can end up with (:func:`attention_plan.split_of`), from
    1 up to ``most`` and to 8 waves of 4 blocks an SM."""
    sms = multiprocessors()
    counts = {attention_plan.split_of(keys, parts)[0] for parts in range(1, most + 1)}
    return sorted(parts for parts in counts if tokens * KV_HEADS * parts <= 8 * 4 * sms)


def forced(parts: int, plan):
    """A stand-in for attention._plan (``plan``) that keeps its kernels and always answers ``parts``."""
    return lambda *args: (plan(*args)[0], parts)


def sweep_case(batch: int, length: int, bw: float, log) -> None:
    case = DecodeAttentionCase.make(batch, length)
    nbytes, caches, tables = case.nbytes, case.caches, case.tables
    most = case.workspace.partials.shape[0] * case.workspace.partials.shape[2] // batch
    sink = cupy.zeros(1, np.float16)
    read = compiled(_paged_read_kernel, "void(float16[::1], float16[::1], int32[:, ::1], int64, int64, float16[::1])")
    empty = compiled(_empty_kernel, "void(float16[::1])")

    def attend(mma: bool, within_one_wave: bool = False) -> float:
        attention_mma.ENABLED, attention_mma.WITHIN_ONE_WAVE = mma, within_one_wave
        return time_graph(case.calls(case.workspace), reps=20, rounds=5)

    enabled, choose = attention_mma.ENABLED, attention._plan
    dispatched = []  # what the launcher picks as it stands, recorded by a wrapper
    attention._plan = lambda *a: dispatched.append(choose(*a)) or dispatched[-1]
    attend(enabled, within_one_wave=True)
    kernels, parts = dispatched[-1]
    chosen, _ = attention_plan.split_of(length, parts)
    print(f"--- B={batch} L={length}: {nbytes / 1e6:.1f} MB of K and V, dispatched {chosen} partitions "
          f"({f'mma, {kernels.threads // 32} warps' if kernels.merges else 'cuda-core'})", flush=True)
    print(f"  {'parts':>5} {'blocks':>6} {'keys':>5} | {'mma us':>7} {'%':>4} | {'+merge':>7} {'%':>4} | "
          f"{'cuda-core':>9} {'%':>4} | {'read us':>7} {'%':>4} | {'empty us':>8}", flush=True)
    for parts in part_counts(batch, length, most):
        _, part_keys = attention_plan.split_of(length, parts)
        attention._plan = forced(parts, choose)
        row = {"batch": batch, "length": length, "parts": parts, "keys": part_keys,
               "mma_us": attend(True) * 1e6, "cuda_core_us": attend(False) * 1e6}
        attention.MERGE_IN_PARTITION = False
        row["mma_merge_kernel_us"] = attend(True) * 1e6
        attention.MERGE_IN_PARTITION = True
        grid = (batch, KV_HEADS, parts)
        row["read_us"] = 1e6 * time_graph(
            [lambda kc=kc, vc=vc: read[grid, THREADS, launch_stream()](kc.reshape(-1), vc.reshape(-1), tables,
                                                                        part_keys, length, sink)
             for kc, vc in caches], reps=20, rounds=5)
        row["empty_us"] = 1e6 * time_graph([lambda: empty[grid, THREADS, launch_stream()](sink)], reps=20, rounds=5)
        mark = " <- dispatched" if parts == chosen else ""
        timed = ("mma_us", "mma_merge_kernel_us", "cuda_core_us", "read_us")
        columns = " | ".join(f"{row[key]:{9 if key == 'cuda_core_us' else 7}.1f} {1e8 * nbytes / row[key] / bw:4.0f}"
                             for key in timed)  # us and % of copy
        print(f"  {parts:5d} {batch * KV_HEADS * parts:6d} {part_keys:5d} | {columns} | {row['empty_us']:8.2f}{mark}",
              flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()
    attention._plan, attention_mma.ENABLED, attention_mma.WITHIN_ONE_WAVE = choose, enabled, True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--cases", default=",".join(f"{b}x{n}" for b, n in ATTENTION_CASES),
                        help="comma-separated batch x context")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; no new case starts after them")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Grid size")  # numba's low-occupancy warning: small grids are the point
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "attention_sweep.jsonl", "a")
    bw = copy_bandwidth()
    print(f"{gpu_name()}  copy {bw / 1e9:.0f} GB/s", flush=True)
    start = time.time()
    for case in args.cases.split(","):
        if time.time() - start > args.budget:
            break
        batch, length = (int(v) for v in case.split("x"))
        sweep_case(batch, length, bw, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
