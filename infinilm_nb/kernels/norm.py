"""RMSNorm and fused residual-add + RMSNorm: one thread block per row, one pass over memory.

Each thread owns the columns ``tid, tid + blockDim, ...`` of its row (coalesced) and keeps its first
``ITEMS`` of them in registers, so a row of up to ``ITEMS * MAX_THREADS`` (8192) elements is read
once; wider rows re-read the columns past that on the second pass. The sum of squares is reduced in
float32 by warp shuffles, then across warps through shared memory.
"""

from __future__ import annotations

import math
from typing import Any

import numba
from numba import cuda

from .common import FLOAT_DTYPES, cdiv, check_array, check_same_dtype, compiled, launch_stream, numba_type

ITEMS = 8  # columns per thread kept in registers; 8 float16 are one 16-byte vector
MAX_THREADS = 1024  # threads per row at most (the hardware's block limit)
WARP = 32
MAX_WARPS = 32  # size of the shared scratch of the reduction: 1024 threads, fixed when compiled


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


def _rms_norm_kernel(x, weight, eps, out):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    hidden = x.shape[1]
    cache = cuda.local.array(ITEMS, numba.float32)
    partial = cuda.shared.array(MAX_WARPS, numba.float32)
    sum_squares = numba.float32(0.0)
    for j in range(ITEMS):
        i = tid + j * threads
        if i < hidden:
            value = numba.float32(x[row, i])
            cache[j] = value
            sum_squares += value * value
    i = tid + ITEMS * threads
    while i < hidden:
        value = numba.float32(x[row, i])
        sum_squares += value * value
        i += threads
    inv = _inv_rms(sum_squares, hidden, eps, partial)
    for j in range(ITEMS):
        i = tid + j * threads
        if i < hidden:
            out[row, i] = cache[j] * inv * numba.float32(weight[i])
    i = tid + ITEMS * threads
    while i < hidden:
        out[row, i] = numba.float32(x[row, i]) * inv * numba.float32(weight[i])
        i += threads


def _add_rms_norm_kernel(x, residual, weight, eps, out):
    row = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    threads = cuda.blockDim.x
    hidden = x.shape[1]
    cache = cuda.local.array(ITEMS, numba.float32)
    partial = cuda.shared.array(MAX_WARPS, numba.float32)
    sum_squares = numba.float32(0.0)
    for j in range(ITEMS):
        i = tid + j * threads
        if i < hidden:
            residual[row, i] = numba.float32(residual[row, i]) + numba.float32(x[row, i])
            # read back what was stored, rounded to residual's dtype (the compiler forwards the store)
            value = numba.float32(residual[row, i])
            cache[j] = value
            sum_squares += value * value
    i = tid + ITEMS * threads
    while i < hidden:
        residual[row, i] = numba.float32(residual[row, i]) + numba.float32(x[row, i])
        value = numba.float32(residual[row, i])
        sum_squares += value * value
        i += threads
    inv = _inv_rms(sum_squares, hidden, eps, partial)
    for j in range(ITEMS):
        i = tid + j * threads
        if i < hidden:
            out[row, i] = cache[j] * inv * numba.float32(weight[i])
    i = tid + ITEMS * threads
    while i < hidden:
        out[row, i] = numba.float32(residual[row, i]) * inv * numba.float32(weight[i])
        i += threads


def _block_threads(hidden: int) -> int:
    """Threads per row: enough that each keeps at most ``ITEMS`` columns, a multiple of the warp."""
    return min(MAX_THREADS, max(WARP, cdiv(cdiv(hidden, ITEMS), WARP) * WARP))


def _check(op: str, x: Any, weight: Any, out: Any) -> None:
    check_array(op, "x", x, (None, None), FLOAT_DTYPES)
    check_array(op, "weight", weight, (x.shape[1],), FLOAT_DTYPES)
    check_array(op, "out", out, tuple(x.shape), FLOAT_DTYPES)
    check_same_dtype(op, "x", x, out=out)


def rms_norm(x: Any, weight: Any, eps: float, out: Any) -> Any:
    """Launch RMSNorm; see :func:`infinilm_nb.kernels.reference.rms_norm` (out may be x)."""
    _check("rms_norm", x, weight, out)
    if x.size == 0:
        return out
    t, w = numba_type(x.dtype), numba_type(weight.dtype)
    kernel = compiled(_rms_norm_kernel, f"void({t}[:, ::1], {w}[::1], float32, {t}[:, ::1])")
    kernel[x.shape[0], _block_threads(x.shape[1]), launch_stream()](x, weight, eps, out)
    return out


def add_rms_norm(x: Any, residual: Any, weight: Any, eps: float, out: Any) -> Any:
    """Launch the fused residual add + RMSNorm; see :func:`infinilm_nb.kernels.reference.add_rms_norm`.

    ``residual`` is updated in place; out may be x.
    """
    _check("add_rms_norm", x, weight, out)
    check_array("add_rms_norm", "residual", residual, tuple(x.shape), FLOAT_DTYPES)
    check_same_dtype("add_rms_norm", "x", x, residual=residual)
    if x.size == 0:
        return out
    t, w = numba_type(x.dtype), numba_type(weight.dtype)
    kernel = compiled(_add_rms_norm_kernel, f"void({t}[:, ::1], {t}[:, ::1], {w}[::1], float32, {t}[:, ::1])")
    kernel[x.shape[0], _block_threads(x.shape[1]), launch_stream()](x, residual, weight, eps, out)
    return out
