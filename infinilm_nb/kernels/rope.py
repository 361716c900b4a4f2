"""Rotary position embedding (GPT-NeoX ``rotate_half``), applied to q and k in place.

One thread per (token, head, group of ``vec`` pairs): it loads ``vec`` elements of each half of its
head (one 16-byte load each: 8 float16 or 4 float32) and the matching cos and sin as float32x4
vectors, and stores both halves back with 16-byte stores. Consecutive threads take consecutive
groups of a head, then the next head (q's heads, then k's); the grid's y axis walks the tokens. A
warp's accesses are contiguous. When the head dim, the row strides or a pointer are not 16-byte aligned the
same kernel is built with ``vec`` = 1 (plain element access).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numba
import numpy as np
from numba import cuda

from .common import FLOAT_DTYPES, check_array, check_same_dtype, compiled, launch_stream, numba_type
from .vector import element_strides, flat_view, inline_device, loader, packer, row_grid, storer, vector_width

THREADS = 256


@functools.lru_cache(maxsize=None)
def _rope_kernel(vec: int, table_vec: int, half: int) -> Callable:
    """The kernel moving ``vec`` elements of q / k and ``table_vec`` of cos_sin per load, for heads
    of ``2 * half`` elements (a constant, so that a thread finds its head without a division loop)."""
    load, store, pack = loader(vec), storer(vec), packer(vec)
    table_load = loader(table_vec)
    table_steps = vec // table_vec
    groups = half // vec

    @inline_device
    def rotate(x, at, cos_sin, position, p):
        """Rotate the ``vec`` pairs ``(x[at + e], x[at + half + e])`` in place by the angles of row
        ``position`` of the table, columns ``p ..``."""
        x1 = load(x, at)  # first: these loads need not wait for the position's
        x2 = load(x, at + half)
        row = numba.int64(position) * (2 * half) + p
        cos = cuda.local.array(vec, numba.float32)
        sin = cuda.local.array(vec, numba.float32)
        for s in range(table_steps):
            cv = table_load(cos_sin, row + s * table_vec)
            sv = table_load(cos_sin, row + half + s * table_vec)
            for e in range(table_vec):
                cos[s * table_vec + e] = cv[e]
                sin[s * table_vec + e] = sv[e]
        y1 = cuda.local.array(vec, numba.float32)
        y2 = cuda.local.array(vec, numba.float32)
        for e in range(vec):
            a = numba.float32(x1[e])
            b = numba.float32(x2[e])
            y1[e] = a * cos[e] - b * sin[e]
            y2[e] = b * cos[e] + a * sin[e]
        store(x, at, pack(y1, 0))
        store(x, at + half, pack(y2, 0))

    def kernel(q, k, positions, cos_sin, q_heads, k_heads, q_token, q_head, k_token, k_head):
        """q, k: flat views from their first element, strided by (``*_token``, ``*_head``) elements;
        cos_sin: flat ``[P * 2 half]``. Threads run over a token's (head, group), blocks' y over tokens."""
        column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if column >= (q_heads + k_heads) * groups:
            return
        head = column // groups
        p = (column - head * groups) * vec
        t = cuda.blockIdx.y
        while t < positions.shape[0]:
            # two call sites rather than one through a q-or-k pointer, which would make the accesses generic
            if head < q_heads:
                rotate(q, t * q_token + head * q_head + p, cos_sin, positions[t], p)
            else:
                rotate(k, t * k_token + (head - q_heads) * k_head + p, cos_sin, positions[t], p)
            t += cuda.gridDim.y

    return kernel


def rope(q: Any, k: Any, positions: Any, cos_sin: Any) -> None:
    """Launch RoPE on q and k in place; see :func:`infinilm_nb.kernels.reference.rope`.

    q ``[T, Hq, D]`` and k ``[T, Hk, D]`` may be strided views (unit stride along D only), e.g. into a
    fused QKV output. Positions must lie in ``[0, P)`` of ``cos_sin [P, D]``: they are device data, so
    checking them here would cost a synchronisation, and an out-of-range position reads outside the table.
    """
    check_array("rope", "q", q, (None, None, None), FLOAT_DTYPES, contiguous=False)
    tokens, q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"rope: head_dim (q's last axis) must be even, got {head_dim}")
    check_array("rope", "k", k, (tokens, None, head_dim), FLOAT_DTYPES, contiguous=False)
    check_same_dtype("rope", "q", q, k=k)
    check_array("rope", "positions", positions, (tokens,), (np.int32,))
    check_array("rope", "cos_sin", cos_sin, (None, head_dim), (np.float32,))
    q_flat, k_flat = flat_view("rope", "q", q), flat_view("rope", "k", k)
    half = head_dim // 2
    heads = q_heads + k.shape[1]
    if tokens == 0 or heads * half == 0:
        return
    strides = element_strides(q)[:2] + element_strides(k)[:2]
    vec = vector_width(q.dtype, (q, k), (half,) + strides)
    table_vec = vector_width(np.float32, (cos_sin,), (vec, half))
    t = numba_type(q.dtype)
    kernel = compiled(
        _rope_kernel(vec, table_vec, half),
        f"void({t}[::1], {t}[::1], int32[::1], float32[::1], int64, int64, int64, int64, int64, int64)",
    )
    grid, threads = row_grid(tokens, heads * half // vec, THREADS)
    kernel[grid, threads, launch_stream()](
        q_flat, k_flat, positions, cos_sin.reshape(-1), q_heads, k.shape[1], *strides
    )
