"""Embedding gather over a vocab-parallel shard: ``out[t] = weight[ids[t] - vocab_start]`` or zeros.

One thread per 16-byte chunk of two tokens' output rows (8 float16 or bfloat16, or 4 float32; the
grid's y axis walks the token pairs): two 16-byte loads from the weight rows, both in flight before the two
16-byte stores; a warp copies 512 contiguous bytes a row. When the hidden size or a pointer is not
16-byte aligned the same kernel is built with ``vec`` = 1 (plain element copies).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import numba
import numpy as np
from numba import cuda

from .common import WITH_BFLOAT16, cdiv, check_array, check_same_dtype, compiled, launch, numba_type
from .intrinsics import await_previous_kernels
from .vector import inline_device, is_bf16, loader, packer, row_grid, storer, vector_width

THREADS = 256


@functools.lru_cache(maxsize=None)
def _embedding_kernel(vec: int, bf16: bool) -> Callable:
    """The kernel ``(ids, weight, vocab_start, out, hidden)`` over flat weight / out, ``vec`` elements a copy."""
    load, store, pack = loader(vec, bf16), storer(vec, bf16), packer(vec)

    @inline_device
    def source(ids, t, vocab_start, rows, hidden, c):
        """Where token ``t``'s chunk comes from in the flat weight: its row's, or -1 (a zero chunk)."""
        local = numba.int64(ids[t]) - vocab_start
        return local * hidden + c if local >= 0 and local < rows else numba.int64(-1)

    def kernel(ids, weight, vocab_start, out, hidden):
        """Two tokens a thread (``t`` and ``t + gridDim.y``), both loads in flight before the stores."""
        await_previous_kernels()
        c = (cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x) * vec
        if c >= hidden:
            return
        rows = weight.shape[0] // hidden
        zeros = cuda.local.array(vec, numba.float32)
        for e in range(vec):
            zeros[e] = 0.0
        tokens = ids.shape[0]
        t = cuda.blockIdx.y
        while t < tokens:
            u = t + cuda.gridDim.y
            first = source(ids, t, vocab_start, rows, hidden, c)
            second = source(ids, min(u, tokens - 1), vocab_start, rows, hidden, c)
            # both loads before either store (which the compiler must assume may alias them)
            a = load(weight, max(first, 0))
            b = load(weight, max(second, 0))
            if first >= 0:
                store(out, t * hidden + c, a)
            else:
                store(out, t * hidden + c, pack(zeros, 0))
            if u < tokens:
                if second >= 0:
                    store(out, u * hidden + c, b)
                else:
                    store(out, u * hidden + c, pack(zeros, 0))
            t += 2 * cuda.gridDim.y

    return kernel


def embedding(ids: Any, weight: Any, out: Any, vocab_start: int = 0) -> Any:
    """Launch the embedding gather; see :func:`infinilm_nb.kernels.reference.embedding`.

    Ids outside ``[vocab_start, vocab_start + V_shard)`` give zero rows (other ranks own them).
    """
    check_array("embedding", "ids", ids, (None,), (np.int32,))
    check_array("embedding", "weight", weight, (None, None), WITH_BFLOAT16)
    check_array("embedding", "out", out, (ids.shape[0], weight.shape[1]), WITH_BFLOAT16)
    check_same_dtype("embedding", "weight", weight, out=out)
    try:
        vocab_start = operator.index(vocab_start)
    except TypeError:
        raise ValueError(f"embedding: vocab_start must be an integer, got {type(vocab_start).__name__}") from None
    if out.size == 0:
        return out
    vec = vector_width(weight.dtype, (weight, out), (weight.shape[1],))
    t = numba_type(weight.dtype)
    kernel = compiled(_embedding_kernel(vec, is_bf16(weight.dtype)), f"void(int32[::1], {t}[::1], int64, {t}[::1], int64)")
    hidden = weight.shape[1]
    if weight.shape[0] == 0:  # an empty shard: every row is another rank's (and the kernel loads row 0)
        out.fill(0)
        return out
    grid, threads = row_grid(cdiv(ids.shape[0], 2), hidden // vec, THREADS)
    launch(kernel, grid, threads, (ids, weight.reshape(-1), vocab_start, out.reshape(-1), hidden))
    return out
