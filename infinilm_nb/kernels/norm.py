"""RMSNorm and fused residual-add + RMSNorm: one thread block per row, one pass over memory.

Each thread owns the 16-byte chunks ``tid, tid + blockDim, ...`` of its row (8 float16 or bfloat16,
or 4 float32, see :mod:`.vector`; single elements when the row length or a pointer is not 16-byte
aligned) and keeps its first ``ITEMS`` chunks in registers (a float16 row as float16, others as
float32), so its loads are independent and in flight together, and a row of up to
``ITEMS * MAX_THREADS`` chunks is read once; wider rows re-read the chunks past that on the second
pass. In a launch of a few rows (decode) the weights of those first chunks are loaded with the row,
before the reduction, so a single row (batch 1) waits for memory once, not twice. Many rows
(prefill) load them as they write instead, from L1 or L2 (every row reads the same weight). Held in
registers, the weights and a float32 row took 79 registers a thread, which capped an SM at 6 blocks
and the rows' loads in flight with them (H200, 4096 x 4096: 59% of copy); now 32, 16 blocks, 76%.
The sum of squares is reduced in float32 by warp shuffles, then across warps through shared memory.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numba
import numpy as np
from numba import cuda

from . import common
from .common import WITH_BFLOAT16, cdiv, check_array, check_same_dtype, compiled, launch, numba_type
from .intrinsics import await_previous_kernels, bf16_to_f32, f32_to_bf16, let_next_kernel_launch
from .vector import inline_device, is_bf16, loader, packer, storer, vector_width

ITEMS = 4  # chunks per thread kept in registers: 4 (8 with the residual) 16-byte loads in flight
# Threads per row at most: a thread keeps 2 * ITEMS * 8 floats (its chunks and their weights), which
# at 1024 threads would pass the 64 registers a thread may then have, and the launch would fail.
MAX_THREADS = 512
WARP = 32
MAX_WARPS = MAX_THREADS // WARP  # size of the shared scratch of the reduction, fixed when compiled
# Rows up to which a norm lets the next kernel launch early (common.LAUNCH_NEXT_EARLY): decode steps,
# whose next GEMM is then resident when the norm ends; a prefill GEMM's blocks would only sit beside
# the norm's.
LAUNCH_NEXT_MAX_ROWS = 64
# Rows up to which the weights are loaded with the row rather than as the row is written.
EARLY_WEIGHTS_MAX_ROWS = 64


@cuda.jit(device=True)
def _block_sum(value, partial):
    """Sum ``value`` over the block (blockDim a multiple of 32, reached by every thread)."""
    offset = WARP // 2
    while offset > 0:
        value += cuda.shfl_xor_sync(0xFFFFFFFF, value, offset)
        offset //= 2
    if cuda.threadIdx.x % WARP == 0:
        partial[cuda.threadIdx.x // WARP] = value
    cuda.syncthreads()
    total = numba.float32(0.0)
    for w in range(cuda.blockDim.x // WARP):
        total += partial[w]
    return total


@cuda.jit(device=True)
def _inv_rms(sum_squares, hidden, eps, partial):
    """``1 / sqrt(mean(x**2) + eps)`` of the block's row from each thread's partial sum of squares."""
    mean = _block_sum(sum_squares, partial) / numba.float32(hidden)
    return numba.float32(1.0) / math.sqrt(mean + eps)


@inline_device
def _round_to_bf16(value):
    """``value`` rounded to bfloat16, as float32."""
    return bf16_to_f32(f32_to_bf16(value))


@functools.lru_cache(maxsize=None)
def _norm_kernel(
    vec: int, weight_vec: int, add: bool, dtype: str, weight_dtype: str, launch_next: bool, early_weights: bool,
) -> Callable:
    """The kernel ``(x, residual, weight, eps, out)`` over flat ``[T * H]`` arrays.

    ``vec`` elements of x / residual / out and ``weight_vec`` of weight move per load; with ``add``
    the residual is updated first (rounded to ``dtype``) and normalised; without, ``residual`` is x.
    ``launch_next``: the next kernel may launch once this one has waited (``common.LAUNCH_NEXT_EARLY``).
    ``early_weights``: the weights are loaded before the reduction (``EARLY_WEIGHTS_MAX_ROWS``).
    """
    bf16 = is_bf16(dtype)
    load, store, pack = loader(vec, bf16), storer(vec, bf16), packer(vec)
    weight_load = loader(weight_vec, is_bf16(weight_dtype))
    weight_steps = vec // weight_vec
    cached = ITEMS * vec
    weights_held = cached if early_weights else vec
    # a float16 row is held as loaded (exact: with the add, the sum is rounded to float16 first):
    # half the registers of float32, so an SM holds more blocks and more of their loads in flight
    cache_type = numba.types.float16 if dtype == "float16" else numba.float32
    to_dtype = _round_to_bf16 if bf16 else numba.types.float16 if dtype == "float16" else numba.float32

    @inline_device
    def read(x, residual, at, y):
        """``y`` = the chunk at ``at`` (after ``residual += x`` with add); returns its sum of squares."""
        xv = load(x, at)
        if add:
            rv = load(residual, at)
            for e in range(vec):
                y[e] = numba.float32(to_dtype(numba.float32(rv[e]) + numba.float32(xv[e])))
            store(residual, at, pack(y, 0))
        else:
            for e in range(vec):
                y[e] = numba.float32(xv[e])
        total = numba.float32(0.0)
        for e in range(vec):
            total += y[e] * y[e]
        return total

    @inline_device
    def read_weight(weight, chunk, into, offset):
        """``into[offset : offset + vec]`` = ``weight[chunk * vec : ...]`` as float32."""
        for s in range(weight_steps):
            w = weight_load(weight, chunk * vec + s * weight_vec)
            for e in range(weight_vec):
                into[offset + s * weight_vec + e] = numba.float32(w[e])

    @inline_device
    def write(values, offset, out, at, inv, weights, y, weight_offset):
        """``out[at : at + vec] = values[offset : offset + vec] * inv * weights[weight_offset : ...]``."""
        for e in range(vec):
            y[e] = numba.float32(values[offset + e]) * inv * weights[weight_offset + e]
        store(out, at, pack(y, 0))

    def kernel(x, residual, weight, eps, out):
        await_previous_kernels()
        if launch_next:
            let_next_kernel_launch()
        tid = cuda.threadIdx.x
        threads = cuda.blockDim.x
        hidden = weight.shape[0]
        chunks = hidden // vec
        base = cuda.blockIdx.x * hidden
        cache = cuda.local.array(cached, cache_type)
        weights = cuda.local.array(weights_held, numba.float32)
        y = cuda.local.array(vec, numba.float32)
        partial = cuda.shared.array(MAX_WARPS, numba.float32)
        if early_weights:  # in flight with the row, rather than one memory latency after the reduction
            for j in range(ITEMS):
                c = tid + j * threads
                if c < chunks:
                    read_weight(weight, c, weights, j * vec)
        sum_squares = numba.float32(0.0)
        for j in range(ITEMS):
            c = tid + j * threads
            if c < chunks:
                sum_squares += read(x, residual, base + c * vec, y)
                for e in range(vec):
                    cache[j * vec + e] = cache_type(y[e])
        c = tid + ITEMS * threads
        while c < chunks:
            sum_squares += read(x, residual, base + c * vec, y)
            c += threads
        inv = _inv_rms(sum_squares, hidden, eps, partial)
        for j in range(ITEMS):
            c = tid + j * threads
            if c < chunks:
                if early_weights:
                    write(cache, j * vec, out, base + c * vec, inv, weights, y, j * vec)
                else:
                    read_weight(weight, c, weights, 0)
                    write(cache, j * vec, out, base + c * vec, inv, weights, y, 0)
        c = tid + ITEMS * threads
        while c < chunks:  # rows wider than the registers: re-read (the updated residual, or x)
            rv = load(residual, base + c * vec)
            for e in range(vec):
                cache[e] = numba.float32(rv[e])
            read_weight(weight, c, weights, 0)
            write(cache, 0, out, base + c * vec, inv, weights, y, 0)
            c += threads

    return kernel


def _block_threads(chunks: int) -> int:
    """Threads per row: enough that each keeps at most ``ITEMS`` chunks, a multiple of the warp."""
    return min(MAX_THREADS, max(WARP, cdiv(cdiv(chunks, ITEMS), WARP) * WARP))


def _check(op: str, x: Any, weight: Any, out: Any) -> None:
    check_array(op, "x", x, (None, None), WITH_BFLOAT16)
    check_array(op, "weight", weight, (x.shape[1],), WITH_BFLOAT16)
    check_array(op, "out", out, tuple(x.shape), WITH_BFLOAT16)
    check_same_dtype(op, "x", x, out=out)


def _launch(x: Any, residual: Any, weight: Any, eps: float, out: Any, add: bool) -> None:
    hidden = x.shape[1]
    vec = vector_width(x.dtype, (x, residual, out), (hidden,))
    weight_vec = vector_width(weight.dtype, (weight,), (vec,))
    t, w = numba_type(x.dtype), numba_type(weight.dtype)
    names = np.dtype(x.dtype).name, np.dtype(weight.dtype).name
    rows = x.shape[0]
    kernel = compiled(
        _norm_kernel(vec, weight_vec, add, *names, common.LAUNCH_NEXT_EARLY and rows <= LAUNCH_NEXT_MAX_ROWS,
                     rows <= EARLY_WEIGHTS_MAX_ROWS),
        f"void({t}[::1], {t}[::1], {w}[::1], float32, {t}[::1])",
    )
    flat = [a.reshape(-1) for a in (x, residual, out)]
    launch(kernel, x.shape[0], _block_threads(hidden // vec), (flat[0], flat[1], weight, eps, flat[2]))


def rms_norm(x: Any, weight: Any, eps: float, out: Any) -> Any:
    """Launch RMSNorm; see :func:`infinilm_nb.kernels.reference.rms_norm` (out may be x)."""
    _check("rms_norm", x, weight, out)
    if x.size:
        _launch(x, x, weight, eps, out, add=False)
    return out


def add_rms_norm(x: Any, residual: Any, weight: Any, eps: float, out: Any) -> Any:
    """Launch the fused residual add + RMSNorm; see :func:`infinilm_nb.kernels.reference.add_rms_norm`.

    ``residual`` is updated in place; out may be x.
    """
    _check("add_rms_norm", x, weight, out)
    check_array("add_rms_norm", "residual", residual, tuple(x.shape), WITH_BFLOAT16)
    check_same_dtype("add_rms_norm", "x", x, residual=residual)
    if x.size:
        _launch(x, residual, weight, eps, out, add=True)
    return out
