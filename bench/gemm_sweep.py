"""Tune the tensor-core decode linear: time every MmaConfig candidate on the Llama-3-8B shapes.

Usage: ``python bench/gemm_sweep.py [--out DIR] [--shapes qkv,o] [--m 1,8,16,32] [--fused] [--probes]
[--splits 2,4,8] [--budget S]``. For each shape and M prints cuBLAS (torch.matmul in a CUDA graph),
the launcher's choice, the CUDA-core kernel and each candidate (graph-timed, weights rotated), best
first (with ``--splits``, the candidates that split K over that many blocks instead); writes
``gemm_sweep.jsonl`` as it goes so a cut-off run keeps what it measured. ``--probes`` first times an
empty kernel and a pure read of each weight (the floor a single launch of that size can reach);
``--resources`` prints registers, local memory and SASS counts of the variants ``gemm.mma_config``
picks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

from bench.kernels import GEMM_SHAPES, OPS, rand  # noqa: E402
from bench.timing import copies_needed, copy_bandwidth, gpu_name, time_cublas, time_graph  # noqa: E402
from numba import cuda, uint32  # noqa: E402

from infinilm_nb.kernels import gemm  # noqa: E402
from infinilm_nb.kernels.common import compiled, launch_stream, multiprocessors  # noqa: E402
from infinilm_nb.kernels.gemm_mma import SHARED_BYTES, MmaConfig  # noqa: E402
from infinilm_nb.kernels.mma import load_words_stream  # noqa: E402


def candidates(m: int, fused: bool, splits: list[int] | None = None) -> list[MmaConfig]:
    """The variants worth timing for M rows: W tiles per warp, warps on rows and on K, steps per load
    batch (the knobs that mattered in the sweeps behind gemm.mma_config). With ``splits``, those that
    split K over that many blocks instead: blocks of 32 to 128 rows that read x once for all of them
    (the point of splitting), few warps on K."""
    tiles_x = -(-m // 8)
    if splits:
        knobs = ((1, 2), (2, 4), (1, 2, 4), (1, 2), splits)
    else:
        knobs = ((1, 2, 4), (1, 2, 4), (2, 4, 8, 16), (1, 2, 4), (1,))
    found = []
    for tiles_w, warps_n, warps_k, unroll, split in itertools.product(*knobs):
        if fused and tiles_w % 2:
            continue
        config = MmaConfig(tiles_w, tiles_x, warps_n, warps_k, unroll, fused, splits=split)
        if config.threads <= 512 and config.shared_floats * 4 <= SHARED_BYTES and config.words <= 160:
            found.append(config)
    return found


def _read_kernel(data, sink):
    """Stream ``data`` once (16-byte loads, 4 in flight per thread, consecutive threads on consecutive
    chunks), as the decode linear must: the read roofline of one launch of this size."""
    tid = cuda.grid(1)
    stride = cuda.gridsize(1)
    chunks = data.size // 8
    acc = uint32(0)
    for base in range(tid, chunks, 4 * stride):
        for u in range(4):
            v = load_words_stream(data, min(base + u * stride, chunks - 1) * 8)
            acc ^= v[0] ^ v[1] ^ v[2] ^ v[3]
    if acc == uint32(0x9E3779B9):
        sink[0] = 1


def _empty_kernel(sink):
    if cuda.grid(1) == 1 << 30:
        sink[0] = 1


def probes(bw: float) -> None:
    """The floors: a graph-launched empty kernel, and a pure read of each shape's weight bytes."""
    sink = cupy.zeros(1, np.float16)
    empty = compiled(_empty_kernel, "void(float16[::1])")
    t = time_graph([lambda: empty[132, 128, launch_stream()](sink)])
    print(f"empty kernel in a graph: {t * 1e6:.2f} us", flush=True)
    read = compiled(_read_kernel, "void(float16[::1], float16[::1])")
    sms = multiprocessors()
    for name, (n, k) in GEMM_SHAPES.items():
        nbytes = 2 * n * k
        ws = [rand((n * k,), scale=0.02) for _ in range(copies_needed(nbytes))]
        for blocks_per_sm, threads in ((4, 256), (8, 256), (4, 512), (16, 128)):
            calls = [lambda w=w: read[sms * blocks_per_sm, threads, launch_stream()](w, sink) for w in ws]
            t = time_graph(calls)
            print(f"read {name:<8} {nbytes / 1e6:7.1f} MB  {blocks_per_sm:2d}x{threads:<3d}/SM  {t * 1e6:7.1f} us"
                  f"  {nbytes / t / 1e9:5.0f} GB/s {100 * nbytes / t / bw:4.0f}%", flush=True)
        del ws


def resources() -> None:
    """Registers, local memory and mma count in SASS of every variant the launcher picks."""
    shapes = [(name, n, k, False) for name, (n, k) in GEMM_SHAPES.items()] + [("gate_up fused", 14336, 4096, True)]
    seen = set()
    for m in (1, 8, 16, 24, 32):
        for name, n, k, fused in shapes:
            config = gemm.mma_config(m, n, k, fused)
            if config in seen:
                continue
            seen.add(config)
            kernel = gemm.compiled_mma(config)
            try:
                sass = "".join(kernel.inspect_sass().values())  # one entry per signature
            except Exception as error:  # nvdisasm missing: the counts read 0
                print(f"no SASS ({type(error).__name__}: {error})"[:120])
                sass = ""
            print(f"{name:<14} M={m:<3} {label(config):<26} threads {config.threads:4d}  registers"
                  f" {kernel.get_regs_per_thread():3d}  local {kernel.get_local_mem_per_thread()} B  shared"
                  f" {kernel.get_shared_mem_per_block():5d} B  HMMA.16816.F32 x{sass.count('HMMA.16816.F32')}"
                  f"  LDG.E.128 x{sass.count('LDG.E.128')}", flush=True)


def label(config) -> str:
    if isinstance(config, str):
        return config
    split = f" s={config.splits}" if config.splits > 1 else ""
    return "tw={} tx={} wn={} wk={} u={}{}".format(config.tiles_w, config.tiles_x, config.warps_n, config.warps_k,
                                                  config.unroll, split)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--shapes", default=",".join(GEMM_SHAPES))
    parser.add_argument("--m", default="1,8,16,32")
    parser.add_argument("--fused", action="store_true", help="gate_up with the SiLU-mul epilogue")
    parser.add_argument("--budget", type=float, default=1e9, help="seconds; no new shape starts after them")
    parser.add_argument("--top", type=int, default=6)
    parser.add_argument("--probes", action="store_true", help="first time an empty kernel and pure weight reads")
    parser.add_argument("--resources", action="store_true", help="only print the chosen variants' resources")
    parser.add_argument("--splits", default="", help="time the variants splitting K over these block counts")
    args = parser.parse_args()
    if args.resources:
        resources()
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "gemm_sweep.jsonl", "a")
    bw = copy_bandwidth()
    print(f"{gpu_name()}  copy {bw / 1e9:.0f} GB/s", flush=True)
    if args.probes:
        probes(bw)
    start = time.time()
    for m, name in itertools.product([int(v) for v in args.m.split(",")], args.shapes.split(",")):
        if time.time() - start > args.budget:
            break
        n, k = GEMM_SHAPES[name]
        n_out = n // 2 if args.fused else n
        nbytes = 2 * (n * k + m * k + m * n_out)
        copies = copies_needed(nbytes)
        ws = [rand((n, k), scale=0.02) for _ in range(copies)]
        xs = [rand((m, k)) for _ in range(copies)]
        outs = [cupy.empty((m, n_out), np.float16) for _ in range(copies)]
        if args.fused:  # cuBLAS's product, then our silu_mul: the two are captured in different graphs
            inter = [cupy.empty((m, n), np.float16) for _ in range(copies)]
            t_peer = time_cublas(list(zip(xs, ws, inter))) + time_graph(
                [lambda i=i: OPS.silu_mul(inter[i], outs[i]) for i in range(copies)])
        else:
            t_peer = time_cublas(list(zip(xs, ws, outs)))
        chosen = [lambda i=i: gemm._launch(xs[i], ws[i], outs[i], None, None, args.fused) for i in range(copies)]
        cores = [lambda i=i: gemm._launch(xs[i], ws[i], outs[i], None, None, args.fused, mma=False)
                 for i in range(copies)]
        rows = [("cuBLAS", t_peer), ("launcher", time_graph(chosen)), ("cuda cores", time_graph(cores))]
        for config in candidates(m, args.fused, [int(v) for v in args.splits.split(",") if v]):
            calls = [
                lambda i=i, c=config: gemm.launch_mma(c, xs[i], ws[i], None, None, outs[i])
                for i in range(copies)
            ]
            try:
                rows.append((config, time_graph(calls, reps=20, rounds=5)))
            except Exception as error:  # a variant the card cannot launch (registers): skip it
                print(f"  {label(config)}: {type(error).__name__}: {str(error)[:80]}")
        rows.sort(key=lambda r: r[1])
        print(f"--- {name} M={m} {k}->{n_out}  cuBLAS {t_peer * 1e6:.1f} us  [{time.time() - start:.0f}s]")
        shown = rows[: args.top] + [r for r in rows[args.top :] if isinstance(r[0], str)]
        for config, t in shown:
            print(f"  {label(config):<28} {t * 1e6:8.1f} us {nbytes / t / 1e9:6.0f} GB/s {100 * nbytes / t / bw:4.0f}%"
                  f" {t_peer / t:5.2f}x")
        for config, t in rows:
            log.write(json.dumps({"shape": name, "m": m, "fused": args.fused, "us": t * 1e6, "gbps": nbytes / t / 1e9,
                                  "config": label(config)}) + "\n")
        log.flush()
        del ws, xs, outs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
