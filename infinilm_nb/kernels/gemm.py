"""The fused linear ``out = x @ weight.T (+ bias) (+ residual)`` on CUDA cores, two kernels by M.

* Decode (``M <= DECODE_MAX_M``): memory-bound, so each weight load serves many rows of ``x``. A
  block of up to ``DECODE_THREADS`` threads owns ``rows`` consecutive output rows; its threads
  stride K in 16-byte chunks of ``weight`` (8 float16 / 4 float32 through :mod:`.intrinsics`) and
  use every chunk for a group of up to ``group`` rows of ``x``, keeping ``group * rows`` float32
  partial sums in registers. The block then adds up the partial sums through shared memory in a
  fixed order (deterministic, no atomics). M larger than the group loops over groups; the block's
  slice of ``weight`` is then re-read, mostly from L2. Group sizes are compile-time constants
  (one kernel per size in ``DECODE_GROUPS``) because the partial sums only stay in registers when
  NVVM can fully unroll the loops over them.
  The threshold ``DECODE_MAX_M`` is an estimate to tune on the GPU: at M = 32 four passes over the
  weight slices still cost less than the tiled kernel's FMAs on CUDA cores.
* Tiled (larger M): ``TILE_M x TILE_N`` output tiles staged through shared memory ``TILE_K`` at a
  time (as float32), 128 threads each computing an 8 x 4 micro-tile, strided so that a warp's
  shared reads and output writes are consecutive.

Both kernels read ``x`` and ``weight`` with 16-byte loads when K is a multiple of the vector width
and both data pointers are 16-byte aligned, and with plain element loads otherwise. Kernels see
flat 1-D views, so an element is addressed as ``row * K + k``; rows past M or N are clamped to the
last row for loading and never stored.

bfloat16 (uint16 bit patterns, see :mod:`.vector`) builds the same kernels with loads that widen
to float32 (8 per 16-byte load, like float16) and stores that round, so the float32 arithmetic is
unchanged.

On the GPU, float16 operands with K % 8 == 0 and 16-byte aligned x and weight run on tensor cores
instead (:func:`_launch`): :mod:`.gemm_mma` up to ``MMA_MAX_M`` rows (decode), :mod:`.gemm_tc` above
(prefill). Those are float16 only; bfloat16 stays on the CUDA-core kernels.

``linear_silu_mul`` is the gate-up projection with SwiGLU in the epilogue: every kernel has a
``fused`` variant whose block loads gate row n with up row n + N and writes ``silu(gate) * up``, so
the ``[M, 2I]`` product never goes to memory.

Both take ``norm_eps``: the product is then of the RMS-normalised rows of x, ``x / sqrt(mean(x^2) +
eps)``, the RMSNorm that precedes QKV and gate-up with its weight folded into the GEMM's weight
(:func:`infinilm_nb.runtime.llama.fold_norm_weights`). The tensor-core decode kernel normalises inside its loop
(:mod:`.gemm_mma`), so the step runs no RMSNorm kernel; every other path writes the normalised rows
to ``normed`` with :func:`.norm.rms_norm` (unit weight) and multiplies those.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from numba import cuda, float32

from .common import (
    BFLOAT16, TENSOR_CORES, WITH_BFLOAT16, cdiv, check_array, check_same_dtype, compiled, kept, launch,
    numba_type,
)
from . import gemm_tc, norm, reference, rope, wgmma
from .gemm_mma import SHARED_BYTES as MMA_SHARED_BYTES, MmaConfig, mma_kernel, silu
from .gemm_tc import TcConfig, tc_config, tc_kernel
from .intrinsics import VECTOR_WIDTH, aligned16, as_f32, await_previous_kernels
from .vector import is_bf16, loader, to_stored

WARP = 32

# float16 decode with K % 8 == 0 and 16-byte aligned operands runs on tensor cores (:mod:`.gemm_mma`)
# while common.TENSOR_CORES is on (the default on a GPU); the simulator cannot run inline PTX, so it
# keeps the kernels below.
USE_MMA = TENSOR_CORES
# A norm_eps linear on the tensor-core decode path normalises x inside the GEMM (gemm_mma); off, it
# runs the RMSNorm kernel first like every other path (bench/ablation.py times the step both ways).
NORM_IN_GEMM = True
# linear_rope_store_kv on the tensor-core decode path does RoPE and the cache store in the GEMM's
# epilogue (gemm_mma); off, or on any other path, the GEMM is followed by the rope_store_kv kernel.
ROPE_IN_GEMM = True
MMA_MAX_M = 64  # batch-64 decode: gemm_tc's 64-row tiles leave o_proj and down 32 blocks
WIDE_N = 16384  # weight rows from which the wide-output variants pay (gate-up, lm_head)
LONG_K = 8192  # K from which fewer, longer K slices pay (down)

DECODE_MAX_M = 32
DECODE_GROUPS = (1, 2, 4, 8)
# Output rows per decode block, by group size. NVVM 12.9 fully unrolls the per-chunk loops only
# while group * rows * 8 stays about <= 128 (measured in PTX); past that the partial sums spill
# to local memory.
DECODE_ROWS = {1: 4, 2: 4, 4: 4, 8: 2}
DECODE_THREADS = 128  # at most; fewer when K is short
PARTIAL_COLUMNS = DECODE_THREADS + 1  # one per thread, plus a pad against bank conflicts

TILE_M, TILE_N, TILE_K = 64, 64, 16  # TILE_M == TILE_N: one load index serves both tiles
TILE_THREADS = 128  # 16 threads along N x 8 along M
THREADS_N, THREADS_M = 16, 8
MICRO_M, MICRO_N = TILE_M // THREADS_M, TILE_N // THREADS_N  # 8 x 4 outputs per thread
TILE_PAD = 2  # shared row padding that makes the transposed tile stores bank-conflict free
X_TILE = (TILE_K, TILE_M + TILE_PAD)  # shared tiles, transposed: x_tile[k, m], w_tile[k, n]
W_TILE = (TILE_K, TILE_N + TILE_PAD)
MICRO = MICRO_M * MICRO_N


@lru_cache(maxsize=None)
def _decode_kernel(group: int, vec: int, fused: bool = False, bf16: bool = False) -> Callable:
    """The decode kernel taking rows of x ``group`` at a time, loading ``vec`` elements at a time.

    ``fused``: weight is ``[gate | up]`` (2N rows); half of a block's rows are gate rows, the other
    half the matching up rows, and it writes ``silu(gate) * up``. ``bf16``: the arrays hold
    bfloat16 bits.
    """
    rows = DECODE_ROWS[group]
    outs = rows // 2 if fused else rows  # output columns per block
    sums = group * rows
    chunk_values = rows * vec  # numba needs local array sizes as plain constants, not expressions
    load = loader(vec, bf16)
    stored = to_stored(bf16)

    def kernel(x, weight, bias, residual, out, M, N, K, has_bias, has_residual):
        await_previous_kernels()
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        n0 = cuda.blockIdx.x * outs
        acc = cuda.local.array(sums, float32)  # acc[g * rows + r]: x row m0 + g, output row n0 + r
        w = cuda.local.array(chunk_values, float32)
        partial = cuda.shared.array((sums, PARTIAL_COLUMNS), float32)
        # Groups after the first re-read this block's rows of weight, mostly from L2.
        for m0 in range(0, M, group):
            ms = min(group, M - m0)
            for i in range(sums):
                acc[i] = 0
            for chunk in range(tid, K // vec, threads):
                k = chunk * vec
                for r in range(rows):
                    # rows past N (last block) re-read row N - 1; their sums are never stored
                    row = min(n0 + r % outs, N - 1) + (N if r >= outs else 0)
                    wv = load(weight, row * K + k)
                    for j in range(vec):
                        w[r * vec + j] = float32(wv[j])
                for g in range(group):
                    if g < ms:
                        xv = load(x, (m0 + g) * K + k)
                        for j in range(vec):
                            xj = float32(xv[j])
                            for r in range(rows):
                                acc[g * rows + r] += w[r * vec + j] * xj

            # Thread t's partial sum i goes to column t of row i; then thread i adds up row i. In a
            # fixed order, so results do not depend on timing; the pad spreads those reads over the banks.
            for i in range(sums):
                partial[i, tid] = acc[i]
            cuda.syncthreads()
            if tid < ms * outs:
                g = tid // outs
                m = m0 + g
                i = g * rows + tid - g * outs
                n = n0 + tid - g * outs
                if n < N:
                    total = float32(0)
                    for t in range(threads):
                        total += partial[i, t]
                    if fused:
                        up = float32(0)
                        for t in range(threads):
                            up += partial[i + outs, t]
                        total = silu(total) * up
                    if has_bias:
                        total += as_f32(bias[n])
                    if has_residual:
                        total += as_f32(residual[m * N + n])
                    out[m * N + n] = stored(total)
            cuda.syncthreads()  # before the next group overwrites partial

    return kernel


@lru_cache(maxsize=None)
def _tiled_kernel(vec: int, fused: bool = False, bf16: bool = False) -> Callable:
    """The tiled kernel, loading ``vec`` elements of x and weight at a time.

    ``fused``: a block's 64 weight rows are 32 gate rows and their 32 up rows; thread column ``j``
    (gate) pairs with column ``j + MICRO_N / 2`` (up), 32 columns on. ``bf16``: the arrays hold
    bfloat16 bits.
    """
    load = loader(vec, bf16)
    stored = to_stored(bf16)
    outs = TILE_N // 2 if fused else TILE_N  # output columns per block
    micro_out = MICRO_N // 2 if fused else MICRO_N
    loads = TILE_M * TILE_K // (TILE_THREADS * vec)  # loads per thread per operand and K step

    def kernel(x, weight, bias, residual, out, M, N, K, has_bias, has_residual):
        await_previous_kernels()
        tid = cuda.threadIdx.x
        tn = tid % THREADS_N
        tm = tid // THREADS_N
        m0 = cuda.blockIdx.y * TILE_M
        n0 = cuda.blockIdx.x * outs
        xs = cuda.shared.array(X_TILE, float32)
        ws = cuda.shared.array(W_TILE, float32)
        acc = cuda.local.array(MICRO, float32)
        a = cuda.local.array(MICRO_M, float32)
        b = cuda.local.array(MICRO_N, float32)
        for i in range(MICRO):
            acc[i] = 0

        for k0 in range(0, K, TILE_K):
            for step in range(loads):
                e = (step * TILE_THREADS + tid) * vec
                row = e // TILE_K
                kk = e - row * TILE_K
                # vec divides K, so a chunk is wholly inside K or wholly past it; loads past an edge
                # are clamped in bounds and their values replaced by zeros
                inside = k0 + kk < K
                k = min(k0 + kk, K - vec)
                xv = load(x, min(m0 + row, M - 1) * K + k)
                w_row = min(n0 + row % outs, N - 1) + (N if row >= outs else 0)
                wv = load(weight, w_row * K + k)
                for j in range(vec):
                    xs[kk + j, row] = float32(xv[j]) if inside else float32(0)
                    ws[kk + j, row] = float32(wv[j]) if inside else float32(0)
            cuda.syncthreads()
            for kk in range(TILE_K):
                for i in range(MICRO_M):
                    a[i] = xs[kk, tm + i * THREADS_M]
                for j in range(MICRO_N):
                    b[j] = ws[kk, tn + j * THREADS_N]
                for i in range(MICRO_M):
                    for j in range(MICRO_N):
                        acc[i * MICRO_N + j] += a[i] * b[j]
            cuda.syncthreads()

        for j in range(micro_out):
            n = n0 + tn + j * THREADS_N
            b[j] = as_f32(bias[n]) if has_bias and n < N else float32(0)
        for i in range(MICRO_M):
            m = m0 + tm + i * THREADS_M
            for j in range(micro_out):
                n = n0 + tn + j * THREADS_N
                if m < M and n < N:
                    total = acc[i * MICRO_N + j] + b[j]
                    if fused:
                        total = silu(total) * acc[i * MICRO_N + j + micro_out]
                    if has_residual:
                        total += as_f32(residual[m * N + n])
                    out[m * N + n] = stored(total)

    return kernel


def kernel_signature(dtype: Any) -> str:
    """The signature both kernels are compiled with: flat x, weight, bias, residual, out; M, N, K; flags."""
    array = f"{numba_type(dtype)}[::1]"
    return f"void({array}, {array}, {array}, {array}, {array}, int64, int64, int64, boolean, boolean)"


def _group(m: int) -> int:
    """The decode group size for M rows: the smallest that holds them all, else the largest."""
    return next((g for g in DECODE_GROUPS if m <= g), DECODE_GROUPS[-1])


def mma_signature(config: MmaConfig) -> str:
    """The signature of tensor-core decode variant ``config``: :func:`kernel_signature` (float16), the
    norm's eps, the split-K workspace and arrival counts; for a ``config.rope_dim`` variant, then
    positions, cos_sin, slots, the flat k and v caches, q heads and KV heads."""
    signature = kernel_signature(np.float16)[:-1] + ", float32, float32[::1], int32[::1]"
    if config.rope_dim:
        signature += ", int32[::1], float32[::1], int32[::1], float16[::1], float16[::1], int64, int64"
    return signature + ")"


def mma_options(config: MmaConfig) -> dict[str, Any]:
    """The compile options of tensor-core decode variant ``config``: its register cap, if it has one."""
    return {"max_registers": config.max_registers} if config.max_registers else {}


def compiled_mma(config: MmaConfig) -> Any:
    """Tensor-core decode variant ``config`` compiled as :func:`launch_mma` launches it."""
    return compiled(mma_kernel(config), mma_signature(config), **mma_options(config))


def mma_config(M: int, N: int, K: int, fused: bool = False, normalise: bool = False) -> MmaConfig:
    """The tensor-core variant for an ``[M, K] x [K, N]`` product (N: output columns).

    Chosen by sweeping :mod:`bench.gemm_sweep` over Llama-3-8B shapes on an H200 and an H100 (the
    same choices won on both). Up to 8 rows of x, one 16-row tile per warp and 16 warps on K keep
    the most bytes in flight; more rows of x make each weight load feed more mma, so warps take
    fewer K slices (x traffic) and, for wide outputs, two W tiles or four warps on neighbouring rows
    that share x through L1. Fused gate-up needs two W tiles per warp (gate and up). From M = 32,
    down (and o at M = 64) split K over blocks (``splits``), so that a block of more rows reads x
    once for them all: on an H200, down 45.0 -> 42.0 us at M = 32 and 75.1 -> 67.4 at M = 64, o
    28.3 -> 25.9 at M = 64. Split, QKV, o and gate_up at M = 16 and 32 and down at 16 ran slower, QKV
    at 64 only 1.03x faster; gate_up at 64 and lm_head were not swept (bench/RESULTS.md, sixteenth
    session).

    M's 8-row tiles are rounded up to a power of two: the decode graphs compile those variants at
    start-up, so an odd M of an eager step (the lm_head of a step that ends 24 prompts) reuses one
    instead of compiling another mid-serving (~1.5 s).
    """
    tiles_x = 1 << (cdiv(M, 8) - 1).bit_length()
    rows = 2 * N if fused else N
    splits = 1
    if fused or rows >= WIDE_N:
        shapes = {1: (2, 1, 8, 1), 2: (2, 1, 4, 1)}
        tiles_w, warps_n, warps_k, unroll = shapes.get(tiles_x, (2, 4, 2, 1))
    elif tiles_x == 1:
        tiles_w, warps_n, warps_k, unroll = 1, 1, 16, 1
    elif tiles_x == 2:
        tiles_w, warps_n, warps_k, unroll = (1, 1, 16, 2) if N <= 4096 or K >= LONG_K else (1, 1, 8, 2)
    elif tiles_x >= 4 and K >= LONG_K:
        # down: 16-row blocks would each read all of x's 32 or 64 rows; 64-row blocks on a quarter of K
        tiles_w, warps_n, warps_k, unroll, splits = (2, 2, 4, 1, 4) if tiles_x == 4 else (2, 2, 2, 2, 4)
    elif tiles_x == 8 and N <= 4096:  # o at M = 64: 32-row blocks on half of K
        tiles_w, warps_n, warps_k, unroll, splits = 1, 2, 4, 2, 2
    else:
        tiles_w, warps_n, warps_k, unroll = (1, 1, 16, 1) if K >= LONG_K else (1, 1, 8, 2)
    config = MmaConfig(tiles_w, tiles_x, warps_n, warps_k, unroll, fused, normalise, splits=splits)
    if normalise and config == MmaConfig(1, 1, 1, 16, 1, normalise=True):
        # 3 blocks of 16 warps an SM need <= 40 registers: the plain variant takes 39, normalising 48
        # uncapped (2 blocks, so QKV's 384 blocks took two waves); capped, ptxas sm_90a spills 8 bytes,
        # outside the loop. (Wider variants would spill inside it.)
        config = replace(config, max_registers=40)
    while config.shared_floats * 4 > MMA_SHARED_BYTES:  # past M = 32 (not swept): fewer warps' partials
        fewer = {"warps_n": config.warps_n // 2} if config.warps_n > 1 else {"warps_k": config.warps_k // 2}
        config = replace(config, **fewer)
    return config


def _flat_args(x: Any, weight: Any, bias: Any, residual: Any, out: Any) -> tuple:
    """The kernels' arguments: flat arrays (out standing in for absent ones), M, N, K, flags."""
    flat_out = out.reshape(-1)
    return (
        x.reshape(-1),
        weight.reshape(-1),
        flat_out if bias is None else bias,
        flat_out if residual is None else residual.reshape(-1),
        flat_out,
        x.shape[0],
        out.shape[1],
        x.shape[1],
        bias is not None,
        residual is not None,
    )


def launch_mma(
    config: MmaConfig, x: Any, weight: Any, bias: Any, residual: Any, out: Any, norm_eps: float = 0.0,
    rope_args: tuple = (),
) -> None:
    """Launch tensor-core variant ``config`` on checked float16 operands (K % 8 == 0, 16-byte aligned);
    ``norm_eps`` is the eps of a ``config.normalise`` variant, ``rope_args`` the trailing arguments of
    a ``config.rope_dim`` one (:func:`mma_signature`)."""
    groups = cdiv(out.shape[1], config.outputs_per_block)
    args = (*_flat_args(x, weight, bias, residual, out), norm_eps, *_split_workspace(x, config, groups), *rope_args)
    launch(compiled_mma(config), groups * config.splits, config.threads, args)


def _split_workspace(like: Any, config: MmaConfig, groups: int) -> tuple[Any, Any]:
    """Where the blocks of a ``config.splits > 1`` launch over ``groups`` groups of rows park their
    shares of K, and their arrival counts (zeros, which the last block of each group restores): kept
    arrays (:func:`.common.kept`), as the decode graphs need, of the launch's size rounded up to a
    power of two so that the step's GEMMs share a few. A launch that does not split gets one float
    and one count it never reads. Launches on one stream run one after another (a kernel under PDL
    waits for the one before it before it reads), so they may share them."""
    floats = 1 << (config.splits * groups * config.parked_floats - 1).bit_length() if config.splits > 1 else 1
    counts = 1 << (groups - 1).bit_length() if config.splits > 1 else 1
    workspace = kept(like, ("mma split-K workspace", floats), lambda xp: xp.zeros(floats, np.float32))
    arrivals = kept(like, ("mma split-K arrivals", counts), lambda xp: xp.zeros(counts, np.int32))
    return workspace, arrivals


def launch_tc(config: TcConfig, x: Any, weight: Any, bias: Any, residual: Any, out: Any) -> None:
    """Launch tensor-core prefill variant ``config`` on checked float16 operands (K % 8 == 0, 16-byte aligned)."""
    if config.wgmma and not wgmma.supported():
        raise ValueError(f"launch_tc: {config.label} uses wgmma, which only a Hopper GPU has (compute capability 9.0)")
    kernel = compiled(tc_kernel(config), kernel_signature(np.float16))
    grid = cdiv(out.shape[1], config.outputs_n) * cdiv(x.shape[0], config.block_m)
    launch(kernel, grid, config.threads, _flat_args(x, weight, bias, residual, out), config.shared_bytes)


def _vector_width(x: Any, weight: Any) -> int:
    """Elements per load of x and weight: 16 bytes when K is a multiple and both are aligned, else 1."""
    vec = VECTOR_WIDTH[np.dtype(x.dtype)]
    return vec if x.shape[1] % vec == 0 and aligned16(x, weight) else 1


def _on_tensor_cores(x: Any, weight: Any, mma: bool) -> bool:
    """Whether the tensor-core kernels take x and weight: float16 only, 16-byte loads, while they are on."""
    return mma and np.dtype(x.dtype) == np.float16 and _vector_width(x, weight) > 1


def _unit_weight(x: Any) -> Any:
    """A kept array of ones as long as x's rows, of x's dtype and array module (:func:`.common.kept`):
    the weight of an RMSNorm whose own weight was folded into the GEMM's."""
    one = 0x3F80 if np.dtype(x.dtype) == BFLOAT16 else 1  # bfloat16 travels as its bits
    return kept(x, ("unit weight", x.shape[1], str(x.dtype)), lambda xp: xp.full(x.shape[1], one, dtype=x.dtype))


def _launch(
    x: Any, weight: Any, out: Any, bias: Any, residual: Any, fused: bool, mma: bool | None = None,
    norm_eps: float | None = None, normed: Any = None,
) -> None:
    """Pick the kernel for checked operands and launch it (``mma=False``: CUDA cores only).

    float16 with K % 8 == 0 and 16-byte aligned x and weight runs on tensor cores: decode
    (M <= MMA_MAX_M) in :mod:`.gemm_mma`, prefill (M >= gemm_tc.MIN_M) in :mod:`.gemm_tc`, both only
    while common.TENSOR_CORES is on. Everything else (float32, bfloat16), and the simulator, runs on
    CUDA cores: the decode kernel for M <= DECODE_MAX_M, the tiled kernel above. With ``norm_eps``
    the decode tensor-core kernel normalises x itself; the others multiply ``normed``, written first.
    """
    mma = USE_MMA if mma is None else mma
    M, K = x.shape
    N = out.shape[1]
    x, normalise = _normalised(x, norm_eps, normed, M <= MMA_MAX_M and _on_tensor_cores(x, weight, mma))
    if normalise:
        launch_mma(mma_config(M, N, K, fused, normalise=True), x, weight, bias, residual, out, norm_eps)
        return
    dtype = np.dtype(x.dtype)
    vec = _vector_width(x, weight)
    bf16 = is_bf16(dtype)
    tensor_cores = _on_tensor_cores(x, weight, mma)
    if tensor_cores and M <= MMA_MAX_M:
        launch_mma(mma_config(M, N, K, fused), x, weight, bias, residual, out)
    elif tensor_cores and M >= gemm_tc.MIN_M and gemm_tc.ENABLED:
        launch_tc(tc_config(M, fused, wgmma.enabled()), x, weight, bias, residual, out)
    elif M <= DECODE_MAX_M:
        group = _group(M)
        kernel = compiled(_decode_kernel(group, vec, fused, bf16), kernel_signature(dtype))
        threads = min(DECODE_THREADS, max(WARP, cdiv(K // vec, WARP) * WARP))
        outs = DECODE_ROWS[group] // (2 if fused else 1)
        launch(kernel, cdiv(N, outs), threads, _flat_args(x, weight, bias, residual, out))
    else:
        kernel = compiled(_tiled_kernel(vec, fused, bf16), kernel_signature(dtype))
        outs = TILE_N // (2 if fused else 1)
        grid = (cdiv(N, outs), cdiv(M, TILE_M))
        launch(kernel, grid, TILE_THREADS, _flat_args(x, weight, bias, residual, out))


def _normalised(x: Any, norm_eps: float | None, normed: Any, decode_mma: bool) -> tuple[Any, bool]:
    """The x a linear multiplies and whether its kernel divides x's rows by their RMS itself: with
    ``norm_eps``, the decode tensor-core kernel does (``decode_mma``, while NORM_IN_GEMM is on); else
    RMSNorm with a unit weight writes ``normed`` first and the kernel multiplies that."""
    if norm_eps is None:
        return x, False
    if decode_mma and NORM_IN_GEMM:
        return x, True
    return norm.rms_norm(x, _unit_weight(x), norm_eps, normed), False


def _check_operands(op: str, x: Any, weight: Any) -> tuple[int, int, int]:
    """Check x ``[M, K]`` and weight ``[rows, K]``; return M, rows, K."""
    check_array(op, "x", x, (None, None), WITH_BFLOAT16)
    check_array(op, "weight", weight, (None, None), WITH_BFLOAT16)
    M, K = x.shape
    if weight.shape[1] != K:
        raise ValueError(
            f"{op}: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on K "
            "(x.shape[1] must equal weight.shape[1])"
        )
    return M, weight.shape[0], K


def _check_normed(op: str, x: Any, norm_eps: float | None, normed: Any) -> None:
    if norm_eps is None:
        return
    if normed is None:
        raise ValueError(f"{op}: norm_eps needs normed, an array like x {tuple(x.shape)} for the normalised rows")
    check_array(op, "normed", normed, tuple(x.shape), WITH_BFLOAT16)
    check_same_dtype(op, "x", x, normed=normed)


def linear(
    x: Any, weight: Any, out: Any, bias: Any = None, residual: Any = None,
    norm_eps: float | None = None, normed: Any = None,
) -> Any:
    """Launch the fused linear; see :func:`infinilm_nb.kernels.reference.linear`.

    x: ``[M, K]``; weight: ``[N, K]``; bias: ``[N]``; residual, out: ``[M, N]`` (out may be
    residual). All C-contiguous and of one dtype (float16, float32 or bfloat16 as uint16 bits);
    float32 accumulation. With ``norm_eps`` the rows of x are RMS-normalised first (module doc);
    ``normed`` (like x) is where that happens when the GEMM cannot do it in its loop.
    """
    M, N, _ = _check_operands("linear", x, weight)
    check_array("linear", "out", out, (M, N), WITH_BFLOAT16)
    if bias is not None:
        check_array("linear", "bias", bias, (N,), WITH_BFLOAT16)
    if residual is not None:
        check_array("linear", "residual", residual, (M, N), WITH_BFLOAT16)
    check_same_dtype("linear", "x", x, weight=weight, out=out, bias=bias, residual=residual)
    _check_normed("linear", x, norm_eps, normed)
    if M and N:
        _launch(x, weight, out, bias, residual, fused=False, norm_eps=norm_eps, normed=normed)
    return out


def linear_silu_mul(x: Any, weight: Any, out: Any, norm_eps: float | None = None, normed: Any = None) -> Any:
    """Launch the gate-up linear with SiLU-mul in its epilogue; see
    :func:`infinilm_nb.kernels.reference.linear_silu_mul`.

    x: ``[M, K]``; weight: ``[2I, K]`` (gate rows, then up rows); out: ``[M, I]``. All C-contiguous
    and of one dtype; the gate and up products stay in float32 until ``silu(gate) * up`` is stored.
    ``norm_eps`` and ``normed`` as for :func:`linear`.
    """
    M, rows, _ = _check_operands("linear_silu_mul", x, weight)
    if rows % 2:
        raise ValueError(f"linear_silu_mul: weight must have an even number of rows [gate | up], got {rows}")
    check_array("linear_silu_mul", "out", out, (M, rows // 2), WITH_BFLOAT16)
    check_same_dtype("linear_silu_mul", "x", x, weight=weight, out=out)
    _check_normed("linear_silu_mul", x, norm_eps, normed)
    if M and rows:
        _launch(x, weight, out, None, None, fused=True, norm_eps=norm_eps, normed=normed)
    return out


def linear_rope_store_kv(
    x: Any, weight: Any, out: Any, positions: Any, cos_sin: Any, k_cache: Any, v_cache: Any, slot_mapping: Any,
    q_heads: int, kv_heads: int, bias: Any = None, norm_eps: float | None = None, normed: Any = None,
) -> Any:
    """Launch a layer's QKV projection with RoPE and the K / V cache store; see
    :func:`infinilm_nb.kernels.reference.linear_rope_store_kv`.

    x: ``[M, K]``; weight: ``[(q_heads + 2 kv_heads) D, K]``; out: ``[M, (q_heads + 2 kv_heads) D]``;
    the rest as for :func:`linear` and :func:`.rope.rope_store_kv`. On the tensor-core decode path
    (float16, M <= MMA_MAX_M, D a multiple of 16) one kernel does it all (:mod:`.gemm_mma`);
    elsewhere :func:`linear` is followed by :func:`.rope.rope_store_kv` on out's heads.
    """
    M, N, K = _check_operands("linear_rope_store_kv", x, weight)
    check_array("linear_rope_store_kv", "k_cache", k_cache, (None, None, kv_heads, None), WITH_BFLOAT16)
    head_dim = k_cache.shape[-1]
    if N != (q_heads + 2 * kv_heads) * head_dim:
        raise ValueError(
            f"linear_rope_store_kv: weight must have (q_heads + 2 kv_heads) * head_dim = ({q_heads} + 2 * {kv_heads}) "
            f"* {head_dim} rows (head_dim: k_cache's last axis), got {N}"
        )
    check_array("linear_rope_store_kv", "out", out, (M, N), WITH_BFLOAT16)
    if bias is not None:
        check_array("linear_rope_store_kv", "bias", bias, (N,), WITH_BFLOAT16)
    check_same_dtype("linear_rope_store_kv", "x", x, weight=weight, out=out, bias=bias)
    _check_normed("linear_rope_store_kv", x, norm_eps, normed)
    q, k, v = reference.qkv_heads(out, q_heads, kv_heads, head_dim)
    if not (ROPE_IN_GEMM and 0 < M <= MMA_MAX_M and head_dim % 16 == 0 and _on_tensor_cores(x, weight, USE_MMA)):
        linear(x, weight, out, bias=bias, norm_eps=norm_eps, normed=normed)
        rope.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        return out
    rope.check_rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    x, normalise = _normalised(x, norm_eps, normed, decode_mma=True)
    config = replace(mma_config(M, N, K, normalise=normalise), rope_dim=head_dim)
    rope_args = (positions, cos_sin.reshape(-1), slot_mapping, k_cache.reshape(-1), v_cache.reshape(-1), q_heads, kv_heads)
    launch_mma(config, x, weight, bias, None, out, norm_eps if normalise else 0.0, rope_args)
    return out
