"""Kernel microbenchmarks on the GPU: time, GB/s or TFLOP/s, % of roofline, ratio to the peer.

Usage: ``python bench/kernels.py [--out DIR] [--only gemm,norm,...]``. Prints a table (GPU named),
writes ``kernels.json`` and a roofline chart ``kernels.png`` (when matplotlib is installed) to DIR,
then lists every kernel the run compiled with its registers, local memory (spills) and shared memory.
Peers: cuBLAS (torch.matmul on the same arrays, through a torch CUDA graph, weights rotated), torch
SDPA (through a torch CUDA graph); roofline: the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy  # noqa: E402
import numpy as np  # noqa: E402

from bench.provenance import commit  # noqa: E402
from bench.timing import (  # noqa: E402
    copies_needed, copy_bandwidth, gpu_name, time_cublas, time_graph, time_torch_graph,
)
from infinilm_nb.backend import get_backend  # noqa: E402
from infinilm_nb.kernels import common, reference  # noqa: E402
from infinilm_nb.kernels.intrinsics import load_f16x8, store_f16x8  # noqa: E402
from numba import cuda  # noqa: E402

OPS = get_backend("cuda").ops
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 14336, 128256
GEMM_SHAPES = {  # name: (N, K), Llama-3-8B
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HIDDEN),
    "gate_up": (2 * FFN, HIDDEN),
    "down": (HIDDEN, FFN),
    "lm_head": (VOCAB, HIDDEN),
}


@dataclass
class Row:
    kernel: str
    shape: str
    us: float
    rate: float  # GB/s or TFLOP/s
    unit: str
    roofline_pct: float | None
    peer: str
    peer_us: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.peer_us is None else self.peer_us / self.us


def rand(shape, dtype=np.float16, scale=1.0):
    """Random device values in ``dtype`` (uint16: bfloat16 bit patterns)."""
    values = cupy.random.standard_normal(shape, dtype=np.float32) * scale
    return reference.cast(values, reference.BF16) if np.dtype(dtype) == reference.BF16 else values.astype(dtype)


def gemm_operands(m: int, n: int, k: int) -> tuple[int, list[tuple[Any, Any, Any]]]:
    """The bytes a decode GEMM ``[m, k] x [k, n]`` moves, and enough fresh (x, weight, out) copies
    to rotate past the L2."""
    nbytes = 2 * (n * k + m * k + m * n)
    return nbytes, [(rand((m, k)), rand((n, k), scale=0.02), cupy.empty((m, n), np.float16))
                    for _ in range(copies_needed(nbytes))]


def linear_calls(operands: list[tuple[Any, Any, Any]]) -> list[Callable[[], None]]:
    """``OPS.linear`` on each (x, weight, out) of ``operands`` (``OPS`` as it is at call time)."""
    return [lambda x=x, w=w, out=out: OPS.linear(x, w, out) for x, w, out in operands]


def bench_gemm(copy_bw: float) -> list[Row]:
    rows = []
    for name, (n, k) in GEMM_SHAPES.items():
        for m in (1, 8, 16, 32):
            nbytes, operands = gemm_operands(m, n, k)
            t, tp = time_graph(linear_calls(operands)), time_cublas(operands)
            rows.append(Row(f"linear {name}", f"M={m} {k}->{n}", t * 1e6, nbytes / t / 1e9, "GB/s",
                            100 * nbytes / t / copy_bw, "cuBLAS", tp * 1e6))
            del operands
    return rows


def bench_fusion(copy_bw: float) -> list[Row]:
    """The gate-up projection with SwiGLU in its epilogue (one kernel, the [M, 2I] product never
    stored) against our linear then silu_mul; bytes = what the fused kernel must move."""
    rows = []
    n, k = GEMM_SHAPES["gate_up"]
    for m in (1, 8, 16, 32):
        nbytes = 2 * (n * k + m * k + m * n // 2)
        copies = copies_needed(nbytes)
        ws = [rand((n, k), scale=0.02) for _ in range(copies)]
        xs = [rand((m, k)) for _ in range(copies)]
        gate_up = cupy.empty((m, n), np.float16)
        out = cupy.empty((m, n // 2), np.float16)
        fused = [lambda i=i: OPS.linear_silu_mul(xs[i], ws[i], out) for i in range(copies)]
        apart = [lambda i=i: (OPS.linear(xs[i], ws[i], gate_up), OPS.silu_mul(gate_up, out)) for i in range(copies)]
        t, tp = time_graph(fused), time_graph(apart)
        rows.append(Row("gate_up+silu", f"M={m} {k}->2x{n // 2}", t * 1e6, nbytes / t / 1e9, "GB/s",
                        100 * nbytes / t / copy_bw, "unfused", tp * 1e6))
        del ws, xs
    rows += bench_rope_store_kv(copy_bw)
    return rows


def rope_cache() -> Any:
    """The Llama-3 RoPE table on the device (8192 positions), as the benches use it."""
    return cupy.asarray(reference.rope_cache(HEAD_DIM, 8192, 500000.0))


def rope_store_calls(tokens: int, dtype: Any, cos_sin: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    """RoPE + cache store of ``tokens`` tokens on fresh q/k/v views and caches: (fused, apart)."""
    q, k, v = qkv_views(tokens, dtype)
    blocks = tokens // BLOCK_SIZE + 1
    kc = cupy.empty((blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), dtype)
    vc = cupy.empty_like(kc)
    pos = cupy.arange(tokens, dtype=np.int32)
    slots = cupy.asarray(np.random.permutation(blocks * BLOCK_SIZE)[:tokens].astype(np.int32))
    return (lambda: OPS.rope_store_kv(q, k, v, pos, cos_sin, kc, vc, slots),
            lambda: (OPS.rope(q, k, pos, cos_sin), OPS.store_kv(k, v, kc, vc, slots)))


def rope_store_bytes(tokens: int) -> int:
    """q and k read and written, v read, k and v stored."""
    return 2 * tokens * HEAD_DIM * (2 * (HEADS + KV_HEADS) + KV_HEADS + 2 * KV_HEADS)


def bench_rope_store_kv(copy_bw: float) -> list[Row]:
    """RoPE and the K/V cache store in one kernel against rope then store_kv, at a decode step's
    token counts and a prefill's."""
    rows = []
    cos_sin = rope_cache()
    for tokens in (1, 64, 4096):
        nbytes = rope_store_bytes(tokens)
        cases = [rope_store_calls(tokens, np.float16, cos_sin) for _ in range(copies_needed(nbytes))]
        t, tp = time_graph([fused for fused, _ in cases]), time_graph([apart for _, apart in cases])
        rows.append(Row("rope+store_kv", f"T={tokens} (32+8+8)x128", t * 1e6, nbytes / t / 1e9, "GB/s",
                        100 * nbytes / t / copy_bw, "unfused", tp * 1e6))
    return rows


def qkv_views(tokens: int, dtype: Any = np.float16) -> tuple[Any, Any, Any]:
    """q ``[T, 32, 128]``, k and v ``[T, 8, 128]``: strided views into one random fused QKV output."""
    qkv = rand((tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM), dtype)
    q = qkv[:, : HEADS * HEAD_DIM].reshape(tokens, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].reshape(tokens, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].reshape(tokens, KV_HEADS, HEAD_DIM)
    return q, k, v


def elementwise_cases(tokens: int, cos_sin: Any) -> list[tuple[str, str, int, Callable[[Any], Callable[[], None]]]]:
    """(kernel, shape, bytes moved, make(dtype) -> call) of the bandwidth-bound ops at ``tokens`` x
    HIDDEN, each call on fresh random inputs."""
    h, act = HIDDEN, tokens * HIDDEN * 2

    def norm(dtype):
        x, w, out = rand((tokens, h), dtype), rand((h,), dtype), cupy.empty((tokens, h), dtype)
        return lambda: OPS.rms_norm(x, w, 1e-5, out)

    def add_norm(dtype):
        x, r, w = rand((tokens, h), dtype), rand((tokens, h), dtype), rand((h,), dtype)
        out = cupy.empty((tokens, h), dtype)
        return lambda: OPS.add_rms_norm(x, r, w, 1e-5, out)

    def rope(dtype):
        q, k, _ = qkv_views(tokens, dtype)
        pos = cupy.arange(tokens, dtype=np.int32)
        return lambda: OPS.rope(q, k, pos, cos_sin)

    def silu(dtype):
        x, out = rand((tokens, 2 * h), dtype), cupy.empty((tokens, h), dtype)
        return lambda: OPS.silu_mul(x, out)

    def store(dtype):
        k, v = rand((tokens, KV_HEADS, HEAD_DIM), dtype), rand((tokens, KV_HEADS, HEAD_DIM), dtype)
        kc = cupy.empty((tokens // 16 + 1, 16, KV_HEADS, HEAD_DIM), dtype)
        vc = cupy.empty_like(kc)
        slots = cupy.asarray(np.random.permutation(tokens).astype(np.int32))
        return lambda: OPS.store_kv(k, v, kc, vc, slots)

    def embed(dtype):
        w = rand((VOCAB, h), dtype, scale=0.02)
        ids = cupy.asarray(np.random.randint(0, VOCAB, tokens).astype(np.int32))
        out = cupy.empty((tokens, h), dtype)
        return lambda: OPS.embedding(ids, w, out)

    return [
        ("rms_norm", f"{tokens}x{h}", 2 * act, norm),
        ("add_rms_norm", f"{tokens}x{h}", 4 * act, add_norm),
        ("rope", f"{tokens}x(32+8)x128", 2 * 2 * tokens * (HEADS + KV_HEADS) * HEAD_DIM, rope),
        ("silu_mul", f"{tokens}x{h}", 3 * act, silu),
        ("store_kv", f"{tokens}x8x128", 2 * 2 * 2 * tokens * KV_HEADS * HEAD_DIM, store),
        ("embedding", f"{tokens}x{h}", 2 * act, embed),
    ]


# (kernel, rows, temperature, top_p) of the sampler's rows: greedy, and top-p (which searches its cut-off),
# at batch 32 and 1
SAMPLER_CASES = (("sample greedy", 32, 0.0, 1.0), ("sample top_p=0.9", 32, 0.8, 0.9), ("sample greedy", 1, 0.0, 1.0),
                 ("sample top_p=0.9", 1, 0.8, 0.9))


def sampler_call(dtype: Any, temperature: float, top_p: float, rows: int = 32) -> Callable[[], None]:
    """The sampler on fresh ``[rows, VOCAB]`` logits of ``dtype``, every row with these settings."""
    logits = rand((rows, VOCAB), dtype)
    params = (cupy.full(rows, temperature, np.float32), cupy.zeros(rows, np.int32),
              cupy.full(rows, top_p, np.float32), cupy.arange(rows, dtype=np.uint64))
    out = cupy.empty(rows, np.int32)
    return lambda: OPS.sample(logits, *params, out)


def _copy_kernel(src, dst):
    """``dst = src`` in one launch: 16-byte loads, four in flight per thread before their stores,
    consecutive threads on consecutive chunks."""
    tid = cuda.grid(1)
    stride = cuda.gridsize(1)
    chunks = src.size // 8
    last = chunks - 1
    for base in range(tid, chunks, 4 * stride):
        v0 = load_f16x8(src, base * 8)
        v1 = load_f16x8(src, min(base + stride, last) * 8)
        v2 = load_f16x8(src, min(base + 2 * stride, last) * 8)
        v3 = load_f16x8(src, min(base + 3 * stride, last) * 8)
        store_f16x8(dst, base * 8, v0)
        if base + stride < chunks:
            store_f16x8(dst, (base + stride) * 8, v1)
        if base + 2 * stride < chunks:
            store_f16x8(dst, (base + 2 * stride) * 8, v2)
        if base + 3 * stride < chunks:
            store_f16x8(dst, (base + 3 * stride) * 8, v3)


def copy_call(nbytes: int) -> Callable[[], None]:
    """A bare copy moving ``nbytes`` (half read, half written) in one launch of 8 blocks of 256
    threads an SM: the ceiling of a bandwidth-bound kernel of that size, beside the elementwise ops."""
    kernel = common.compiled(_copy_kernel, "void(float16[::1], float16[::1])")
    src, dst = rand((nbytes // 4,)), cupy.empty(nbytes // 4, np.float16)
    blocks = 8 * common.multiprocessors()
    return lambda: kernel[blocks, 256, common.launch_stream()](src, dst)


def bench_elementwise(copy_bw: float, tokens: int = 4096) -> list[Row]:
    """The bandwidth-bound ops at ``tokens`` x HIDDEN, each beside a bare one-launch copy of the same
    bytes (the launch's ceiling at that size), and the sampler."""
    rows = []

    def add(kernel: str, shape: str, nbytes: int, make: Callable[[], Callable[[], None]]):
        calls = [make() for _ in range(copies_needed(nbytes))]
        t = time_graph(calls)
        rows.append(Row(kernel, shape, t * 1e6, nbytes / t / 1e9, "GB/s", 100 * nbytes / t / copy_bw, "copy", None))

    for kernel, shape, nbytes, make in elementwise_cases(tokens, rope_cache()):
        add(kernel, shape, nbytes, lambda make=make: make(np.float16))
        add("copy kernel", f"{nbytes / 2e6:.1f} MB in, out", nbytes, lambda nbytes=nbytes: copy_call(nbytes))
    for kernel, batch, temperature, top_p in SAMPLER_CASES:
        add(kernel, f"{batch}x{VOCAB} f32", batch * VOCAB * 4,
            lambda case=(temperature, top_p, batch): sampler_call(np.float32, *case))
    return rows


def bench_bfloat16(copy_bw: float, tokens: int = 4096) -> list[Row]:
    """The bfloat16 kernels (CUDA-core paths) against the same kernels in float16, in the same run:
    the elementwise ops at 4096 x 4096 (store_kv aside: it copies bfloat16 as float16 bits), RoPE +
    cache store, the decode linear at M = 1 (float16 there runs on tensor cores), split decode
    attention at batch 16, 8K context, and the greedy sampler. Bytes as the float16 rows count them."""
    from infinilm_nb.kernels.attention import AttentionWorkspace

    rows = []
    cos_sin = rope_cache()

    def compare(kernel: str, shape: str, nbytes: int, make: Callable[[Any], Callable[[], None]]) -> None:
        times = {}
        for dtype in (reference.BF16, np.float16):
            times[np.dtype(dtype).name] = time_graph([make(dtype) for _ in range(copies_needed(nbytes))])
        t = times["uint16"]
        rows.append(Row(f"bf16 {kernel}", shape, t * 1e6, nbytes / t / 1e9, "GB/s", 100 * nbytes / t / copy_bw,
                        "float16", times["float16"] * 1e6))

    for kernel, shape, nbytes, make in elementwise_cases(tokens, cos_sin):
        if kernel != "store_kv":
            compare(kernel, shape, nbytes, make)
    compare("rope+store_kv", f"T={tokens} (32+8+8)x128", rope_store_bytes(tokens),
            lambda dtype: rope_store_calls(tokens, dtype, cos_sin)[0])
    for name in ("qkv", "gate_up", "down"):
        n, k = GEMM_SHAPES[name]

        def linear(dtype, n=n, k=k):
            x, w, out = rand((1, k), dtype), rand((n, k), dtype, scale=0.02), cupy.empty((1, n), dtype)
            return lambda: OPS.linear(x, w, out)

        compare(f"linear {name}", f"M=1 {k}->{n}", 2 * (n * k + k + n), linear)
    batch, length = 16, 8192
    blocks = batch * length // BLOCK_SIZE
    tables = cupy.asarray(np.random.permutation(blocks).reshape(batch, -1).astype(np.int32))
    lens, starts = cupy.full(batch, length, np.int32), cupy.arange(batch + 1, dtype=np.int32)
    workspace = AttentionWorkspace.allocate(cupy, batch, HEADS, HEAD_DIM, length)

    def attention(dtype):
        kc, vc = (rand((blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM), dtype) for _ in range(2))
        q, out = rand((batch, HEADS, HEAD_DIM), dtype), cupy.empty((batch, HEADS, HEAD_DIM), dtype)
        return lambda: OPS.paged_attention(q, kc, vc, tables, lens, starts, HEAD_DIM**-0.5, out, workspace=workspace)

    compare("paged_attn split", f"B={batch} L={length}", 2 * 2 * batch * length * KV_HEADS * HEAD_DIM, attention)
    compare("sample greedy", f"32x{VOCAB}", 32 * VOCAB * 2, lambda dtype: sampler_call(dtype, 0.0, 1.0))
    return rows


ATTENTION_CASES = ((1, 8192), (16, 1024), (16, 8192), (32, 2048), (64, 2048))  # (batch, context)
BLOCK_SIZE = 16


def _sdpa_decode(q: Any, k: Any, v: Any) -> Callable[[], None]:
    """torch SDPA of one query token per sequence over contiguous ``[B, Hk, L, D]`` K and V (GQA)."""
    import torch
    import torch.nn.functional as F

    try:
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    except (TypeError, RuntimeError):  # older torch: repeat the KV heads (more bytes, same answer)
        group = q.shape[1] // k.shape[1]
        k, v = (torch.repeat_interleave(a, group, dim=1) for a in (k, v))
        return lambda: F.scaled_dot_product_attention(q, k, v)


class DecodeAttentionCase(NamedTuple):
    """One decode attention step of the benches: ``batch`` sequences of ``length`` keys, one query
    token each, in a paged cache of block BLOCK_SIZE (K and V copies enough to rotate past the L2,
    block tables a random permutation)."""

    nbytes: int  # the K and V bytes one call reads
    caches: list  # (k_cache, v_cache) copies
    tables: Any
    context_lens: Any
    query_start: Any
    q: Any
    out: Any
    workspace: Any  # sized as the runtime sizes it: fewer tokens than that may split finer in the same memory

    @classmethod
    def make(cls, batch: int, length: int) -> "DecodeAttentionCase":
        from infinilm_nb.kernels.attention import AttentionWorkspace
        from infinilm_nb.runtime.llama import SPLIT_ATTENTION_TOKENS

        nbytes = 2 * 2 * batch * length * KV_HEADS * HEAD_DIM
        blocks = batch * length // BLOCK_SIZE
        shape = (blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        return cls(
            nbytes, [(rand(shape), rand(shape)) for _ in range(copies_needed(nbytes))],
            cupy.asarray(np.random.permutation(blocks).reshape(batch, -1).astype(np.int32)),
            cupy.full(batch, length, np.int32), cupy.arange(batch + 1, dtype=np.int32),
            rand((batch, HEADS, HEAD_DIM)), cupy.empty((batch, HEADS, HEAD_DIM), np.float16),
            AttentionWorkspace.allocate(cupy, max(batch, SPLIT_ATTENTION_TOKENS), HEADS, HEAD_DIM, length),
        )

    def calls(self, workspace: Any) -> list[Callable[[], None]]:
        """``paged_attention`` over each cache copy, with ``workspace`` (None: unsplit)."""
        return [lambda kc=kc, vc=vc: OPS.paged_attention(self.q, kc, vc, self.tables, self.context_lens,
                                                         self.query_start, HEAD_DIM**-0.5, self.out, workspace=workspace)
                for kc, vc in self.caches]


def bench_attention(copy_bw: float) -> list[Row]:
    """Paged decode attention (one query token per sequence, block 16) against torch SDPA on the
    same K and V laid out contiguously; bytes = the K and V bytes read."""
    import torch

    from infinilm_nb.kernels import attention_mma
    from infinilm_nb.kernels.common import TENSOR_CORES

    enabled = attention_mma.ENABLED

    rows = []
    for batch, length in ATTENTION_CASES:
        case = DecodeAttentionCase.make(batch, length)
        nbytes, caches, tables, q, out = case.nbytes, case.caches, case.tables, case.q, case.out
        # the same keys and values, contiguous per sequence and head: [B, Hk, L, D]
        contiguous = [
            tuple(torch.from_dlpack(c[tables].reshape(batch, length, KV_HEADS, HEAD_DIM).transpose(0, 2, 1, 3).copy())
                  for c in pair)
            for pair in caches
        ]
        q_t = torch.from_dlpack(q).reshape(batch, HEADS, 1, HEAD_DIM)
        sdpa = [_sdpa_decode(q_t, k, v) for k, v in contiguous]
        peer = time_torch_graph(sdpa)
        want = cupy.from_dlpack(sdpa[0]().reshape(batch, HEADS, HEAD_DIM).float())
        del contiguous, sdpa
        # split as the runtime dispatches it; the CUDA-core kernel whole and split; the tensor-core
        # kernel (attention_mma) split on every shape
        variants = ((" split", case.workspace, enabled, True), (" cuda-core", None, False, True),
                    (" split cuda-core", case.workspace, False, True))
        variants += ((" split mma", case.workspace, True, False),) * TENSOR_CORES
        for label, ws, mma, within_one_wave in variants:
            attention_mma.ENABLED, attention_mma.WITHIN_ONE_WAVE = mma, within_one_wave
            calls = case.calls(ws)
            calls[0]()
            err = float(cupy.linalg.norm(out.astype(np.float32) - want) / cupy.linalg.norm(want))
            if err > 2e-3:
                print(f"paged_attn{label} B={batch} L={length}: relative error {err:.2e} against SDPA")
            t = time_graph(calls)
            rows.append(Row(f"paged_attn{label}", f"B={batch} L={length}", t * 1e6, nbytes / t / 1e9, "GB/s",
                            100 * nbytes / t / copy_bw, "SDPA", peer * 1e6))
        attention_mma.ENABLED, attention_mma.WITHIN_ONE_WAVE = enabled, True
        del case, caches
    return rows


PREFILL_M = (512, 2048, 8192)
PREFILL_LENGTHS = (2048, 8192)


def bench_prefill(copy_bw: float) -> list[Row]:
    """Prefill on tensor cores, in TFLOP/s against the peer in the same run.

    The linear at M = 512 / 2048 / 8192 on the Llama-3-8B shapes against cuBLAS fp16 (through
    torch.matmul in a CUDA graph), as dispatched by ``linear`` and for each tile variant of ``gemm_tc`` (to tune
    ``tc_config``); causal attention of one prompt of 2K / 8K tokens (32 q / 8 kv heads, d = 128,
    paged, block 16) against torch SDPA (``is_causal``, GQA), and against our CUDA-core kernel.
    Attention FLOPs count the causal half: ``2 * Hq * D * L^2``.
    """
    from infinilm_nb.kernels import gemm, gemm_tc, wgmma

    # 32-column K tiles: the 48 KB static rings (dispatched before the fifth session), deeper ones in
    # dynamic shared memory, a 64 x 64 warp tile (half the shared-memory reads per mma of the 64 x 32
    # ones) and 64 x 64 blocks; 64-column K tiles with a fourth stage (128 KB: one block an SM); on a
    # Hopper, two warpgroups on wgmma over 128 x 128 tiles, waiting for each K tile's products or
    # (4 stages) leaving them running over the next tile's barrier, and over 128 x 256 (m64n256k16)
    deep = (gemm_tc.TcConfig(), gemm_tc.TcConfig(block_m=64, warps_m=1, warps_n=4, stages=4),
            gemm_tc.TcConfig(stages=6), gemm_tc.TcConfig(block_m=128, block_n=256, warps_m=2, warps_n=4, stages=4),
            gemm_tc.TcConfig(block_m=64, block_n=64, warps_m=2, warps_n=2, stages=6),
            gemm_tc.TcConfig(block_k=64, stages=4))
    if wgmma.supported():  # wgmma from the swizzled tiles: sm_90 only
        on_wgmma = dict(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True)
        deep += (gemm_tc.TcConfig(**on_wgmma), gemm_tc.TcConfig(**on_wgmma, stages=4, in_flight=1),
                 gemm_tc.TcConfig(**{**on_wgmma, "block_n": 256}))
    rows = []
    for name in ("qkv", "o", "gate_up", "down"):
        n, k = GEMM_SHAPES[name]
        for m in PREFILL_M:
            flops = 2 * m * n * k
            x, w, out = rand((m, k)), rand((n, k), scale=k**-0.5), cupy.empty((m, n), np.float16)
            peer = time_cublas([(x, w, out)], reps=10)
            want = out.astype(np.float32)
            variants = {"": lambda: OPS.linear(x, w, out)}
            for config in (gemm_tc.tc_config(64), gemm_tc.tc_config(1 << 30), *deep):
                variants[f" {config.label}"] = lambda config=config: gemm.launch_tc(config, x, w, None, None, out)
            for label, call in variants.items():
                out.fill(np.nan)
                call()
                err = float(cupy.linalg.norm(out.astype(np.float32) - want) / cupy.linalg.norm(want))
                if err > 2e-3:
                    print(f"linear {name} M={m}{label}: relative error {err:.2e} against cuBLAS")
                t = time_graph([call], reps=10)
                rows.append(Row(f"prefill {name}", f"M={m} {k}->{n}{label}", t * 1e6, flops / t / 1e12, "TFLOP/s",
                                None, "cuBLAS", peer * 1e6))
            del x, w, out, want
    rows += _bench_prefill_attention()
    return rows


def _sdpa_prefill(q: Any, k: Any, v: Any) -> Callable[[], Any]:
    """torch SDPA, causal, over ``[1, H, L, D]`` q and ``[1, Hk, L, D]`` K and V (GQA)."""
    import torch
    import torch.nn.functional as F

    try:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    except (TypeError, RuntimeError):  # older torch: repeat the KV heads
        group = q.shape[1] // k.shape[1]
        k, v = (torch.repeat_interleave(a, group, dim=1) for a in (k, v))
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _bench_prefill_attention() -> list[Row]:
    import torch

    from infinilm_nb.kernels import attention_prefill, wgmma

    rows = []
    for length in PREFILL_LENGTHS:
        flops = 2 * HEADS * HEAD_DIM * length * length
        blocks = length // BLOCK_SIZE
        k_cache = rand((blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM))
        v_cache = rand((blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM))
        tables = cupy.asarray(np.random.permutation(blocks).reshape(1, -1).astype(np.int32))
        context_lens = cupy.full(1, length, np.int32)
        query_start = cupy.asarray(np.array([0, length], np.int32))
        q, out = rand((length, HEADS, HEAD_DIM)), cupy.empty((length, HEADS, HEAD_DIM), np.float16)

        def heads_first(a):  # [L, H, D] -> torch [1, H, L, D], contiguous
            return torch.from_dlpack(cupy.ascontiguousarray(a.transpose(1, 0, 2))).unsqueeze(0)

        k_rows, v_rows = (c[tables[0]].reshape(length, KV_HEADS, HEAD_DIM) for c in (k_cache, v_cache))
        sdpa = _sdpa_prefill(heads_first(q), heads_first(k_rows), heads_first(v_rows))
        peer = time_torch_graph([sdpa], reps=10)
        want = cupy.from_dlpack(sdpa()[0].transpose(0, 1).float().contiguous())
        # as dispatched (wgmma with 128-query blocks on a Hopper); there also mma.sync (dispatched
        # elsewhere) and wgmma with 64-query blocks; CUDA cores
        as_dispatched = attention_prefill.variant
        dispatched = as_dispatched()
        variants = (("", length, dispatched), (" cuda-core", None, dispatched))
        if wgmma.supported():
            variants += ((" mma.sync", length, (attention_prefill.KV_STAGES, attention_prefill.QUERY_ROWS, False)),
                         (" q64 wgmma", length, (attention_prefill.KV_STAGES, 64, True)))
        for label, hint, variant in variants:
            def call(hint=hint):
                OPS.paged_attention(q, k_cache, v_cache, tables, context_lens, query_start, HEAD_DIM**-0.5, out,
                                    max_query_len=hint)
            attention_prefill.variant = lambda variant=variant: variant
            out.fill(np.nan)
            call()
            err = float(cupy.linalg.norm(out.astype(np.float32) - want) / cupy.linalg.norm(want))
            if err > 2e-3:
                print(f"prefill_attn{label} L={length}: relative error {err:.2e} against SDPA")
            t = time_graph([call], reps=10 if hint else 2, rounds=7 if hint else 3)
            attention_prefill.variant = as_dispatched
            rows.append(Row(f"prefill_attn{label}", f"L={length} {HEADS}/{KV_HEADS}x{HEAD_DIM}", t * 1e6,
                            flops / t / 1e12, "TFLOP/s", None, "SDPA", peer * 1e6))
        del k_cache, v_cache, k_rows, v_rows, sdpa
    return rows


SUITES = {
    "gemm": bench_gemm, "fusion": bench_fusion, "elementwise": bench_elementwise, "attention": bench_attention,
    "prefill": bench_prefill, "bfloat16": bench_bfloat16,
}


def print_table(rows: list[Row], title: str) -> None:
    print(title)
    print(f"{'kernel':<16} {'shape':<24} {'us':>9} {'rate':>10} {'% roof':>7} {'peer':>7} {'ratio':>6}")
    for r in rows:
        pct = f"{r.roofline_pct:.0f}%" if r.roofline_pct is not None else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        print(f"{r.kernel:<16} {r.shape:<24} {r.us:>9.1f} {r.rate:>7.0f} {r.unit[:2]:<2} {pct:>7} {r.peer:>7} {ratio:>6}")


def plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no chart (pip install 'infinilm-nb[bench]')")
        return
    gb = [r for r in rows if r.unit == "GB/s"]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(gb) + 1.5))
    labels = [f"{r.kernel} {r.shape}" for r in gb]
    ax.barh(labels, [r.roofline_pct for r in gb], color="tab:blue")
    ax.axvline(100, color="black", lw=1)
    ax.axvline(85, color="tab:red", lw=1, ls="--")
    ax.set_xlabel("% of measured copy bandwidth")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def kernel_resources() -> list[dict[str, Any]]:
    """Registers per thread, local memory per thread (non-zero means spills or a local array) and
    static shared memory of every kernel compiled so far, one row per (kernel, signature)."""
    rows = []
    for (pyfunc, signature), kernel in sorted(common._compiled.items(), key=lambda item: item[0][0].__qualname__):
        rows.append({
            "kernel": f"{pyfunc.__module__.rsplit('.', 1)[-1]}.{pyfunc.__qualname__}",
            # float16 first: the mma decode attention takes q as its float16 bits (uint16)
            "dtype": "float16" if "float16" in signature else "bfloat16" if "uint16" in signature else "float32",
            "registers": kernel.get_regs_per_thread(),
            "local_bytes": kernel.get_local_mem_per_thread(),
            "shared_bytes": kernel.get_shared_mem_per_block(),
        })
    return rows


def print_resources(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'kernel':<48} {'dtype':<8} {'regs':>4} {'local B':>7} {'shared B':>8}")
    for r in rows:
        print(f"{r['kernel']:<48} {r['dtype']:<8} {r['registers']:>4} {r['local_bytes']:>7} {r['shared_bytes']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated: " + ", ".join(SUITES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Each kernel alone, as its peer runs: a graph of one kernel repeated would otherwise overlap each
    # launch with the one before (programmatic dependent launch), which bench/decode.py --ablate measures.
    common.PDL = False
    bw = copy_bandwidth()
    title = f"{gpu_name()}  {datetime.date.today()}  commit {commit()}  copy {bw / 1e9:.0f} GB/s (read+write)"
    rows: list[Row] = []
    failed = []
    for name in args.only.split(","):
        try:
            rows += SUITES[name](bw)
        except Exception:  # the other suites' rows still get written and printed
            traceback.print_exc()
            failed.append(name)
    resources = kernel_resources()
    (args.out / "kernels.json").write_text(json.dumps(
        {"gpu": gpu_name(), "date": str(datetime.date.today()), "commit": commit(), "copy_gbps": bw / 1e9,
         "rows": [asdict(r) | {"ratio": r.ratio} for r in rows], "resources": resources}, indent=1))
    plot(rows, args.out / "kernels.png", title)
    print_resources(resources)
    print_table(rows, title)
    if failed:
        print(f"suites that failed (tracebacks above): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
