"""Prefill attention on tensor cores, FlashAttention-2 style, over a paged (or static) KV cache.

Same semantics as :func:`.reference.paged_attention`; :func:`.attention.paged_attention` sends a
float16 step here when the caller says it holds long prefills (``max_query_len``).

Geometry (from shapes only: the host cannot read ``query_start_loc`` without a sync). A block
owns up to ``BQ`` consecutive queries (64 on mma.sync, 128 on wgmma: :func:`variant`) of ONE
sequence and one query head, so K/V tiles always come from one block table and tiles never
straddle sequences. Sequence b's query tiles get the virtual indices ``qsl[b] // BQ + b + i``
(i = 0 .. ceil(n_b / BQ) - 1): these ranges are disjoint and increasing in b, and all lie below
``T // BQ + B``, so the grid is ``(Hq, T // BQ + B)`` and a block finds its sequence by binary
search over ``qsl[b] // BQ + b`` (a block landing in a gap between two sequences' ranges exits at
once). A decode token in a mixed batch thus gets a block of its own, which streams its context once.
Blocks run in reverse order of that index so that the long tails of causal prefills start first;
the query heads of one GQA group are neighbouring blocks, so they read the same K/V tiles out of L2.

In a block, ``BQ / 16`` warps each own 16 query rows. Shared memory (dynamic: 80 KB at head_dim
128, 64 queries and the dispatched ring of 2) holds the Q tile and a ring of ``kv_stages`` (K, V)
tile pairs of ``BKV = 64`` keys, rows of ``2 * head_dim`` bytes whose 16-byte chunk c is stored at
``c ^ (row % 8)`` so that ldmatrix (8 rows, one chunk column per phase) reads every bank once. Per
K/V tile j, one wait and one barrier:

1. wait for tile j's copies, barrier (everyone is also done with tile j - 1); issue the copies of
   tile ``j + kv_stages - 1`` into tile j - 1's stage (cp.async), which have the whole tile's
   compute to land;
2. ``S = Q K_j^T`` on mma.sync m16n8k16 (Q fragments stay in registers for the whole block; K
   fragments by ldmatrix, K stored ``[key][d]`` being mma's "col" B operand);
3. online softmax in float32 on S in registers: causal mask only on tiles that cross the diagonal
   (query row r sees keys ``0 .. L - n + first + r``), row max and the rescale factor through two
   quad shuffles (the 4 lanes of a row), exp2 with the scale folded in; each lane keeps its own
   part of the row sum, added across the quad once at the end;
4. ``O += P V_j``: the S accumulators of two neighbouring 8-key tiles are exactly the A fragment of
   one 16-key step (packed to f16x2), V by ``ldmatrix.trans``.

On an H200 the ring of 2 beat a single K and V tile pipeline (two barriers a tile) by 4%, and a
ring of 3 did not beat it (bench/RESULTS.md).

With ``wgmma`` (Hopper only; dispatched there with blocks of 128 queries:
:func:`variant`) each warpgroup of 4 warps runs its 64 rows on :mod:`.wgmma`. ``S = Q K^T`` is one
m64n64k16 per 16 columns of the head, both operands read from shared memory, so the Q fragments no
longer take 4 registers per k-step for the whole block and K needs no ldmatrix. ``O += P V`` is
one m64n<head_dim>k16 per 16 keys with P from registers (the S accumulators packed as in step 4:
wgmma's accumulators are laid out as mma.sync's fragments) and V read MN-major, so V needs no
``ldmatrix.trans``. Q, K and V tiles are then stored in panels of 64 columns (128-byte rows,
chunk ``c`` of row ``r`` at ``c ^ (r % 8)``, each panel 1024-byte aligned: wgmma's 128-byte swizzle).
On an H200 this took 8K prefill attention from 0.43x of SDPA (mma.sync) to 0.56x (bench/RESULTS.md).

Query rows past the sequence's end are zero-filled, computed and never stored; keys past the
causal range are zero-filled and masked. Preconditions (checked by the dispatcher): float16, head
dim 64 or 128, paged block size a power of two (any static length), q 16-byte aligned with
element strides that are multiples of 8, caches 16-byte aligned.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from numba import cuda, float32, int32, int64, uint32

from .common import STATIC_SHARED_BYTES, TENSOR_CORES, compiled, launch
from .intrinsics import (
    aligned16,
    await_previous_kernels,
    cp_async_16,
    cp_async_commit,
    cp_async_wait_group,
    ldmatrix_x4,
    ldmatrix_x4_trans,
    pack_f16x2,
    shared_address,
)
from .mma import mma_accumulate
from .vector import element_strides, flat_view, inline_device
from .wgmma import (
    MMA_RS_BY_WIDTH, SWIZZLE_ROW, fence_proxy_async, hold_registers, mn_major_k_step, swizzled_k_step, wgmma_commit,
    wgmma_fence, wgmma_m64n64k16, wgmma_wait,
)
from .wgmma import enabled as wgmma_enabled

# The switch: off (common.TENSOR_CORES, INFINILM_NB_TENSOR_CORES=0) keeps every step on the CUDA-core
# attention kernel.
ENABLED = TENSOR_CORES
MIN_QUERIES = 32  # steps whose longest query run is shorter stay on the CUDA-core kernel
HEAD_DIMS = (64, 128)

WARP = 32
BLOCK_QUERIES = (64, 128)  # queries per block (4 or 8 warps of 16 rows) a kernel may have
BKV = 64  # keys per K/V tile
FULL_MASK = 0xFFFFFFFF
NEG_INF = np.float32(-np.inf)
LOG2E = 1.4426950408889634
STATIC_SHIFT = 31  # a static cache is one block per sequence: every key is in logical block 0
# The dispatched variants (:func:`variant`): (K, V) tile pairs of the ring, and queries per block on
# mma.sync and on wgmma. On an H200 3 pairs did not beat 2; on mma.sync 128-query blocks did not beat
# 64, on wgmma they did at 8K (bench/RESULTS.md).
KV_STAGES = 2
QUERY_ROWS = 64
WGMMA_QUERY_ROWS = 128
PANEL = SWIZZLE_ROW  # wgmma: bytes of a panel row (64 float16), the 128-byte swizzle's row
SWIZZLE_ATOM = 1024  # wgmma: the swizzle repeats every 8 panel rows, and a panel starts on it


def variant() -> tuple[int, int, bool]:
    """``(kv_stages, block_q, wgmma)`` of the kernel a launch takes: wgmma where
    :func:`.wgmma.enabled` (a Hopper), else mma.sync."""
    if wgmma_enabled():
        return KV_STAGES, WGMMA_QUERY_ROWS, True
    return KV_STAGES, QUERY_ROWS, False


def shared_bytes(head_dim: int, kv_stages: int, block_q: int = 64, wgmma: bool = False) -> int:
    """Shared memory of a block: the Q tile of ``block_q`` rows, then ``kv_stages`` (K, V) tile pairs
    (with wgmma, and room to start them on a swizzle atom)."""
    return (block_q + 2 * BKV * kv_stages) * 2 * head_dim + (SWIZZLE_ATOM if wgmma else 0)


def threads(block_q: int) -> int:
    """Threads of a block of ``block_q`` queries: a warp per 16 query rows."""
    return WARP * (block_q // 16)


@lru_cache(maxsize=None)
def prefill_kernel(head_dim: int, kv_stages: int = 2, block_q: int = 64, wgmma: bool = False) -> Callable:
    """The kernel for one head dim (64 or 128); signature :data:`SIGNATURE`, grid ``(Hq, T // block_q
    + B)`` of :func:`threads` threads, :func:`shared_bytes` of shared memory (dynamic past 48 KB).

    ``kv_stages``: the (K, V) tile pairs of the ring (2 or more): tile ``j + kv_stages - 1`` is copied
    while the warps compute on tile ``j``. ``block_q``: 64 (4 warps) or 128 queries (8 warps, which
    halves the K and V bytes copied per query). ``wgmma``: ``S = Q K^T`` and ``O += P V`` on Hopper's
    wgmma (module doc)."""
    if kv_stages < 2:
        raise ValueError(f"kv_stages must be at least 2 (a ring of K/V tile pairs), got {kv_stages}")
    if block_q not in BLOCK_QUERIES:
        raise ValueError(f"block_q must be one of {BLOCK_QUERIES}, got {block_q}")
    D = head_dim
    BQ = block_q
    THREADS = threads(block_q)
    STAGES = kv_stages
    CH = D // 8  # 16-byte chunks per row
    ROW = 2 * D  # bytes per shared row
    PER_PASS = THREADS // CH  # rows one pass of the block's copies covers
    Q_LOADS = BQ // PER_PASS
    KV_LOADS = BKV // PER_PASS
    KT = D // 16  # k-steps of S = Q K^T
    NT_S = BKV // 8  # 8-key n tiles of S
    NT_O = D // 8  # 8-wide n tiles of O
    PK = BKV // 16  # k-steps of O += P V
    P_WORDS = PK * 4  # wgmma: P's A fragments, packed float16 pairs
    QF = KT * 4  # Q fragment words
    S_ACC = NT_S * 4
    O_ACC = NT_O * 4
    K_OFFSET = BQ * ROW  # stage s: its K tile at K_OFFSET + s * STAGE_BYTES, its V tile BKV rows on
    V_OFFSET = K_OFFSET + BKV * ROW
    STAGE_BYTES = 2 * BKV * ROW
    SMEM_WORDS = shared_bytes(head_dim, kv_stages, block_q, wgmma) // 4
    WGMMA = wgmma
    PV_MMA = MMA_RS_BY_WIDTH[D]
    # Q, K and V rows: D * 2 bytes with mma.sync; 128-byte rows of 64-column panels with wgmma
    PANEL_ROW = PANEL if WGMMA else ROW
    Q_PANEL, KV_PANEL = BQ * PANEL, BKV * PANEL  # wgmma: bytes from one panel of a tile to the next
    DYNAMIC = SMEM_WORDS * 4 > STATIC_SHARED_BYTES  # then opted in at launch
    Q_PENDING = STAGES - 1  # commit groups after Q's: the K/V tiles of the prologue
    TILE_PENDING = STAGES - 2  # groups allowed in flight once a tile must have landed

    @inline_device
    def fill_rows(kv_row, table, start, kv_end, key0, block_size, block_shift, block_mask, kv_heads, kvh):
        """The cache row (slot * Hk + kv head) of each key this thread copies in the tile from key
        ``start``; -1 past ``kv_end``. Branch-free (keys past the end look up the last key's
        block), in int32, with an unsigned table index (no negative-index wrap-around code)."""
        for i in range(KV_LOADS):
            key = start + key0 + i * PER_PASS
            clamped = min(key, kv_end - 1)
            block = table[uint32(clamped >> block_shift)]
            row = (block * block_size + (clamped & block_mask)) * kv_heads + kvh
            kv_row[i] = row if key < kv_end else -1

    @inline_device
    def copy_tile(cache, kv_row, dst, c, row_bytes):
        """cp.async this thread's chunks of one K or V tile (zeros for rows of -1) to ``dst``, its
        rows ``row_bytes`` apart."""
        for i in range(KV_LOADS):
            row = kv_row[i]
            src = int64(row) * D + c * 8 if row >= 0 else 0
            cp_async_16(dst + i * PER_PASS * row_bytes, cache, src, 16 if row >= 0 else 0)

    @inline_device
    def scores(s, qf, k_tile, k_frag):
        """``s = Q K^T`` for the K tile at shared address ``k_tile`` (mma.sync, K by ldmatrix)."""
        for i in range(S_ACC):
            s[i] = 0
        for kk in range(KT):
            for p in range(NT_S // 2):
                v = ldmatrix_x4(k_tile + (k_frag ^ (kk << 5)) + p * 16 * ROW)
                for half in range(2):
                    i = (2 * p + half) * 4
                    a = 4 * kk
                    mma_accumulate(s, i, qf[a], qf[a + 1], qf[a + 2], qf[a + 3], v[2 * half], v[2 * half + 1])

    @inline_device
    def scores_wgmma(s, q_rows, k_tile):
        """``s = Q K^T`` on wgmma for the warpgroup's 64 Q rows (from shared address ``q_rows`` in each
        Q panel) and the K tile at ``k_tile``: an m64n64k16 per 16 head columns, the first one
        overwriting ``s``; waits for them."""
        hold_registers(s, S_ACC)
        wgmma_fence()
        for kk in range(KT):
            wgmma_m64n64k16(s, 0, swizzled_k_step(q_rows, kk, Q_PANEL), swizzled_k_step(k_tile, kk, KV_PANEL), kk)
        wgmma_commit()
        wgmma_wait(0)
        hold_registers(s, S_ACC)

    @inline_device
    def accumulate_wgmma(o, s, v_tile):
        """``o += P V`` on wgmma for the warpgroup: P's A fragments from ``s`` as in :func:`accumulate`,
        V (MN-major panels) at shared address ``v_tile``; waits for it."""
        p = cuda.local.array(P_WORDS, uint32)
        for i in range(P_WORDS):
            p[i] = pack_f16x2(s[2 * i], s[2 * i + 1])
        hold_registers(o, O_ACC)
        hold_registers(p, P_WORDS)
        wgmma_fence()
        for kk in range(PK):
            v_step = mn_major_k_step(v_tile, kk, KV_PANEL)
            PV_MMA(o, 0, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3], v_step, 1)
        wgmma_commit()
        wgmma_wait(0)
        hold_registers(o, O_ACC)

    @inline_device
    def softmax(s, o, kv0, kv_min, key_end, row_max, row_sum, t, scale_log2):
        """Online softmax of the tile's scores, in log2 units: ``s`` becomes P, ``o`` is rescaled.
        s[4 ni + 2 r + e]: row r, key kv0 + 8 ni + 2 t + e. The causal mask only where a row ends
        inside the tile."""
        masked = kv0 + BKV > kv_min
        for r in range(2):
            top = NEG_INF
            for ni in range(NT_S):
                for e in range(2):
                    i = 4 * ni + 2 * r + e
                    x = s[i] * scale_log2
                    if masked and kv0 + 8 * ni + 2 * t + e >= key_end[r]:
                        x = NEG_INF
                    s[i] = x
                    top = max(top, x)
            top = max(top, cuda.shfl_xor_sync(FULL_MASK, top, 1))
            top = max(top, cuda.shfl_xor_sync(FULL_MASK, top, 2))
            new_max = max(row_max[r], top)
            shift = new_max if new_max != NEG_INF else float32(0)  # no key yet: keep exp2 finite
            alpha = math.exp2(row_max[r] - shift)
            row_max[r] = new_max
            total = float32(0)
            for ni in range(NT_S):
                for e in range(2):
                    i = 4 * ni + 2 * r + e
                    p_value = math.exp2(s[i] - shift)
                    s[i] = p_value
                    total += p_value
            row_sum[r] = row_sum[r] * alpha + total
            for nt in range(NT_O):
                o[4 * nt + 2 * r] *= alpha
                o[4 * nt + 2 * r + 1] *= alpha

    @inline_device
    def accumulate(o, s, v_tile, v_frag):
        """``o += P V`` for the V tile at shared address ``v_tile``: P's A fragment for keys 16 kk ..
        is the S accumulators of n tiles 2 kk and 2 kk + 1; V by ``ldmatrix.trans``."""
        for kk in range(PK):
            i0 = 8 * kk
            a0 = pack_f16x2(s[i0], s[i0 + 1])
            a1 = pack_f16x2(s[i0 + 2], s[i0 + 3])
            a2 = pack_f16x2(s[i0 + 4], s[i0 + 5])
            a3 = pack_f16x2(s[i0 + 6], s[i0 + 7])
            for dp in range(NT_O // 2):
                v = ldmatrix_x4_trans(v_tile + (v_frag ^ (dp << 5)) + kk * 16 * ROW)
                for half in range(2):
                    i = (2 * dp + half) * 4
                    mma_accumulate(o, i, a0, a1, a2, a3, v[2 * half], v[2 * half + 1])

    def kernel(
        q, q_token_stride, q_head_stride, k_cache, v_cache, block_tables, context_lens, query_start_loc,
        block_size, block_shift, block_mask, kv_heads, group, scale_log2, out, out_token_stride, out_head_stride,
        tokens,
    ):  # fmt: skip
        await_previous_kernels()
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        g = lane // 4
        t = lane % 4
        h = cuda.blockIdx.x
        kvh = h // group
        virtual = cuda.gridDim.y - 1 - cuda.blockIdx.y

        # The sequence: the last b with qsl[b] // BQ + b <= virtual; then its query tile.
        num_seqs = context_lens.shape[0]
        lo = 0
        hi = num_seqs - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if query_start_loc[mid] // BQ + mid <= virtual:
                lo = mid
            else:
                hi = mid - 1
        b = lo
        start = int64(query_start_loc[b])
        n = int64(query_start_loc[b + 1]) - start
        first = (virtual - start // BQ - b) * BQ  # the tile's first query, counted in the sequence
        token0 = start + first
        rows = min(int64(BQ), n - first, tokens - token0)  # q has `tokens` rows, whatever qsl says
        if first < 0 or rows <= 0:
            return
        # key counts fit int32 (a context is at most the block-table width times the block size)
        capacity = int32(block_tables.shape[1] * block_size)
        past = int32(context_lens[b] - n)  # keys before the sequence's first query
        kv_end = min(int32(past + first + rows), capacity)  # keys the tile's last row sees
        kv_min = int32(past + first + 1)  # keys every row sees
        table = block_tables[b]

        # ldmatrix / cp.async: 16-byte rows
        if DYNAMIC:
            smem = cuda.shared.array(0, float32, alignment=128)
        else:
            smem = cuda.shared.array(SMEM_WORDS, float32, alignment=128)
        base = int32(shared_address(smem, 0))
        if WGMMA:
            base = (base + SWIZZLE_ATOM - 1) & -SWIZZLE_ATOM
        c = tid % CH
        key0 = tid // CH  # this thread copies chunk c of rows key0 + i * PER_PASS
        swizzled = (c ^ (key0 % 8)) << 4  # PER_PASS is a multiple of 8: one swizzle for all its rows
        kv_dst = key0 * ROW + swizzled  # V (and with mma.sync K and Q): this thread's first chunk
        # wgmma: chunk c of a Q or K row is chunk c % 8 of panel c // 8
        qk_dst = key0 * PANEL + (((c % 8) ^ (key0 % 8)) << 4) if WGMMA else kv_dst
        q_dst = qk_dst + (c // 8) * Q_PANEL if WGMMA else kv_dst
        k_dst = qk_dst + (c // 8) * KV_PANEL if WGMMA else kv_dst  # K, and with wgmma V

        # Q tile (rows past the sequence zero-filled): one commit group.
        for i in range(Q_LOADS):
            r = key0 + i * PER_PASS
            src = (token0 + r) * q_token_stride + h * q_head_stride + c * 8
            cp_async_16(base + q_dst + i * PER_PASS * PANEL_ROW, q, src if r < rows else 0, 16 if r < rows else 0)
        cp_async_commit()
        kv_row = cuda.local.array(KV_LOADS, int32)
        # tiles 0 .. STAGES - 2, K and V: one commit group each (empty past the keys)
        for stage in range(STAGES - 1):
            if stage * BKV < kv_end:
                fill_rows(kv_row, table, int32(stage * BKV), kv_end, key0, block_size, block_shift, block_mask,
                          kv_heads, kvh)
                copy_tile(k_cache, kv_row, base + K_OFFSET + stage * STAGE_BYTES + k_dst, c, PANEL_ROW)
                copy_tile(v_cache, kv_row, base + V_OFFSET + stage * STAGE_BYTES + k_dst, c, PANEL_ROW)
            cp_async_commit()

        # Q fragments, kept for the whole block: A tile of the warp's 16 rows at k-step kk. Lane l
        # addresses row l % 16, chunk 2 kk + l // 16; with row % 8 == l % 8 the swizzled chunk is
        # (l // 16 ^ l % 8) ^ 2 kk, i.e. the k-step XORs bits 5.. of the byte offset.
        cp_async_wait_group(Q_PENDING)  # Q landed; the K/V groups after it may not have
        if WGMMA:
            fence_proxy_async()  # the landed copies visible to wgmma's reads
        cuda.syncthreads()
        qf = cuda.local.array(QF, uint32)
        if not WGMMA:
            q_frag = (warp * 16 + lane % 16) * ROW + (((lane // 16) ^ (lane % 8)) << 4)
            for kk in range(KT):
                v = ldmatrix_x4(base + (q_frag ^ (kk << 5)))
                for j in range(4):
                    qf[4 * kk + j] = v[j]
        q_rows = base + (warp // 4) * 64 * PANEL  # wgmma: the warpgroup's first Q row in a panel
        # K pair p (keys 16p ..): lane l addresses key l % 8 + 8 (l // 16), chunk 2 kk + (l // 8) % 2.
        k_frag = (lane % 8 + 8 * (lane // 16)) * ROW + ((((lane // 8) % 2) ^ (lane % 8)) << 4)
        # V at k-step kk (keys 16 kk ..), d pair dp: lane l addresses key l % 8 + 8 ((l // 8) % 2),
        # chunk 2 dp + l // 16 (transposed: B[k][n] = V[key][d]).
        v_frag = (lane % 8 + 8 * ((lane // 8) % 2)) * ROW + (((lane // 16) ^ (lane % 8)) << 4)

        # This lane's two rows (g and g + 8 of the warp's 16): causal key ends, running max / sum.
        key_end = cuda.local.array(2, int32)
        row_max = cuda.local.array(2, float32)
        row_sum = cuda.local.array(2, float32)
        for r in range(2):
            key_end[r] = min(int32(past + first + warp * 16 + g + 8 * r + 1), capacity)
            row_max[r] = NEG_INF
            row_sum[r] = 0
        o = cuda.local.array(O_ACC, float32)
        for i in range(O_ACC):
            o[i] = 0
        s = cuda.local.array(S_ACC, float32)

        read = int32(0)  # the stage computed on
        write = int32(STAGES - 1)  # the stage refilled
        for kv0 in range(int32(0), kv_end, BKV):
            cp_async_wait_group(TILE_PENDING)
            if WGMMA:
                fence_proxy_async()
            cuda.syncthreads()  # tile kv0 landed for all; all are done with the previous (stage `write`)
            ahead = kv0 + (STAGES - 1) * BKV
            if ahead < kv_end:
                fill_rows(kv_row, table, ahead, kv_end, key0, block_size, block_shift, block_mask, kv_heads, kvh)
                copy_tile(k_cache, kv_row, base + K_OFFSET + write * STAGE_BYTES + k_dst, c, PANEL_ROW)
                copy_tile(v_cache, kv_row, base + V_OFFSET + write * STAGE_BYTES + k_dst, c, PANEL_ROW)
            cp_async_commit()
            if WGMMA:
                scores_wgmma(s, q_rows, base + K_OFFSET + read * STAGE_BYTES)
            else:
                scores(s, qf, base + K_OFFSET + read * STAGE_BYTES, k_frag)
            softmax(s, o, kv0, kv_min, key_end, row_max, row_sum, t, scale_log2)
            if WGMMA:
                accumulate_wgmma(o, s, base + V_OFFSET + read * STAGE_BYTES)
            else:
                accumulate(o, s, base + V_OFFSET + read * STAGE_BYTES, v_frag)
            read = read + 1 if read < STAGES - 1 else 0
            write = write + 1 if write < STAGES - 1 else 0

        for r in range(2):
            total = row_sum[r]
            total += cuda.shfl_xor_sync(FULL_MASK, total, 1)
            total += cuda.shfl_xor_sync(FULL_MASK, total, 2)
            inverse = float32(1) / total
            row = warp * 16 + g + 8 * r
            if row < rows:
                at = (token0 + row) * out_token_stride + h * out_head_stride + 2 * t
                for nt in range(NT_O):
                    for e in range(2):
                        out[at + 8 * nt + e] = o[4 * nt + 2 * r + e] * inverse

    return kernel


SIGNATURE = (
    "void(float16[::1], int64, int64, float16[::1], float16[::1], int32[:, ::1], int32[::1], int32[::1], "
    "int32, int32, int32, int32, int64, float32, float16[::1], int64, int64, int64)"
)


def usable(q: Any, k_cache: Any, v_cache: Any, block_size: int, static: bool, max_query_len: int | None) -> bool:
    """Whether this checked step may run here: the switch is on, the caller reports a query run of
    at least MIN_QUERIES, float16, a supported head dim and block size, 16-byte aligned copies."""
    if not ENABLED or max_query_len is None or max_query_len < MIN_QUERIES:
        return False
    if np.dtype(q.dtype) != np.float16 or q.shape[2] not in HEAD_DIMS:
        return False
    if not static and block_size & (block_size - 1):
        return False
    return all(s % 8 == 0 for s in element_strides(q)[:2]) and aligned16(q, k_cache, v_cache)


def prefill_attention(
    q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any, query_start_loc: Any,
    scale: float, out: Any, static: bool = False,
) -> None:
    """Launch the tensor-core prefill kernel on operands checked by :mod:`.attention` (see :func:`usable`).

    ``static``: block_tables is a static cache's ``cache_slots[:, None]``, one block of
    ``k_cache.shape[1]`` keys per sequence (any length, not only powers of two).
    """
    tokens, q_heads, dim = q.shape
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    if static:
        shift, mask = STATIC_SHIFT, (1 << STATIC_SHIFT) - 1
    else:
        shift, mask = block_size.bit_length() - 1, block_size - 1
    q_strides, out_strides = element_strides(q), element_strides(out)
    kv_stages, block_q, wgmma = variant()
    kernel = compiled(prefill_kernel(dim, kv_stages, block_q, wgmma), SIGNATURE)
    grid = (q_heads, tokens // block_q + context_lens.shape[0])  # every virtual tile index (module doc)
    launch(kernel, grid, threads(block_q), (
        flat_view("paged_attention", "q", q), q_strides[0], q_strides[1], k_cache.reshape(-1), v_cache.reshape(-1),
        block_tables, context_lens, query_start_loc, block_size, shift, mask, kv_heads, q_heads // kv_heads,
        np.float32(scale * LOG2E), flat_view("paged_attention", "out", out), out_strides[0], out_strides[1], tokens,
    ), shared_bytes(dim, kv_stages, block_q, wgmma))
