"""SiLU-mul (SwiGLU): ``out = silu(gate) * up`` over a fused ``[gate | up]`` tensor."""

from __future__ import annotations

import math
from typing import Any

from numba import cuda

from .common import FLOAT_DTYPES, cdiv, check_array, check_same_dtype, compiled, launch_stream, numba_type

THREADS = 256


def _silu_mul_kernel(x, out):
    """One thread per output element, grid-stride over the flat ``[T, I]`` output."""
    inter = out.shape[1]
    total = out.shape[0] * inter
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < total:
        t = i // inter
        c = i - t * inter
        gate = float(x[t, c])
        up = float(x[t, c + inter])
        out[t, c] = gate / (1.0 + math.exp(-gate)) * up
        i += stride


def silu_mul(x: Any, out: Any) -> Any:
    """Launch SiLU-mul; see :func:`infinilm_nb.kernels.reference.silu_mul`."""
    check_array("silu_mul", "x", x, (None, None), FLOAT_DTYPES)
    tokens, width = x.shape
    if width % 2:
        raise ValueError(f"silu_mul: x must have an even last axis [gate | up], got {width}")
    check_array("silu_mul", "out", out, (tokens, width // 2), FLOAT_DTYPES)
    check_same_dtype("silu_mul", "x", x, out=out)
    if out.size == 0:
        return out
    t = numba_type(x.dtype)
    kernel = compiled(_silu_mul_kernel, f"void({t}[:, ::1], {t}[:, ::1])")
    blocks = min(cdiv(out.size, THREADS), 65535)
    kernel[blocks, THREADS, launch_stream()](x, out)
    return out
