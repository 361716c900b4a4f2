"""KV-cache writes and causal attention over a paged (or static) KV cache.

Launchers: :func:`store_kv`, :func:`store_kv_static`, :func:`paged_attention`,
:func:`static_attention` (same signatures and semantics as ``reference.py``).

Attention design. The host cannot read ``query_start_loc`` or ``context_lens`` without a device
sync, so the launch geometry comes from shapes only: one block per (query token, KV head, context
partition). A block finds its token's sequence by binary search over ``query_start_loc``, so prefill
tokens (n > 1, causal, with or without a cached prefix) and decode tokens (n = 1) mix freely in one
launch. The block serves all ``Hq / Hk`` query heads that read its KV head, so each K/V row is
loaded once per GQA group. It walks its keys in tiles of ``TILE`` keys:

a. scores: groups of a few lanes (8 from head_dim 64) share a key, each lane a strided slice of
   the head dim, reduced with warp shuffles; written to shared memory with the key's cache row;
b. softmax: a warp (part of one, for small tiles) per query head folds the tile into its running
   (max, sum) state and turns the scores into probabilities;
c. values: each warp takes a share of the tile's keys, its lanes a strided slice of the head dim,
   and accumulates ``p * V`` for every head of the group in registers; the warps' sums meet in
   shared memory once, at the end.

Without a workspace a block covers a token's whole causal range and writes ``out``. With an
:class:`AttentionWorkspace` the range is cut into partitions processed by separate blocks (so one
long decode sequence fills the GPU); each writes its unnormalised partial and (max, sum), and a
second kernel merges them with the online-softmax rule.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import numba
import numpy as np
from numba import cuda

from .common import FLOAT_DTYPES, SIMULATOR, cdiv, check_array, check_same_dtype, compiled, launch_stream, numba_type

STORE_THREADS = 256
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
# Keys per tile, a power of two. The simulator uses small tiles so that tiny test contexts span
# several of them.
TILE = 16 if SIMULATOR else 64
# Default partition length of a workspace made by attention_workspace_shapes.
PARTITION_KEYS = 256
FULL_MASK = 0xFFFFFFFF
NEG_INF = np.float32(-np.inf)  # a float32 constant, so that selects with it stay float32
INT32 = np.dtype(np.int32)


# ----------------------------------------------------------------------------------- store_kv


def _store_kv_kernel(k, v, k_cache, v_cache, slots, positions, static):
    """One thread per (token, KV head, element); a negative slot skips its token.

    Paged: ``slots[t]`` is ``block * block_size + offset``. Static (``static != 0``): ``slots[t]`` is
    the cache row and ``positions[t]`` the offset in it.
    """
    heads = k.shape[1]
    dim = k.shape[2]
    per_token = heads * dim
    total = k.shape[0] * per_token
    block_size = k_cache.shape[1]
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < total:
        t = i // per_token
        r = i - t * per_token
        h = r // dim
        d = r - h * dim
        slot = slots[t]
        if slot >= 0:
            if static:
                block = slot
                offset = positions[t]
            else:
                block = slot // block_size
                offset = slot - block * block_size
            if block < k_cache.shape[0] and 0 <= offset < block_size:
                k_cache[block, offset, h, d] = k[t, h, d]
                v_cache[block, offset, h, d] = v[t, h, d]
        i += stride


def _check_store(op: str, k: Any, v: Any, k_cache: Any, v_cache: Any) -> None:
    check_array(op, "k", k, (None, None, None), FLOAT_DTYPES, contiguous=False)
    tokens, heads, dim = k.shape
    check_array(op, "v", v, (tokens, heads, dim), FLOAT_DTYPES, contiguous=False)
    check_array(op, "k_cache", k_cache, (None, None, heads, dim), FLOAT_DTYPES)
    check_array(op, "v_cache", v_cache, tuple(k_cache.shape), FLOAT_DTYPES)
    check_same_dtype(op, "k", k, v=v, k_cache=k_cache, v_cache=v_cache)


def _launch_store(k: Any, v: Any, k_cache: Any, v_cache: Any, slots: Any, positions: Any, static: int) -> None:
    if k.size == 0 or k_cache.size == 0:
        return
    t = numba_type(k.dtype)
    kernel = compiled(
        _store_kv_kernel,
        f"void({t}[:, :, :], {t}[:, :, :], {t}[:, :, :, ::1], {t}[:, :, :, ::1], int32[::1], int32[::1], int32)",
    )
    blocks = min(cdiv(k.size, STORE_THREADS), 65535)
    kernel[blocks, STORE_THREADS, launch_stream()](k, v, k_cache, v_cache, slots, positions, static)


def store_kv(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:
    """Write each token's K and V into a paged cache; see :func:`reference.store_kv`.

    k and v may be strided views into a fused QKV buffer (unit stride along the head dim).
    """
    _check_store("store_kv", k, v, k_cache, v_cache)
    check_array("store_kv", "slot_mapping", slot_mapping, (k.shape[0],), (INT32,))
    _launch_store(k, v, k_cache, v_cache, slot_mapping, slot_mapping, 0)


def store_kv_static(k: Any, v: Any, k_cache: Any, v_cache: Any, cache_slots: Any, positions: Any) -> None:
    """Write each token's K and V into a static cache; see :func:`reference.store_kv_static`."""
    _check_store("store_kv_static", k, v, k_cache, v_cache)
    check_array("store_kv_static", "cache_slots", cache_slots, (k.shape[0],), (INT32,))
    check_array("store_kv_static", "positions", positions, (k.shape[0],), (INT32,))
    _launch_store(k, v, k_cache, v_cache, cache_slots, positions, 1)


# ------------------------------------------------------------------------------- attention


class AttentionWorkspace(NamedTuple):
    """Scratch for split-context attention; allocate once (shapes: :func:`attention_workspace_shapes`).

    stats: float32 ``[2, tokens, Hq, partitions]``, the running max and sum of each partition;
    partials: float32 ``[tokens, Hq, partitions, head_dim]``, its unnormalised output. A step with
    more tokens than the workspace was sized for runs unsplit (it fills the GPU by itself); a
    context longer than ``partitions * PARTITION_KEYS`` gets longer partitions.
    """

    stats: Any
    partials: Any

    @classmethod
    def allocate(
        cls, xp: Any, num_tokens: int, num_heads: int, head_dim: int, max_context: int,
        partition_keys: int = PARTITION_KEYS,
    ) -> "AttentionWorkspace":
        """Allocate a workspace with ``xp`` (CuPy or NumPy) for steps of up to ``num_tokens`` tokens."""
        shapes = attention_workspace_shapes(num_tokens, num_heads, head_dim, max_context, partition_keys)
        return cls(**{name: xp.empty(shape, dtype=np.float32) for name, shape in shapes.items()})


def attention_workspace_shapes(
    num_tokens: int, num_heads: int, head_dim: int, max_context: int, partition_keys: int = PARTITION_KEYS
) -> dict[str, tuple[int, ...]]:
    """Shapes of the :class:`AttentionWorkspace` arrays (all float32).

    num_tokens: the most query tokens of a step that should split; num_heads: query heads (this
    rank's); max_context: the block-table width times the block size (or a static cache's max_len);
    partition_keys: keys per partition (smaller splits finer: more blocks, more merge traffic).
    """
    parts = max(1, cdiv(max_context, partition_keys))
    return {"stats": (2, num_tokens, num_heads, parts), "partials": (num_tokens, num_heads, parts, head_dim)}


@cuda.jit(device=True)
def _locate(t, query_start_loc, context_lens, capacity):
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


def _lanes_per_key(head_dim: int) -> int:
    """Lanes sharing one key in the score phase: 8 from head_dim 64 (a 16-byte fp16 slice each at
    64), fewer for small heads so that every lane keeps a few elements and reductions stay short."""
    return 8 if head_dim >= 64 else 4 if head_dim >= 16 else 2


def _block_threads(head_dim: int) -> int:
    """Threads per attention block: one per head-dim element, rounded up to whole warps."""
    return cdiv(head_dim, 32) * 32


@functools.lru_cache(maxsize=None)
def _attention_kernels(head_dim: int, group: int, tile: int) -> tuple[Callable, Callable]:
    """The (whole-range, partition) kernel functions for one head dim, GQA group size and tile.

    The sizes are closure constants, so loops unroll and per-thread arrays stay in registers.
    """
    D, G, TK = head_dim, group, tile
    NT = _block_threads(D)
    LPK = _lanes_per_key(D)
    EPL = D // LPK  # head-dim elements per lane in the score phase
    KPP = NT // LPK  # keys per score pass
    PASSES = cdiv(TK, KPP)
    NWARPS = NT // 32
    SPAN = min(32, TK)  # lanes per head in the softmax phase (TK is a power of two)
    HPW = 32 // SPAN  # heads per warp in the softmax phase
    SLICES = TK // SPAN
    HEAD_ROUNDS = cdiv(G, NWARPS * HPW)
    EPT = cdiv(D, 32)  # head-dim elements per lane in the value phase
    WHOLE_WARPS = EPT * 32 == D  # no idle lanes in the value phase
    KPW = cdiv(TK, NWARPS)  # keys per warp per tile in the value phase
    ACC_SIZE = G * EPT
    Q_SIZE = G * D
    S_SIZE = G * TK
    STAT_SIZE = 3 * G  # max, sum, rescale factor of each head

    @cuda.jit(device=True)
    def attend(q, k, v, block_tables, b, t, g, key_start, key_stop, block_size, scale, q_s, s_s, slot_s, stat_s):
        """Online softmax over keys ``key_start .. key_stop - 1``.

        Leaves each head's unnormalised output in ``q_s[h * D + d]`` and its running max and sum in
        ``stat_s[h]`` and ``stat_s[G + h]``.
        """
        tid = cuda.threadIdx.x
        lane = tid & 31
        warp = tid >> 5
        li = tid % LPK
        gi = tid // LPK
        for i in range(tid, Q_SIZE, NT):
            h = i // D
            q_s[i] = numba.float32(q[t, g * G + h, i - h * D]) * scale
        if tid < G:
            stat_s[tid] = NEG_INF
            stat_s[G + tid] = 0.0
        acc = cuda.local.array(ACC_SIZE, numba.float32)  # acc[h * EPT + i]: head h, element lane + 32 i
        for i in range(ACC_SIZE):
            acc[i] = 0.0
        kreg = cuda.local.array(EPL, numba.float32)
        cuda.syncthreads()
        for tile_start in range(key_start, key_stop, TK):
            # a. scores of this tile's keys for every head of the group
            for ps in range(PASSES):
                jj = ps * KPP + gi
                j = tile_start + jj
                jc = min(j, key_stop - 1)  # keys past the range load a valid row and score -inf
                logical = jc // block_size
                slot = block_tables[b, logical] * block_size + (jc - logical * block_size)
                for e in range(EPL):
                    kreg[e] = numba.float32(k[slot, g, e * LPK + li])
                for h in range(G):
                    part = numba.float32(0.0)
                    for e in range(EPL):
                        part += q_s[h * D + e * LPK + li] * kreg[e]
                    off = LPK // 2
                    while off > 0:
                        part += cuda.shfl_xor_sync(FULL_MASK, part, off)
                        off //= 2
                    if li == 0 and jj < TK:
                        s_s[h * TK + jj] = part if j < key_stop else NEG_INF
                if li == 0 and jj < TK:
                    slot_s[jj] = slot
            cuda.syncthreads()
            # b. fold the tile into each head's running max and sum; scores become probabilities
            for r in range(HEAD_ROUNDS):
                h = (r * NWARPS + warp) * HPW + lane // SPAN
                sl = lane % SPAN
                live = h < G
                tile_max = NEG_INF
                for c in range(SLICES):
                    if live:
                        tile_max = max(tile_max, s_s[h * TK + c * SPAN + sl])
                off = SPAN // 2
                while off > 0:
                    tile_max = max(tile_max, cuda.shfl_xor_sync(FULL_MASK, tile_max, off))
                    off //= 2
                old_max = NEG_INF
                if live:
                    old_max = stat_s[h]
                new_max = max(old_max, tile_max)
                total = numba.float32(0.0)
                for c in range(SLICES):
                    if live:
                        at = h * TK + c * SPAN + sl
                        p = math.exp(s_s[at] - new_max)
                        s_s[at] = p
                        total += p
                off = SPAN // 2
                while off > 0:
                    total += cuda.shfl_xor_sync(FULL_MASK, total, off)
                    off //= 2
                if live and sl == 0:
                    alpha = math.exp(old_max - new_max)
                    stat_s[h] = new_max
                    stat_s[G + h] = stat_s[G + h] * alpha + total
                    stat_s[2 * G + h] = alpha
            cuda.syncthreads()
            # c. rescale and accumulate p * V: each warp a share of the keys, lanes over the head dim
            for h in range(G):
                alpha = stat_s[2 * G + h]
                for i in range(EPT):
                    acc[h * EPT + i] *= alpha
            for kk in range(KPW):
                jj = kk * NWARPS + warp
                if jj < TK:
                    slot = slot_s[jj]
                    for i in range(EPT):
                        d = lane + 32 * i
                        if WHOLE_WARPS or d < D:
                            value = numba.float32(v[slot, g, d])
                            for h in range(G):
                                acc[h * EPT + i] += s_s[h * TK + jj] * value
            cuda.syncthreads()
        # sum the warps' accumulators into q_s, one warp after the other (a fixed order)
        for w in range(NWARPS):
            if warp == w:
                for h in range(G):
                    for i in range(EPT):
                        d = lane + 32 * i
                        if WHOLE_WARPS or d < D:
                            if w == 0:
                                q_s[h * D + d] = acc[h * EPT + i]
                            else:
                                q_s[h * D + d] += acc[h * EPT + i]
            cuda.syncthreads()

    def whole_range(q, k, v, block_tables, context_lens, query_start_loc, block_size, scale, out):
        """One block per (token, KV head): the token's whole causal range, normalised into out."""
        t = cuda.blockIdx.x
        g = cuda.blockIdx.y
        b, key_end = _locate(t, query_start_loc, context_lens, block_tables.shape[1] * block_size)
        if key_end <= 0:
            return
        q_s = cuda.shared.array(Q_SIZE, numba.float32)
        s_s = cuda.shared.array(S_SIZE, numba.float32)
        slot_s = cuda.shared.array(TK, numba.int32)
        stat_s = cuda.shared.array(STAT_SIZE, numba.float32)
        attend(q, k, v, block_tables, b, t, g, 0, key_end, block_size, scale, q_s, s_s, slot_s, stat_s)
        tid = cuda.threadIdx.x
        if tid < D:
            for h in range(G):
                out[t, g * G + h, tid] = q_s[h * D + tid] / stat_s[G + h]

    def partition(q, k, v, block_tables, context_lens, query_start_loc, block_size, scale, part_keys, stats, partials):
        """One block per (token, KV head, partition): an unnormalised partial and its (max, sum)."""
        t = cuda.blockIdx.x
        g = cuda.blockIdx.y
        p = cuda.blockIdx.z
        b, key_end = _locate(t, query_start_loc, context_lens, block_tables.shape[1] * block_size)
        key_start = p * part_keys
        if key_start >= key_end:
            return
        key_stop = min(key_end, key_start + part_keys)
        q_s = cuda.shared.array(Q_SIZE, numba.float32)
        s_s = cuda.shared.array(S_SIZE, numba.float32)
        slot_s = cuda.shared.array(TK, numba.int32)
        stat_s = cuda.shared.array(STAT_SIZE, numba.float32)
        attend(q, k, v, block_tables, b, t, g, key_start, key_stop, block_size, scale, q_s, s_s, slot_s, stat_s)
        tid = cuda.threadIdx.x
        if tid < D:
            for h in range(G):
                partials[t, g * G + h, p, tid] = q_s[h * D + tid]
        if tid < G:
            stats[0, t, g * G + tid, p] = stat_s[tid]
            stats[1, t, g * G + tid, p] = stat_s[G + tid]

    return whole_range, partition


def _merge_kernel(context_lens, query_start_loc, capacity, part_keys, stats, partials, out):
    """One block per (token, query head): combine the token's partitions by the online-softmax rule."""
    t = cuda.blockIdx.x
    hq = cuda.blockIdx.y
    b, key_end = _locate(t, query_start_loc, context_lens, capacity)
    if key_end <= 0:
        return
    parts = (key_end + part_keys - 1) // part_keys
    top = NEG_INF
    for p in range(parts):
        top = max(top, stats[0, t, hq, p])
    total = numba.float32(0.0)
    for p in range(parts):
        total += math.exp(stats[0, t, hq, p] - top) * stats[1, t, hq, p]
    inv = numba.float32(1.0) / total
    for d in range(cuda.threadIdx.x, out.shape[2], cuda.blockDim.x):
        acc = numba.float32(0.0)
        for p in range(parts):
            acc += math.exp(stats[0, t, hq, p] - top) * partials[t, hq, p, d]
        out[t, hq, d] = acc * inv


def _attention(
    op: str, q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any,
    query_start_loc: Any, scale: float, out: Any, workspace: AttentionWorkspace | None,
) -> Any:
    """Shared body of paged_attention / static_attention (block_tables already ``[B, blocks]``)."""
    check_array(op, "q", q, (None, None, None), FLOAT_DTYPES, contiguous=False)
    tokens, q_heads, dim = q.shape
    check_array(op, "k_cache", k_cache, (None, None, None, dim), FLOAT_DTYPES)
    check_array(op, "v_cache", v_cache, tuple(k_cache.shape), FLOAT_DTYPES)
    check_array(op, "out", out, (tokens, q_heads, dim), FLOAT_DTYPES, contiguous=False)
    check_same_dtype(op, "q", q, k_cache=k_cache, v_cache=v_cache, out=out)
    num_blocks, block_size, kv_heads, _ = k_cache.shape
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"{op}: q has {q_heads} heads, which is not a multiple of the {kv_heads} KV heads of k_cache")
    if dim % HEAD_DIM_MULTIPLE or not 0 < dim <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be a multiple of {HEAD_DIM_MULTIPLE} up to {MAX_HEAD_DIM}, got {dim}")
    check_array(op, "context_lens", context_lens, (None,), (INT32,))
    num_seqs = context_lens.shape[0]
    check_array(op, "query_start_loc", query_start_loc, (num_seqs + 1,), (INT32,))
    check_array(op, "block_tables", block_tables, (num_seqs, None), (INT32,))
    max_parts = 1  # partitions the workspace has room for in this step
    if workspace is not None:
        shape = tuple(getattr(workspace.partials, "shape", ()))
        room, parts = (shape[0], shape[2]) if len(shape) == 4 else (None, None)
        check_array(op, "workspace.partials", workspace.partials, (room, q_heads, parts, dim), (np.float32,))
        check_array(op, "workspace.stats", workspace.stats, (2, room, q_heads, parts), (np.float32,))
        if tokens <= room:
            max_parts = min(parts, 65535)  # the grid's z limit
    if tokens == 0 or num_seqs == 0 or k_cache.size == 0:
        return out
    capacity = block_tables.shape[1] * block_size
    whole_range, partition = _attention_kernels(dim, q_heads // kv_heads, TILE)
    t = numba_type(q.dtype)
    # flat cache rows (views): the kernels address a key by its slot, block * block_size + offset
    k_rows = k_cache.reshape(num_blocks * block_size, kv_heads, dim)
    v_rows = v_cache.reshape(num_blocks * block_size, kv_heads, dim)
    args = (q, k_rows, v_rows, block_tables, context_lens, query_start_loc, block_size, scale)
    signature = (
        f"{t}[:, :, :], {t}[:, :, ::1], {t}[:, :, ::1], int32[:, ::1], int32[::1], int32[::1], int32, float32"
    )
    threads = _block_threads(dim)
    stream = launch_stream()
    part_keys = TILE * cdiv(cdiv(capacity, TILE), max_parts)
    if part_keys >= capacity:
        kernel = compiled(whole_range, f"void({signature}, {t}[:, :, :])")
        kernel[(tokens, kv_heads), threads, stream](*args, out)
        return out
    parts = cdiv(capacity, part_keys)
    kernel = compiled(partition, f"void({signature}, int32, float32[:, :, :, ::1], float32[:, :, :, ::1])")
    kernel[(tokens, kv_heads, parts), threads, stream](*args, part_keys, workspace.stats, workspace.partials)
    merge = compiled(
        _merge_kernel,
        f"void(int32[::1], int32[::1], int64, int32, float32[:, :, :, ::1], float32[:, :, :, ::1], {t}[:, :, :])",
    )
    merge[(tokens, q_heads), threads, stream](context_lens, query_start_loc, capacity, part_keys, *workspace, out)
    return out


def paged_attention(
    q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any, query_start_loc: Any,
    scale: float, out: Any, workspace: AttentionWorkspace | None = None,
) -> Any:
    """Causal attention of a flattened prefill/decode batch over a paged KV cache.

    See :func:`reference.paged_attention`. q and out may be strided views (unit stride along the head
    dim). ``workspace`` (optional, see :class:`AttentionWorkspace`) splits each token's context over
    several blocks, which a decode step with few sequences needs to fill the GPU.
    """
    return _attention(
        "paged_attention", q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, out, workspace
    )


def static_attention(
    q: Any, k_cache: Any, v_cache: Any, cache_slots: Any, context_lens: Any, query_start_loc: Any,
    scale: float, out: Any, workspace: AttentionWorkspace | None = None,
) -> Any:
    """:func:`paged_attention` over a static cache ``[num_slots, max_len, Hk, D]``.

    A static cache is a paged cache with one block per sequence, so the block table is
    ``cache_slots[:, None]`` (a view; nothing is allocated).
    """
    check_array("static_attention", "context_lens", context_lens, (None,), (INT32,))
    check_array("static_attention", "cache_slots", cache_slots, (context_lens.shape[0],), (INT32,))
    return _attention(
        "static_attention", q, k_cache, v_cache, cache_slots.reshape(-1, 1), context_lens, query_start_loc,
        scale, out, workspace,
    )
