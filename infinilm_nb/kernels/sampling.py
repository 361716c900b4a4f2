"""Token sampling: greedy argmax, or Gumbel-max over the top-k ∩ top-p set; blocks per row.

A row is read a few times and never sorted or copied. Greedy rows and rows with neither top-k nor
top-p take one pass: the argmax of ``x`` or of ``x / T + gumbel(seed, i)``. Otherwise the kernel
finds the two cut-offs of :func:`reference.sampling_mask` as values of the row, by searching the
float32 bit patterns (mapped to ordered integers) for the largest value ``v`` whose tail ``{x >= v}``
still holds k tokens (top-k), or top_p of the softmax mass of the top-k set (top-p). Each pass
tests ``PIVOTS`` candidates at once, cutting the interval ``PIVOTS + 1`` ways, so ~11 passes cover
the 2**32 patterns. Both definitions keep boundary ties, as the reference does: top-k keeps
``x >= kth``; top-p keeps ``p >= p(v)``, since the largest ``t`` with ``mass(p >= t) >= top_p`` is the
probability of that ``v`` (p is monotone in x). Counts and masses are float32 block sums in a fixed
order, so a seed gives the same token on every run. The top-p search starts above the tokens too light
to matter (``NARROW_TOP_P``), which spares most of the row its ``exp`` in every pass.

One block per row is bound by memory latency, so each thread keeps ``CHUNKS`` loads in flight: of
16 bytes (chunks ``c, c + blockDim, ...`` of 8 float16 or bfloat16, or 4 float32) when the row length
is a multiple of the chunk and the rows are 16-byte aligned, else of single elements. A thread still
sees its indices in increasing order.

A row that takes one pass (greedy, or neither top-k nor top-p) is split over the grid's y blocks, up
to ``MAX_PARTS``, the same number of rounds of loads each: on a 128K vocabulary one block's 16
rounds of round trips were the whole kernel. Each block folds its winner into the row's slot of the
workspace (``atomicMax`` on the packed score and index, so the lowest index still wins a tie), and
the last block to count itself in (an atomic counter between fences) takes the slot, writes the
token and resets the slot and the counter for the next launch.

A row with a cut-off to search is searched by the blocks of its first thread block cluster (Hopper;
:func:`cluster_size` blocks, one where clusters cannot be launched); its other blocks return at once.
In each pass every block counts its share of the row's rounds, and the cluster adds up the blocks'
sums through their shared memory, in rank order, so that every block takes the same next interval.
Those blocks then draw the token over their slices of the row as a one-pass row's blocks do. The
cluster's size follows the number of rows, so a row's top-p masses are added in another order in a
batch of another size: the same seed can then draw another token where a mass lies within float32
rounding of the cut-off (counts, and so top-k, are exact in any order).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numba
import numpy as np
from numba import cuda

from .common import (
    SIMULATOR, WITH_BFLOAT16, active_clusters, cdiv, check_array, clusters_launch, compiled, kept, launch, numba_type,
)
from .intrinsics import await_previous_kernels, cluster_blocks, cluster_sync, load_shared_cluster
from .vector import inline_device, is_bf16, vector_width, widening_loader

THREADS = 64 if SIMULATOR else 512  # a multiple of WARP, at most WARP * MAX_WARPS
WARP = 32
MAX_WARPS = 32
FULL_MASK = 0xFFFFFFFF
PIVOTS = 8  # _block_sums is written for 8
# Loads a thread issues before it uses any, by load width (elements): one block per row is bound by
# memory latency, so what counts is the bytes in flight. 16 values a thread (32 bytes of float16 in
# 16-byte loads, against 16 bytes as single elements): at 24, ptxas (sm_90, 128 registers) puts the
# buffer on the stack.
CHUNKS = {1: 8, 4: 4, 8: 2}
MAX_REGISTERS = 128  # 512 threads of a block fit an SM's 64K registers (NVVM takes 130; ptxas: no spill at 128)
MAX_PARTS = 16  # blocks a one-pass row is split over: 16 rounds of 512 threads' loads cover 128K float16
MAX_CLUSTER = 8  # blocks a searched row is spread over: the largest cluster every Hopper launch may ask for
NO_BEST = np.int64(-(2**63))  # an empty slot of the workspace: below every packed (score, index)

NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
HALF = np.float32(0.5)
LOG2E = np.float32(1.4426950408889634)
INV_2_23 = np.float32(1.0 / (1 << 23))
# The top-p search starts at the value whose weight exp((x - max) / T) is (1 - top_p) / 2 of the mean
# weight: all the tokens below it weigh less than (1 - top_p) / 2 of the mass, so the cut-off (whose
# tail holds top_p of it) lies above, and the search passes skip their exp. From top_p 0.999 up the
# margin left (5e-4 of the mass) would near float32 rounding, so those rows search the whole row.
NARROW_TOP_P = np.float32(0.999)
GUMBEL_BOUND = np.float32(17.0)  # above every noise value: u <= 1 - 2**-24 gives g <= 16.64
# splitmix64 of reference.gumbel_noise; uint64 constants keep the arithmetic in uint64 (an int64
# operand would promote it to float64)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
U1 = np.uint64(1)
U27 = np.uint64(27)
U30 = np.uint64(30)
U31 = np.uint64(31)
U41 = np.uint64(41)
SIGN_FLIP = 0x7FFFFFFF
LOW32 = 0xFFFFFFFF

if SIMULATOR:

    def _float_bits(x):
        return np.float32(x).view(np.int32)

    def _bits_float(bits):
        return np.int32(bits).view(np.float32)

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def _float_bits(x):
        return libdevice.float_as_int(x)

    @cuda.jit(device=True)
    def _bits_float(bits):
        return libdevice.int_as_float(bits)


@cuda.jit(device=True)
def _key(x):
    """An int64 that orders like the float32 ``x`` (negative patterns have their magnitude flipped)."""
    key = numba.int64(_float_bits(x))
    if key < 0:
        key = key ^ SIGN_FLIP
    return key


@cuda.jit(device=True)
def _key_value(key):
    """The float32 whose :func:`_key` is ``key``."""
    if key < 0:
        key = key ^ SIGN_FLIP
    return _bits_float(numba.int32(key))


@cuda.jit(device=True)
def _weight(x, row_max, scale):
    """The unnormalised softmax weight ``exp((x - row_max) / T)`` of a logit, as ``2 ** ((x - row_max) *
    scale)`` with ``scale = log2(e) / T``: one ex2 where exp and a division took ~20 instructions, in
    the loop every search pass runs over the row."""
    return math.exp2((x - row_max) * scale)


@cuda.jit(device=True)
def _gumbel(seed, i):
    """``reference.gumbel_noise(seed, i + 1)[i]``, bit for bit up to the float32 logs."""
    z = seed + (numba.uint64(i) + U1) * GOLDEN
    z = (z ^ (z >> U30)) * MIX1
    z = (z ^ (z >> U27)) * MIX2
    z = z ^ (z >> U31)
    u = (numba.float32(z >> U41) + HALF) * INV_2_23
    inner = numba.float32(-math.log(u))
    return numba.float32(-math.log(inner))


@cuda.jit(device=True)
def _kept_half(low, high, upper, bit):
    """A reduce-scatter step across lanes ``bit`` apart: the lower lane's ``low`` plus its partner's,
    or the upper lane's ``high`` plus its partner's. Both go through the shuffle and the select is of
    sums: a select of two array elements becomes a select of their addresses, which keeps the array
    out of registers."""
    from_low = cuda.shfl_xor_sync(FULL_MASK, low, bit)
    from_high = cuda.shfl_xor_sync(FULL_MASK, high, bit)
    return high + from_high if upper else low + from_low


@cuda.jit(device=True)
def _block_sums(values, partial):
    """Replace the ``PIVOTS`` (8) ``values`` of every thread by their block-wide sums.

    Within a warp a reduce-scatter halves the values at each step (:func:`_kept_half`: 8 + 4 + 2
    shuffles, then 2 more for the last value), leaving lane ``l`` with the warp's sum of value
    ``4*b4 + 2*b3 + b2`` (b = the bits of ``l``); warps then meet in shared memory. The order of
    additions is fixed, so every run and every thread gets the same sums.
    """
    lane = cuda.threadIdx.x % WARP
    width = 4
    for bit in (16, 8):
        upper = (lane & bit) != 0
        for m in range(width):
            values[m] = _kept_half(values[m], values[m + width], upper, bit)
        width //= 2
    v = _kept_half(values[0], values[1], (lane & 4) != 0, 4)
    v += cuda.shfl_xor_sync(FULL_MASK, v, 2)
    v += cuda.shfl_xor_sync(FULL_MASK, v, 1)
    if lane % 4 == 0:
        partial[lane // 4, cuda.threadIdx.x // WARP] = v
    cuda.syncthreads()
    warps = cuda.blockDim.x // WARP
    for j in range(PIVOTS):
        total = partial[j, 0]
        for w in range(1, warps):
            total += partial[j, w]
        values[j] = total
    cuda.syncthreads()


@cuda.jit(device=True)
def _block_max(value, partial):
    """The block-wide maximum of an int64 ``value``."""
    offset = WARP // 2
    while offset > 0:
        value = max(value, cuda.shfl_xor_sync(FULL_MASK, value, offset))
        offset //= 2
    if cuda.threadIdx.x % WARP == 0:
        partial[cuda.threadIdx.x // WARP] = value
    cuda.syncthreads()
    value = partial[0]
    for w in range(1, cuda.blockDim.x // WARP):
        value = max(value, partial[w])
    cuda.syncthreads()
    return value


@cuda.jit(device=True)
def _cluster_sums(values, shared, blocks):
    """Replace the ``PIVOTS`` block-wide sums in ``values`` (alike in every thread) by their sums over the
    ``blocks`` of the cluster, added in rank order. ``shared``: float32 ``[2, PIVOTS]``, this block's sums
    then the totals."""
    if cuda.threadIdx.x == 0:
        for j in range(PIVOTS):
            shared[0, j] = values[j]
    cluster_sync()
    j = cuda.threadIdx.x
    if j < PIVOTS:
        total = ZERO
        for rank in range(blocks):
            total += load_shared_cluster(shared, j, rank)
        shared[1, j] = total
    cluster_sync()  # also: no block leaves, or writes its sums again, while another reads them
    for j in range(PIVOTS):
        values[j] = shared[1, j]


@cuda.jit(device=True)
def _cluster_extremes(low, high, shared, blocks):
    """The least ``low`` and the greatest ``high`` (int64, alike in every thread of a block) over the
    ``blocks`` of the cluster. ``shared``: int64 ``[2, 2]``, this block's (-low, high) then the totals."""
    if cuda.threadIdx.x == 0:
        shared[0, 0] = -low
        shared[0, 1] = high
    cluster_sync()
    j = cuda.threadIdx.x
    if j < 2:
        top = load_shared_cluster(shared, j, 0)
        for rank in range(1, blocks):
            top = max(top, load_shared_cluster(shared, j, rank))
        shared[1, j] = top
    cluster_sync()
    return -shared[1, 0], shared[1, 1]


@functools.lru_cache(maxsize=None)
def _sampler(vec: int, bf16: bool) -> Callable:
    """The sampler kernel for rows read ``vec`` elements at a time (8 float16 or bfloat16, or 4
    float32, in one 16-byte load, when the row length is a multiple and the rows are 16-byte
    aligned; else 1). Signature: :func:`kernel_signature`."""
    load = widening_loader(vec, bf16)
    chunks = CHUNKS[vec]
    span = chunks * vec

    @inline_device
    def load_round(row, c, buf):
        """``buf[u * vec + e]`` = element ``e`` of the row's chunk ``c + u * blockDim`` as float32, for
        the ``chunks`` chunks inside the row, all in flight before any is used (the rest of ``buf`` is
        left as it was)."""
        for u in range(chunks):
            at = (c + u * cuda.blockDim.x) * vec
            if at < row.shape[0]:
                values = load(row, at)
                for e in range(vec):
                    buf[u * vec + e] = values[e]

    @cuda.jit(device=True)
    def tails(row, floor, row_max, scale, mass, pivots, sums, partial, rank, blocks, cluster_s):
        """``sums[j]`` = count (or softmax mass) of the row's ``x >= pivots[j]`` among ``x >= floor``, over
        the ``blocks`` of the cluster; this one, of ``rank``, reads every ``blocks``-th round of chunks."""
        for j in range(PIVOTS):
            sums[j] = ZERO
        buf = cuda.local.array(span, numba.float32)
        c = cuda.threadIdx.x + rank * chunks * cuda.blockDim.x
        while c * vec < row.shape[0]:
            load_round(row, c, buf)
            for u in range(chunks):
                for e in range(vec):
                    x = buf[u * vec + e]
                    if (c + u * cuda.blockDim.x) * vec + e < row.shape[0] and x >= floor:
                        w = ONE
                        if mass:
                            w = _weight(x, row_max, scale)
                        for j in range(PIVOTS):
                            if x >= pivots[j]:
                                sums[j] += w
            c += blocks * chunks * cuda.blockDim.x
        _block_sums(sums, partial)
        _cluster_sums(sums, cluster_s, blocks)

    @cuda.jit(device=True)
    def cutoff(row, lo, hi, target, floor, row_max, scale, mass, pivots, sums, partial, rank, blocks, cluster_s):
        """The largest key in ``[lo, hi)`` whose tail (see ``tails``) reaches ``target``; the tail of
        ``lo`` must reach it. Tails only change at the row's values, so the answer is one of them."""
        while hi - lo > 1:
            width = hi - lo
            for j in range(PIVOTS):
                pivots[j] = _key_value(lo + width * (j + 1) // (PIVOTS + 1))
            tails(row, floor, row_max, scale, mass, pivots, sums, partial, rank, blocks, cluster_s)
            new_lo = lo
            new_hi = hi
            for j in range(PIVOTS - 1, -1, -1):
                key = lo + width * (j + 1) // (PIVOTS + 1)
                if sums[j] >= target:
                    new_lo = key
                    break
                new_hi = key
            lo = new_lo
            hi = new_hi
        return lo

    def kernel(logits, temperatures, top_ks, top_ps, seeds, best, finished, out):
        """Blocks ``(row, part)``; every branch depends on the row only, so whole blocks take it together.
        best, finished: the workspace, ``NO_BEST`` and 0 before and after the launch (module doc)."""
        await_previous_kernels()
        b = cuda.blockIdx.x
        part = cuda.blockIdx.y
        parts = cuda.gridDim.y
        row = logits[b]
        n = row.shape[0]
        pivots = cuda.local.array(PIVOTS, numba.float32)
        sums = cuda.local.array(PIVOTS, numba.float32)
        buf = cuda.local.array(span, numba.float32)
        partial = cuda.shared.array((PIVOTS, MAX_WARPS), numba.float32)
        partial_max = cuda.shared.array(MAX_WARPS, numba.int64)
        cluster_s = cuda.shared.array((2, PIVOTS), numba.float32)
        cluster_k = cuda.shared.array((2, 2), numba.int64)

        temperature = temperatures[b]
        greedy = temperature <= ZERO
        scale = ONE if greedy else LOG2E / temperature  # of the weights (_weight)
        top_k = top_ks[b]
        top_p = top_ps[b]
        use_k = not greedy and 0 < top_k < n
        use_p = not greedy and top_p < ONE
        # a row with cut-offs to search: the blocks of its first cluster, a one-pass row: all its blocks
        blocks = cluster_blocks() if use_k or use_p else parts
        if part >= blocks:
            return
        split = blocks > 1
        floor = NEG_INF
        row_max = ZERO
        p_floor = ZERO
        if use_k or use_p:
            low = POS_INF
            high = NEG_INF
            c = cuda.threadIdx.x + part * chunks * cuda.blockDim.x
            while c * vec < n:
                load_round(row, c, buf)
                for u in range(chunks):
                    for e in range(vec):
                        if (c + u * cuda.blockDim.x) * vec + e < n:
                            low = min(low, buf[u * vec + e])
                            high = max(high, buf[u * vec + e])
                c += blocks * chunks * cuda.blockDim.x
            min_key, max_key = _cluster_extremes(-_block_max(-_key(low), partial_max),
                                                 _block_max(_key(high), partial_max), cluster_k, blocks)
            row_max = _key_value(max_key)
            if use_k:
                floor = _key_value(
                    cutoff(row, min_key, max_key + 1, numba.float32(top_k), NEG_INF, row_max, scale, False,
                           pivots, sums, partial, part, blocks, cluster_s)
                )
            if use_p:
                for j in range(PIVOTS):
                    pivots[j] = floor
                tails(row, floor, row_max, scale, True, pivots, sums, partial, part, blocks, cluster_s)
                total = sums[0]
                search_floor = floor
                if top_p <= NARROW_TOP_P:
                    bound = row_max + temperature * math.log(HALF * (ONE - top_p) * total / numba.float32(n))
                    if bound > floor:
                        search_floor = bound
                p_cut = _key_value(
                    cutoff(row, _key(search_floor), max_key + 1, top_p * total, search_floor, row_max, scale,
                           True, pivots, sums, partial, part, blocks, cluster_s)
                )
                p_floor = _weight(p_cut, row_max, scale)

        # each thread sees its indices in increasing order, so a strict > keeps the lowest of equals;
        # a token whose x / T + GUMBEL_BOUND is below the thread's best cannot win: skip its noise
        # a split row: this block's whole rounds of chunks, a view from element ``start`` (16-byte
        # aligned: a multiple of the chunk)
        start = 0
        if split:
            round_size = span * cuda.blockDim.x
            per_part = round_size * ((n + round_size * blocks - 1) // (round_size * blocks))
            start = part * per_part
            row = row[start : min(n, start + per_part)]
        seed = seeds[b]
        top = NEG_INF
        best_index = cuda.threadIdx.x
        c = cuda.threadIdx.x
        while c * vec < row.shape[0]:
            load_round(row, c, buf)
            for u in range(chunks):
                for e in range(vec):
                    index = (c + u * cuda.blockDim.x) * vec + e
                    x = buf[u * vec + e]
                    if index >= row.shape[0]:
                        pass
                    elif greedy:
                        if x > top:
                            top = x
                            best_index = index
                    elif x >= floor:
                        scaled = x / temperature
                        if scaled + GUMBEL_BOUND >= top and (
                            not use_p or _weight(x, row_max, scale) >= p_floor
                        ):
                            score = scaled + _gumbel(seed, start + index)
                            if score > top:
                                top = score
                                best_index = index
            c += chunks * cuda.blockDim.x
        # one int64 orders (score, -index): the max is the argmax with the lowest index among equals
        # (+ 0 turns -0.0 into +0.0, which compare equal but have different keys)
        packed = (_key(top + ZERO) << 32) | (LOW32 - numba.int64(start + best_index))
        packed = _block_max(packed, partial_max)
        if cuda.threadIdx.x == 0:
            if split:  # the last block of the row to finish takes the row's best and clears the slot
                cuda.atomic.max(best, b, packed)
                cuda.threadfence()
                if cuda.atomic.add(finished, b, 1) == blocks - 1:
                    cuda.threadfence()
                    packed = cuda.atomic.exch(best, b, NO_BEST)
                    finished[b] = 0
                    out[b] = LOW32 - (packed & LOW32)
            else:
                out[b] = LOW32 - (packed & LOW32)

    return kernel


def kernel_signature(t: str) -> str:
    """The sampler kernel's signature for logits of numba type name ``t``."""
    return f"void({t}[:, ::1], float32[::1], int32[::1], float32[::1], uint64[::1], int64[::1], int32[::1], int32[::1])"


def sample(logits: Any, temperatures: Any, top_ks: Any, top_ps: Any, seeds: Any, out: Any) -> Any:
    """Launch the sampler; see :func:`infinilm_nb.kernels.reference.sample`."""
    check_array("sample", "logits", logits, (None, None), WITH_BFLOAT16)
    rows, vocab = logits.shape
    check_array("sample", "temperatures", temperatures, (rows,), (np.float32,))
    check_array("sample", "top_ks", top_ks, (rows,), (np.int32,))
    check_array("sample", "top_ps", top_ps, (rows,), (np.float32,))
    check_array("sample", "seeds", seeds, (rows,), (np.uint64,))
    check_array("sample", "out", out, (rows,), (np.int32,))
    if not 0 < vocab < 2**31:
        raise ValueError(f"sample: logits must have 1 to 2**31 - 1 columns, got {vocab}")
    if rows == 0:
        return out
    vec = vector_width(logits.dtype, (logits,), (vocab,))
    kernel = compiled(
        _sampler(vec, is_bf16(logits.dtype)), kernel_signature(numba_type(logits.dtype)),
        **({} if SIMULATOR else {"max_registers": MAX_REGISTERS}),
    )
    threads = min(THREADS, WARP * cdiv(vocab, WARP))  # no idle warps for a tiny vocabulary
    rounds = cdiv(vocab, threads * CHUNKS[vec] * vec)  # of all the block's loads in flight
    parts = cdiv(rounds, cdiv(rounds, MAX_PARTS))  # as many rounds each, none left empty
    cluster = cluster_size(parts, rows, lambda blocks: active_clusters(kernel, threads, (1, blocks)))
    best, finished = workspace(logits)
    launch(kernel, (rows, parts), threads, (logits, temperatures, top_ks, top_ps, seeds, best, finished, out),
           cluster=(1, cluster) if cluster > 1 else None)
    return out


def cluster_size(parts: int, rows: int, active: Callable[[int], int]) -> int:
    """The blocks of a row that search its cut-offs together, as a thread block cluster: the most, up to
    :data:`MAX_CLUSTER`, that divide its ``parts`` and whose clusters for all ``rows`` the GPU runs at once
    (``active(blocks)`` of them); else 1, as where clusters cannot be launched. A second wave of
    clusters would double the time (on an H200, 32 rows of 128256: 387 us in clusters of 2, 485 of 4,
    519 of 8; one row: 383, 241, 174; one block a row: 645)."""
    if not clusters_launch():
        return 1
    fitting = [d for d in range(2, min(parts, MAX_CLUSTER) + 1) if parts % d == 0 and rows <= active(d)]
    return max(fitting, default=1)


def workspace(logits: Any) -> tuple[Any, Any]:
    """The split rows' workspace for ``logits``' rows: kept per row count, array module and device
    (:func:`.common.kept`; ``best`` int64 at ``NO_BEST``, ``finished`` int32 at 0, as every launch
    leaves them). Launches that share one must not overlap (they run on one stream)."""
    rows = logits.shape[0]
    return kept(logits, ("sampler workspace", rows),
                lambda xp: (xp.full(rows, NO_BEST, dtype=np.int64), xp.zeros(rows, dtype=np.int32)))
