"""Rotary position embedding (GPT-NeoX ``rotate_half``), applied to q and k in place.

One thread per (token, head, pair): the grid's y axis walks the tokens, its x axis the flat
``(head, pair)`` index over q's heads then k's, so a warp touches consecutive elements of each half of
a head and consecutive columns of the cos/sin row.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import cuda

from .common import FLOAT_DTYPES, cdiv, check_array, check_same_dtype, compiled, launch_stream, numba_type

THREADS = 128
MAX_GRID_Y = 65535


def _rope_kernel(q, k, positions, cos_sin):
    q_heads = q.shape[1]
    half = q.shape[2] // 2
    columns = (q_heads + k.shape[1]) * half
    column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if column >= columns:
        return
    head = column // half
    pair = column - head * half
    t = cuda.blockIdx.y
    while t < q.shape[0]:
        position = positions[t]
        cos = cos_sin[position, pair]
        sin = cos_sin[position, half + pair]
        if head < q_heads:
            x1 = numba.float32(q[t, head, pair])
            x2 = numba.float32(q[t, head, half + pair])
            q[t, head, pair] = x1 * cos - x2 * sin
            q[t, head, half + pair] = x2 * cos + x1 * sin
        else:
            x1 = numba.float32(k[t, head - q_heads, pair])
            x2 = numba.float32(k[t, head - q_heads, half + pair])
            k[t, head - q_heads, pair] = x1 * cos - x2 * sin
            k[t, head - q_heads, half + pair] = x2 * cos + x1 * sin
        t += cuda.gridDim.y


def rope(q: Any, k: Any, positions: Any, cos_sin: Any) -> None:
    """Launch RoPE on q and k in place; see :func:`infinilm_nb.kernels.reference.rope`.

    q ``[T, Hq, D]`` and k ``[T, Hk, D]`` may be strided views (unit stride along D only), e.g. into a
    fused QKV output. Positions must lie in ``[0, P)`` of ``cos_sin [P, D]``: they are device data, so
    checking them here would cost a synchronisation, and an out-of-range position reads outside the table.
    """
    check_array("rope", "q", q, (None, None, None), FLOAT_DTYPES, contiguous=False)
    tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rope: head_dim (q's last axis) must be even, got {head_dim}")
    check_array("rope", "k", k, (tokens, None, head_dim), FLOAT_DTYPES, contiguous=False)
    check_same_dtype("rope", "q", q, k=k)
    check_array("rope", "positions", positions, (tokens,), (np.int32,))
    check_array("rope", "cos_sin", cos_sin, (None, head_dim), (np.float32,))
    columns = (q.shape[1] + k.shape[1]) * (head_dim // 2)
    if tokens == 0 or columns == 0:
        return
    t = numba_type(q.dtype)
    # layout 'A': q and k are usually views into the fused QKV buffer, not C-contiguous arrays
    kernel = compiled(_rope_kernel, f"void({t}[:, :, :], {t}[:, :, :], int32[::1], float32[:, ::1])")
    threads = min(THREADS, cdiv(columns, 32) * 32)
    grid = (cdiv(columns, threads), min(tokens, MAX_GRID_Y))
    kernel[grid, threads, launch_stream()](q, k, positions, cos_sin)
