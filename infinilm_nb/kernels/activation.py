"""SiLU-mul (SwiGLU): ``out = silu(gate) * up`` over a fused ``[gate | up]`` tensor.

One thread per 16-byte chunk of an output row (8 float16 or bfloat16, or 4 float32; the grid's y
axis walks the tokens): it loads the matching chunks of gate and up with one 16-byte load each and stores its chunk
with one 16-byte store. When the intermediate size or a pointer is not 16-byte aligned the same
kernel is built with ``vec`` = 1.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numba
from numba import cuda

from .common import WITH_BFLOAT16, check_array, check_same_dtype, compiled, launch, numba_type
from .intrinsics import await_previous_kernels
from .vector import is_bf16, loader, packer, row_grid, storer, vector_width

THREADS = 256


@functools.lru_cache(maxsize=None)
def _silu_mul_kernel(vec: int, bf16: bool) -> Callable:
    """The kernel ``(x, out, tokens, inter)`` over flat ``[T * 2I]`` and ``[T * I]``, ``vec`` elements a load."""
    load, store, pack = loader(vec, bf16), storer(vec, bf16), packer(vec)

    def kernel(x, out, tokens, inter):
        await_previous_kernels()
        c = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) * vec
        if c >= inter:
            return
        t = cuda.blockIdx.y
        while t < tokens:
            gate = load(x, t * 2 * inter + c)
            up = load(x, t * 2 * inter + inter + c)
            y = cuda.local.array(vec, numba.float32)
            for e in range(vec):
                g = numba.float32(gate[e])
                y[e] = g / (numba.float32(1.0) + math.exp(-g)) * numba.float32(up[e])
            store(out, t * inter + c, pack(y, 0))
            t += cuda.gridDim.y

    return kernel


def silu_mul(x: Any, out: Any) -> Any:
    """Launch SiLU-mul; see :func:`infinilm_nb.kernels.reference.silu_mul`."""
    check_array("silu_mul", "x", x, (None, None), WITH_BFLOAT16)
    tokens, width = x.shape
    if width % 2:
        raise ValueError(f"silu_mul: x must have an even last axis [gate | up], got {width}")
    check_array("silu_mul", "out", out, (tokens, width // 2), WITH_BFLOAT16)
    check_same_dtype("silu_mul", "x", x, out=out)
    if out.size == 0:
        return out
    inter = width // 2
    vec = vector_width(x.dtype, (x, out), (inter,))
    t = numba_type(x.dtype)
    kernel = compiled(_silu_mul_kernel(vec, is_bf16(x.dtype)), f"void({t}[::1], {t}[::1], int64, int64)")
    grid, threads = row_grid(tokens, inter // vec, THREADS)
    launch(kernel, grid, threads, (x.reshape(-1), out.reshape(-1), tokens, inter))
    return out
