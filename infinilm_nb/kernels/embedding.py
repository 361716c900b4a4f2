"""Embedding gather over a vocab-parallel shard: ``out[t] = weight[ids[t] - vocab_start]`` or zeros.

Threads run along the hidden axis (coalesced row copies); the grid's y axis walks the tokens.
"""

from __future__ import annotations

import operator
from typing import Any

import numba
import numpy as np
from numba import cuda

from .common import FLOAT_DTYPES, cdiv, check_array, check_same_dtype, compiled, launch_stream, numba_type

THREADS = 256
MAX_GRID_Y = 65535


def _embedding_kernel(ids, weight, vocab_start, out):
    hidden = out.shape[1]
    column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if column >= hidden:
        return
    t = cuda.blockIdx.y
    while t < out.shape[0]:
        local = numba.int64(ids[t]) - vocab_start
        if local >= 0 and local < weight.shape[0]:
            out[t, column] = weight[local, column]
        else:
            out[t, column] = 0
        t += cuda.gridDim.y


def embedding(ids: Any, weight: Any, out: Any, vocab_start: int = 0) -> Any:
    """Launch the embedding gather; see :func:`infinilm_nb.kernels.reference.embedding`.

    Ids outside ``[vocab_start, vocab_start + V_shard)`` give zero rows (other ranks own them).
    """
    check_array("embedding", "ids", ids, (None,), (np.int32,))
    check_array("embedding", "weight", weight, (None, None), FLOAT_DTYPES)
    check_array("embedding", "out", out, (ids.shape[0], weight.shape[1]), FLOAT_DTYPES)
    check_same_dtype("embedding", "weight", weight, out=out)
    try:
        vocab_start = operator.index(vocab_start)
    except TypeError:
        raise ValueError(f"embedding: vocab_start must be an integer, got {type(vocab_start).__name__}") from None
    if out.size == 0:
        return out
    t = numba_type(weight.dtype)
    kernel = compiled(_embedding_kernel, f"void(int32[::1], {t}[:, ::1], int64, {t}[:, ::1])")
    hidden = out.shape[1]
    threads = min(THREADS, cdiv(hidden, 32) * 32)
    grid = (cdiv(hidden, threads), min(out.shape[0], MAX_GRID_Y))
    kernel[grid, threads, launch_stream()](ids, weight, vocab_start, out)
    return out
