"""The merge of split-context attention: each token's partition partials into ``out``, by the last
partition block of the tensor-core split kernel (:func:`group_merger`), or by a second kernel.

The partition kernels (:mod:`.attention`, :mod:`.attention_mma`) leave, per (token, query head,
partition), an unnormalised partial ``o_p`` (float32, ``head_dim`` values) and its softmax state
``(m_p, l_p)``: the max of the partition's scores and the sum of their exponentials. The merge is
the online-softmax rule: with ``top = max_p m_p`` and ``w_p = exp(m_p - top)``,
``out = sum_p w_p o_p / sum_p w_p l_p``.

One block per (token, query head). A few long sequences split into many partitions (a batch-1 step
over 8K keys: ~40 per head), so the partitions are summed side by side: the block's threads form
``ROWS`` rows of ``head_dim / 4`` lanes, lane c of row r adds the 16-byte chunk c of partitions
``r, r + ROWS, ...``, four partitions per trip with all their loads issued first (the first four
before the softmax maxima are reduced), and the rows' sums meet in shared memory. (One thread per
output value walking every partition in turn waited out a load's latency per partition, serially.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

from numba import cuda, float32

from .attention_blocks import NEG_INF, locate, partition_keys
from . import common
from .common import SIMULATOR, compiled, launch, numba_type
from .intrinsics import await_previous_kernels, let_next_kernel_launch, load_f32_l2, load_f32x4, load_f32x4_l2
from .vector import is_bf16, to_stored

WARP = 32
THREADS = (2 if SIMULATOR else 4) * WARP
UNROLL = 4  # partitions a lane loads before it adds any
FULL_MASK = 0xFFFFFFFF


@functools.lru_cache(maxsize=None)
def _merge_kernel(head_dim: int, bf16: bool, launch_next: bool) -> Callable:
    """The merge kernel function for one head dim (a multiple of 4); ``bf16``: out holds bfloat16 bits;
    ``launch_next``: the next kernel may launch once this one has waited (``common.LAUNCH_NEXT_EARLY``)."""
    D = head_dim
    CHUNKS = D // 4  # 16-byte float32 chunks of a partial
    ROWS = max(1, THREADS // CHUNKS)  # partitions summed side by side
    WARPS = THREADS // WARP
    SUMS = ROWS * D  # shared float32: each row's sums
    as_stored = to_stored(bf16)

    @cuda.jit(device=True)
    def block_reduce(value, scratch, take_max):
        """The max (or sum) of ``value`` over the block, in every thread."""
        for offset in (16, 8, 4, 2, 1):
            other = cuda.shfl_xor_sync(FULL_MASK, value, offset)
            value = max(value, other) if take_max else value + other
        tid = cuda.threadIdx.x
        cuda.syncthreads()  # scratch may still be read by a previous reduction
        if tid % WARP == 0:
            scratch[tid // WARP] = value
        cuda.syncthreads()
        value = scratch[0]
        for w in range(1, WARPS):
            value = max(value, scratch[w]) if take_max else value + scratch[w]
        return value

    @cuda.jit(device=True)
    def load_batch(stats, partials, t, hq, first, p, parts, weights, values):
        """The maxima and chunks of partitions ``p, p + ROWS, ...`` (UNROLL of them, clamped to the
        last one) into registers, every load issued before any is used."""
        for u in range(UNROLL):
            pu = min(p + u * ROWS, parts - 1)
            weights[u] = stats[0, t, hq, pu]
            chunk_values = load_f32x4(partials, first + pu * D)
            for j in range(4):
                values[u, j] = chunk_values[j]

    @cuda.jit(device=True)
    def add_batch(p, parts, top, weights, values, acc):
        """``acc += exp(m - top) * chunk`` over the loaded partitions that exist."""
        for u in range(UNROLL):
            if p + u * ROWS < parts:
                w = math.exp(weights[u] - top)
                for j in range(4):
                    acc[j] += w * values[u, j]

    def merge(context_lens, query_start_loc, capacity, grain, stats, partials, out):
        await_previous_kernels()
        if launch_next:
            let_next_kernel_launch()
        t = cuda.blockIdx.x
        hq = cuda.blockIdx.y
        tid = cuda.threadIdx.x
        _, key_end = locate(t, query_start_loc, context_lens, capacity)
        if key_end <= 0:
            return
        part_keys = partition_keys(key_end, grain, partials.shape[2])
        parts = (key_end + part_keys - 1) // part_keys
        scratch = cuda.shared.array(WARPS, float32)
        sums = cuda.shared.array(SUMS, float32)
        acc = cuda.local.array(4, float32)
        weights = cuda.local.array(UNROLL, float32)
        values = cuda.local.array((UNROLL, 4), float32)
        row = tid // CHUNKS
        chunk = tid % CHUNKS
        first = ((t * partials.shape[1] + hq) * partials.shape[2]) * D + 4 * chunk  # partition 0's chunk
        # the first partitions' chunks are loaded before the max and sum need the stats (they do not
        # depend on them): their latency passes under the two block reductions
        if row < ROWS:
            load_batch(stats, partials, t, hq, first, row, parts, weights, values)
        top = NEG_INF
        for p in range(tid, parts, THREADS):
            top = max(top, stats[0, t, hq, p])
        top = block_reduce(top, scratch, True)
        total = float32(0)
        for p in range(tid, parts, THREADS):
            total += math.exp(stats[0, t, hq, p] - top) * stats[1, t, hq, p]
        total = block_reduce(total, scratch, False)

        if row < ROWS:
            for j in range(4):
                acc[j] = 0
            add_batch(row, parts, top, weights, values, acc)
            p = row + UNROLL * ROWS
            while p < parts:
                load_batch(stats, partials, t, hq, first, p, parts, weights, values)
                add_batch(p, parts, top, weights, values, acc)
                p += UNROLL * ROWS
            for j in range(4):
                sums[row * D + 4 * chunk + j] = acc[j]
        cuda.syncthreads()
        inv = float32(1) / total
        for d in range(tid, D, THREADS):
            value = float32(0)
            for r in range(ROWS):
                value += sums[r * D + d]
            out[t, hq, d] = as_stored(value * inv)

    return merge


@functools.lru_cache(maxsize=None)
def group_merger(head_dim: int, group: int, threads: int, as_stored: Callable) -> Callable:
    """The device function ``merge_group(t, g, parts, stats, partials, out)`` that the last partition
    block of a (token ``t``, KV head ``g``) calls (:func:`.attention_blocks.block_kernels`): the
    merge above for query heads ``g * group ..`` into ``out[t]``, each head by one warp of the
    block's ``threads``, lane c holding the 16-byte chunks ``c, c + 32, ...`` of the head's rows.

    The stats and partials were written by other blocks of the same kernel, so they are read from L2
    (``load_f32_l2`` / ``load_f32x4_l2``): this SM's L1 may hold a line of them from before they
    were written (several heads' stats share a line)."""
    D, G = head_dim, group
    CHUNKS = D // 4
    WARPS = threads // WARP
    IN_FLIGHT = 4  # partitions a lane loads before it adds any (8 takes the split kernel to 194 registers)

    @cuda.jit(device=True)
    def warp_reduce(value, take_max):
        for offset in (16, 8, 4, 2, 1):
            other = cuda.shfl_xor_sync(FULL_MASK, value, offset)
            value = max(value, other) if take_max else value + other
        return value

    @cuda.jit(device=True)
    def merge_group(t, g, parts, stats, partials, out):
        lane = cuda.threadIdx.x % WARP
        weights = cuda.local.array(IN_FLIGHT, float32)
        values = cuda.local.array((IN_FLIGHT, 4), float32)
        acc = cuda.local.array(4, float32)
        for h in range(cuda.threadIdx.x // WARP, G, WARPS):
            hq = g * G + h
            # each lane's partitions' online-softmax state, then the warp's
            top = NEG_INF
            total = float32(0)
            row = (t * stats.shape[2] + hq) * stats.shape[3]  # of stats[0, t, hq]
            sums = stats.shape[1] * stats.shape[2] * stats.shape[3]  # stats[1] from stats[0]
            for p in range(lane, parts, WARP):
                m = load_f32_l2(stats, row + p)[0]
                l = load_f32_l2(stats, sums + row + p)[0]
                if m > top:
                    total = total * math.exp(top - m) + l
                    top = m
                else:
                    total += l * math.exp(m - top)
            block_top = warp_reduce(top, True)
            total = total * math.exp(top - block_top) if top != NEG_INF else float32(0)
            total = warp_reduce(total, False)
            inv = float32(1) / total
            for chunk in range(lane, CHUNKS, WARP):
                for j in range(4):
                    acc[j] = 0
                first = ((t * partials.shape[1] + hq) * partials.shape[2]) * D + 4 * chunk
                p = 0
                while p < parts:
                    for u in range(IN_FLIGHT):  # every load of the batch issued before any is used
                        pu = min(p + u, parts - 1)
                        weights[u] = load_f32_l2(stats, row + pu)[0]
                        chunk_values = load_f32x4_l2(partials, first + pu * D)
                        for j in range(4):
                            values[u, j] = chunk_values[j]
                    for u in range(IN_FLIGHT):
                        if p + u < parts:
                            w = math.exp(weights[u] - block_top)
                            for j in range(4):
                                acc[j] += w * values[u, j]
                    p += IN_FLIGHT
                for j in range(4):
                    out[t, hq, 4 * chunk + j] = as_stored(acc[j] * inv)

    return merge_group


def merge_partitions(
    context_lens: Any, query_start_loc: Any, capacity: int, grain: int, stats: Any, partials: Any, out: Any,
) -> None:
    """Launch the merge of ``partials [tokens, heads, parts, D]`` and ``stats [2, tokens, heads,
    parts]`` (C-contiguous float32, 16-byte aligned) into ``out [tokens, heads, D]`` (float32,
    float16 or bfloat16 bits): each token's range cut into ``parts`` partitions of a multiple of
    ``grain`` keys (:func:`.attention_blocks.partition_keys`), as the partition kernels cut it."""
    tokens, heads, _, dim = partials.shape
    kernel = compiled(
        _merge_kernel(dim, is_bf16(out.dtype), common.LAUNCH_NEXT_EARLY),
        "void(int32[::1], int32[::1], int64, int32, float32[:, :, :, ::1], float32[:, :, :, ::1], "
        f"{numba_type(out.dtype)}[:, :, :])",
    )
    launch(kernel, (tokens, heads), THREADS, (context_lens, query_start_loc, capacity, grain, stats, partials, out))
