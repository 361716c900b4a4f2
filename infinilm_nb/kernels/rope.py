"""Rotary position embedding (GPT-NeoX ``rotate_half``), applied to q and k in place.

One thread per (token, head, group of ``vec`` pairs): it loads ``vec`` elements of each half of its
head (one 16-byte load each: 8 float16 or bfloat16, or 4 float32) and the matching cos and sin as float32x4
vectors, and stores both halves back with 16-byte stores. Consecutive threads take consecutive
groups of a head, then the next head (q's heads, then k's); the grid's y axis walks the tokens, each
block looping over them when they are more than ``BLOCKS_PER_SM`` blocks an SM. A warp's accesses are
contiguous. When the head dim, the row strides or a pointer are not 16-byte aligned the
same kernel is built with ``vec`` = 1 (plain element access).

:func:`rope_store_kv` is RoPE and :func:`~.attention.store_kv` in one kernel: the threads of a K head
also write their rotated K and the matching V into the paged cache, which saves a launch and a
pass over K in every layer of every step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numba
import numpy as np
from numba import cuda

from .attention import check_store
from .common import (
    SIMULATOR, WITH_BFLOAT16, check_array, check_same_dtype, compiled, launch, multiprocessors, numba_type,
)
from .intrinsics import await_previous_kernels
from .vector import (
    element_strides, flat_view, inline_device, is_bf16, loader, packer, row_grid, storer, vector_width,
)

# Threads a block at most: a token's (head, group) columns fit one block (Llama-3-8B: 40 heads x 8
# groups = 320), where at 256 a second block a token ran 64 of its 256 threads.
THREADS = 512
# The grid holds at most this many blocks an SM, each looping over tokens, rather than a block a token.
# H200, Llama-3-8B heads, % of copy at 2048 / 4096 / 8192 tokens: RoPE 75.6 / 82.2 / 86.9 against
# 73.5 / 78.3 / 82.1 a block a token; RoPE + cache store 57.0 / 62.6 / 66.5 against 53.8 / 58.2 / 61.7.
# (4 an SM was best for RoPE alone, 82.9% at 4096, but slowed the store to 56.0%.)
BLOCKS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def _rope_kernels(vec: int, table_vec: int, half: int, bf16: bool) -> tuple[Callable, Callable]:
    """RoPE alone and RoPE with the cache store, moving ``vec`` elements of q / k and ``table_vec``
    of cos_sin per load, for heads of ``2 * half`` elements (a constant, so that a thread finds its
    head without a division loop); ``bf16``: q, k, v and the caches hold bfloat16 bits."""
    load, store, pack = loader(vec, bf16), storer(vec, bf16), packer(vec)
    table_load = loader(table_vec)
    table_steps = vec // table_vec
    groups = half // vec

    @inline_device
    def rotate(x, at, cos_sin, position, p):
        """Rotate the ``vec`` pairs ``(x[at + e], x[at + half + e])`` in place by the angles of row
        ``position`` of the table, columns ``p ..``; return the two rotated halves (packed)."""
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
        first, second = pack(y1, 0), pack(y2, 0)
        store(x, at, first)
        store(x, at + half, second)
        return first, second

    def kernel(q, k, positions, cos_sin, q_heads, k_heads, q_token, q_head, k_token, k_head):
        """q, k: flat views from their first element, strided by (``*_token``, ``*_head``) elements;
        cos_sin: flat ``[P * 2 half]``. Threads run over a token's (head, group), blocks' y over tokens."""
        await_previous_kernels()
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

    def kernel_store(q, k, v, positions, cos_sin, k_cache, v_cache, slots, q_heads, k_heads, strides):
        """:func:`kernel`, and then a K head's threads write their rotated K and the V at the same
        place into the caches (flat ``[slots * Hk * 2 half]``) at ``slots[t]`` (negative: skipped).
        strides: (q token, q head, k token, k head, v token, v head) in elements."""
        await_previous_kernels()
        column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if column >= (q_heads + k_heads) * groups:
            return
        head = column // groups
        p = (column - head * groups) * vec
        num_slots = k_cache.shape[0] // (k_heads * 2 * half)
        t = cuda.blockIdx.y
        while t < positions.shape[0]:
            if head < q_heads:
                rotate(q, t * strides[0] + head * strides[1] + p, cos_sin, positions[t], p)
            else:
                h = head - q_heads
                first, second = rotate(k, t * strides[2] + h * strides[3] + p, cos_sin, positions[t], p)
                slot = slots[t]
                if 0 <= slot < num_slots:
                    at = (numba.int64(slot) * k_heads + h) * (2 * half) + p
                    v_at = t * strides[4] + h * strides[5] + p
                    store(k_cache, at, first)
                    store(k_cache, at + half, second)
                    store(v_cache, at, load(v, v_at))
                    store(v_cache, at + half, load(v, v_at + half))
            t += cuda.gridDim.y

    return kernel, kernel_store


def _grid(tokens: int, columns: int) -> tuple[tuple[int, int], int]:
    """(grid, block) of a launch over ``tokens`` rows of ``columns`` threads: at most
    ``BLOCKS_PER_SM`` blocks an SM (in the simulator 2 rows of blocks, so that tests' tokens loop)."""
    (x, y), threads = row_grid(tokens, columns, THREADS)
    rows = 2 if SIMULATOR else max(1, BLOCKS_PER_SM * multiprocessors() // x)
    return (x, min(y, rows)), threads


def _check_rope(op: str, q: Any, k: Any, positions: Any, cos_sin: Any) -> tuple[int, int, int]:
    """Check RoPE's arguments (raising ``ValueError`` naming the wrong one); return T, Hq and D."""
    check_array(op, "q", q, (None, None, None), WITH_BFLOAT16, contiguous=False)
    tokens, q_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim (q's last axis) must be even, got {head_dim}")
    check_array(op, "k", k, (tokens, None, head_dim), WITH_BFLOAT16, contiguous=False)
    check_same_dtype(op, "q", q, k=k)
    check_array(op, "positions", positions, (tokens,), (np.int32,))
    check_array(op, "cos_sin", cos_sin, (None, head_dim), (np.float32,))
    return tokens, q_heads, head_dim


def rope(q: Any, k: Any, positions: Any, cos_sin: Any) -> None:
    """Launch RoPE on q and k in place; see :func:`infinilm_nb.kernels.reference.rope`.

    q ``[T, Hq, D]`` and k ``[T, Hk, D]`` may be strided views (unit stride along D only), e.g. into a
    fused QKV output. Positions must lie in ``[0, P)`` of ``cos_sin [P, D]``: they are device data, so
    checking them here would cost a synchronisation, and an out-of-range position reads outside the table.
    """
    tokens, q_heads, head_dim = _check_rope("rope", q, k, positions, cos_sin)
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
        _rope_kernels(vec, table_vec, half, is_bf16(q.dtype))[0],
        f"void({t}[::1], {t}[::1], int32[::1], float32[::1], int64, int64, int64, int64, int64, int64)",
    )
    grid, threads = _grid(tokens, heads * half // vec)
    launch(kernel, grid, threads, (q_flat, k_flat, positions, cos_sin.reshape(-1), q_heads, k.shape[1], *strides))


def check_rope_store_kv(
    q: Any, k: Any, v: Any, positions: Any, cos_sin: Any, k_cache: Any, v_cache: Any, slot_mapping: Any
) -> tuple[int, int, int]:
    """Check :func:`rope_store_kv`'s arguments (raising ``ValueError`` naming the wrong one); return
    T, Hq and D."""
    tokens, q_heads, head_dim = _check_rope("rope_store_kv", q, k, positions, cos_sin)
    check_store("rope_store_kv", k, v, k_cache, v_cache)
    check_array("rope_store_kv", "slot_mapping", slot_mapping, (tokens,), (np.int32,))
    return tokens, q_heads, head_dim


def rope_store_kv(
    q: Any, k: Any, v: Any, positions: Any, cos_sin: Any, k_cache: Any, v_cache: Any, slot_mapping: Any
) -> None:
    """:func:`rope` on q and k in place, then the rotated k and v into the paged cache at
    ``slot_mapping``, in one launch; see :func:`infinilm_nb.kernels.reference.rope_store_kv`.

    q, k, v may be strided views into a fused QKV output (unit stride along the head dim).
    """
    tokens, q_heads, head_dim = check_rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    k_heads = k.shape[1]
    flats = [flat_view("rope_store_kv", name, x) for name, x in (("q", q), ("k", k), ("v", v))]
    half = head_dim // 2
    if tokens == 0 or k_heads * half == 0:
        return
    strides = element_strides(q)[:2] + element_strides(k)[:2] + element_strides(v)[:2]
    vec = vector_width(q.dtype, (q, k, v, k_cache, v_cache), (half,) + strides)
    table_vec = vector_width(np.float32, (cos_sin,), (vec, half))
    t = numba_type(q.dtype)
    kernel = compiled(
        _rope_kernels(vec, table_vec, half, is_bf16(q.dtype))[1],
        f"void({t}[::1], {t}[::1], {t}[::1], int32[::1], float32[::1], {t}[::1], {t}[::1], int32[::1], "
        "int64, int64, UniTuple(int64, 6))",
    )
    grid, threads = _grid(tokens, (q_heads + k_heads) * half // vec)
    launch(kernel, grid, threads, (
        *flats, positions, cos_sin.reshape(-1), k_cache.reshape(-1), v_cache.reshape(-1), slot_mapping,
        q_heads, k_heads, strides,
    ))
