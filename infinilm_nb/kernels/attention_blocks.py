"""The blocks of paged decode attention, whatever does their inner work.

A block serves one (query token, KV head, context partition) and all the query heads of that KV
head's GQA group. Its key streams (lane groups on CUDA cores in :mod:`.attention`, warps on tensor
cores in :mod:`.attention_mma`) each run an online softmax over their share of the keys and leave
their unnormalised outputs, maxes and sums in shared memory (:class:`SharedLayout`);
:func:`stream_folder` rescales them to the block's max, and :func:`block_kernels` builds the two
kernels around an ``attend`` device function: the whole causal range normalised into ``out``, or one
partition's partial and its (max, sum) for the merge kernel of :mod:`.attention`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numba
import numpy as np
from numba import cuda

from .intrinsics import arrived_last, await_previous_kernels

NEG_INF = np.float32(-np.inf)  # a float32 constant, so that selects with it stay float32


@cuda.jit(device=True)
def partition_keys(key_end, grain, parts):
    """Keys per partition of a token whose causal range ends at ``key_end``, cut into ``parts``
    partitions of a multiple of ``grain`` keys (the last ones may be empty)."""
    grains = (key_end + grain - 1) // grain
    return grain * ((grains + parts - 1) // parts)


@cuda.jit(device=True)
def locate(t, query_start_loc, context_lens, capacity):
    """The sequence of query token ``t`` and the end of its causal key range (0: no sequence)."""
    num_seqs = context_lens.shape[0]
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if query_start_loc[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    if lo >= num_seqs or query_start_loc[lo] > t:
        return 0, 0
    start = query_start_loc[lo]
    queries = query_start_loc[lo + 1] - start
    key_end = context_lens[lo] - queries + (t - start) + 1
    return lo, min(key_end, capacity)


@functools.lru_cache(maxsize=None)
def row_finder(block_size: int, head_dim: int) -> Callable:
    """The device function ``cache_row(block_tables, b, key, kv_heads, g)``: the flat index of the
    first element of sequence ``b``'s ``key`` row for KV head ``g`` in a flat cache of blocks of
    ``block_size`` slots (a static cache: one block per sequence)."""
    BS, D = block_size, head_dim

    @cuda.jit(device=True)
    def cache_row(block_tables, b, key, kv_heads, g):
        logical = key // BS
        slot = block_tables[b, logical] * BS + (key - logical * BS)
        return (numba.int64(slot) * kv_heads + g) * D

    return cache_row


class SharedLayout(NamedTuple):
    """Float offsets of an attention block's shared state, for ``G`` heads and ``groups`` key streams
    (lane groups or warps): ``parts`` floats of unnormalised outputs ``[groups, G, D]``; then state:
    the block's max and sum per head (``0 .. 2 G``), each stream's max per head (from ``factors``;
    its rescale factor to the block's max once folded) and each stream's sum per head (from ``sums``)."""

    parts: int
    factors: int
    sums: int
    state: int


def shared_layout(head_dim: int, group: int, groups: int) -> SharedLayout:
    """The :class:`SharedLayout` of a block with ``groups`` key streams."""
    return SharedLayout(groups * group * head_dim, 2 * group, 2 * group + groups * group, 2 * group + 2 * groups * group)


@functools.lru_cache(maxsize=None)
def stream_folder(group: int, groups: int) -> Callable:
    """The device function ``fold(state_s)`` a block calls once each of its ``groups`` key streams has
    left its max (natural log units) and sum per head in ``state_s``: it puts the block's max and sum
    in ``state_s[h]``, ``state_s[G + h]`` and each stream's rescale factor in place of its max.
    Barriers on both sides."""
    G = group
    _, FACTORS, SUMS, _ = shared_layout(1, G, groups)

    @cuda.jit(device=True)
    def fold(state_s):
        cuda.syncthreads()
        tid = cuda.threadIdx.x
        if tid < G:  # one thread per head
            block_top = NEG_INF
            for w in range(groups):
                block_top = max(block_top, state_s[FACTORS + w * G + tid])
            block_total = numba.float32(0.0)
            for w in range(groups):
                factor = numba.float32(0.0)
                if state_s[FACTORS + w * G + tid] != NEG_INF:
                    factor = math.exp(state_s[FACTORS + w * G + tid] - block_top)
                block_total += state_s[SUMS + w * G + tid] * factor
                state_s[FACTORS + w * G + tid] = factor
            state_s[tid] = block_top
            state_s[G + tid] = block_total
        cuda.syncthreads()

    return fold


def split_workspace(t: str) -> str:
    """The partition kernels' arguments after those they share with the whole-range kernels: the
    partition grain, the workspace views, whether the last block merges, and out (numba type ``t``)."""
    return f"int32, float32[:, :, :, ::1], float32[:, :, :, ::1], int32[:, ::1], boolean, {t}[:, :, :]"


def block_kernels(
    attend: Callable, head_dim: int, group: int, groups: int, threads: int, block_size: int, as_stored: Callable,
    merges: bool = False,
) -> tuple[Callable, Callable]:
    """The (whole-range, partition) kernel functions around ``attend(q, k, v, block_tables, b, t, g,
    kv_heads, key_start, key_stop, scale, part_s, state_s)``, which leaves the :class:`SharedLayout`
    of ``groups`` key streams folded (:func:`stream_folder`); ``as_stored`` converts what ``out`` holds;
    ``merges``: the partition kernel holds the last block's merge (:func:`.attention_merge.group_merger`)."""
    from .attention_merge import group_merger  # it imports this module

    D, G, BS = head_dim, group, block_size
    PARTS, FACTORS, _, STATE = shared_layout(D, G, groups)
    merge_group = group_merger(D, G, threads, as_stored) if merges else None

    @cuda.jit(device=True)
    def combined(part_s, state_s, i):
        """Element ``i = h * D + d`` of the block's unnormalised output: the streams' parts, rescaled
        and added in a fixed order."""
        h = i // D
        value = numba.float32(0.0)
        for w in range(groups):
            value += part_s[w * G * D + i] * state_s[FACTORS + w * G + h]
        return value

    def whole_range(q, k, v, block_tables, context_lens, query_start_loc, kv_heads, scale, out):
        """One block per (token, KV head): the token's whole causal range, normalised into out."""
        await_previous_kernels()
        t = cuda.blockIdx.x
        g = cuda.blockIdx.y
        b, key_end = locate(t, query_start_loc, context_lens, block_tables.shape[1] * BS)
        if key_end <= 0:
            return
        part_s = cuda.shared.array(PARTS, numba.float32)
        state_s = cuda.shared.array(STATE, numba.float32)
        attend(q, k, v, block_tables, b, t, g, kv_heads, 0, key_end, scale, part_s, state_s)
        for i in range(cuda.threadIdx.x, G * D, threads):
            h = i // D
            out[t, g * G + h, i - h * D] = as_stored(combined(part_s, state_s, i) / state_s[G + h])

    def partition(
        q, k, v, block_tables, context_lens, query_start_loc, kv_heads, scale, grain, stats, partials,
        finished, merge_here, out,
    ):
        """One block per (token, KV head, partition): an unnormalised partial and its (max, sum). The
        token's range is cut into ``gridDim.z`` partitions of :func:`partition_keys` keys. With
        ``merge_here`` the last block of a (token, KV head) to finish merges its partitions into
        ``out`` (``finished``: int32 ``[tokens, KV heads]``, zero before and after the launch)."""
        await_previous_kernels()
        t = cuda.blockIdx.x
        g = cuda.blockIdx.y
        p = cuda.blockIdx.z
        b, key_end = locate(t, query_start_loc, context_lens, block_tables.shape[1] * BS)
        part_keys = partition_keys(key_end, grain, cuda.gridDim.z)
        key_start = p * part_keys
        if key_start >= key_end:
            return
        key_stop = min(key_end, key_start + part_keys)
        part_s = cuda.shared.array(PARTS, numba.float32)
        state_s = cuda.shared.array(STATE, numba.float32)
        # the partitions that hold keys: in shared memory, rather than a register across attend (the
        # tensor-core kernel's 166 would become 170, one block an SM less)
        merge_s = cuda.shared.array(1, numba.int32)
        if merges and cuda.threadIdx.x == 0:
            merge_s[0] = (key_end + part_keys - 1) // part_keys
        attend(q, k, v, block_tables, b, t, g, kv_heads, key_start, key_stop, scale, part_s, state_s)
        tid = cuda.threadIdx.x
        for i in range(tid, G * D, threads):
            h = i // D
            partials[t, g * G + h, p, i - h * D] = combined(part_s, state_s, i)
        if tid < G:
            stats[0, t, g * G + tid, p] = state_s[tid]
            stats[1, t, g * G + tid, p] = state_s[G + tid]
        if not (merges and merge_here):
            return
        # The last block to finish merges, and resets the count for the next launch.
        if arrived_last(finished, (t, g), merge_s[0]):
            merge_group(t, g, merge_s[0], stats, partials, out)
            if tid == 0:
                finished[t, g] = 0

    return whole_range, partition
