"""KV-cache writes and causal attention over a paged (or static) KV cache.

Launchers: :func:`store_kv`, :func:`store_kv_static`, :func:`paged_attention`,
:func:`static_attention` (same signatures and semantics as ``reference.py``).

Attention design. The host cannot read ``query_start_loc`` or ``context_lens`` without a device
sync, so the launch geometry comes from shapes only: one block per (query token, KV head, context
partition). A block finds its token's sequence by binary search over ``query_start_loc``, so prefill
tokens (n > 1, causal, with or without a cached prefix) and decode tokens (n = 1) mix freely in one
launch. The block serves all ``Hq / Hk`` query heads that read its KV head, so each K/V row is
loaded once per GQA group.

Inside a block, lane groups stream keys independently: a group of ``LPK`` lanes (16 at head_dim
128 in float16) owns one key at a time, each lane a 16-byte slice of its K and V rows, and walks
the keys ``g, g + groups, ...`` of the block's range, ``U`` keys per step with all their K and V
loads issued before any use. For each key it reduces the dot products with the group's query heads
(held in registers) by warp shuffles and folds the key into the group's own online-softmax state
(running max, sum and ``p * V`` accumulators, in registers). No barrier is needed until the end,
when the groups leave their states in shared memory and the block adds them up, rescaled to its max,
in a fixed order (the blocks around the lane groups: :mod:`.attention_blocks`). Caches that are not
16-byte aligned take the same path with one-element slices.

Without a workspace a block covers a token's whole causal range and writes ``out``. With an
:class:`AttentionWorkspace` the range is cut into partitions processed by separate blocks (so that
few long decode sequences fill the GPU); each writes its unnormalised partial and (max, sum), and
they are merged with the online-softmax rule: in the tensor-core kernel by the last block of each
(token, KV head) to finish (counted in the workspace's ``finished``), else by a second kernel. The
host picks the number of partitions from the block table's capacity (a CUDA graph is captured
before the contexts are known); each token then cuts its own causal range into that many,
``KEY_GRAIN`` keys at a time, so that a short context is spread over short partitions too instead
of filling the first ones. How many, and the warps a block: :mod:`.attention_plan`.

A float16 step that the caller marks as holding prefills (``max_query_len``) runs instead on tensor
cores, FlashAttention-2 style: :mod:`.attention_prefill`. Other float16 steps (head dim 64 or 128,
up to 8 query heads per KV head) whose (token, KV head) pairs fit in one wave of blocks of some warp
count run the same blocks with the inner work on tensor cores: :mod:`.attention_mma`
(:data:`.attention_mma.ENABLED`).
The merge of split partitions: :mod:`.attention_merge`.

bfloat16 (uint16 bit patterns, see :data:`.common.BFLOAT16`) takes the CUDA-core kernels: they widen
q, K and V to float32 as they load them and round what they write to ``out``; the workspace stays
float32. The cache stores copy bits and never convert.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any, Callable, NamedTuple

import numba
import numpy as np
from numba import cuda

from . import attention_mma, attention_prefill
from .attention_blocks import NEG_INF, block_kernels, row_finder, shared_layout, split_workspace, stream_folder
from .attention_merge import merge_partitions
from .attention_plan import KEY_GRAIN, fastest_launch, split_of
from .common import (
    SIMULATOR, WITH_BFLOAT16, cdiv, check_array, check_same_dtype, compiled, launch, multiprocessors, numba_type,
)
from .intrinsics import as_f32, await_previous_kernels
from .vector import (
    element_strides, flat_view, is_bf16, loader, row_grid, storer, to_stored, vector_width, widening_loader,
)

STORE_THREADS = 256
HEAD_DIM_MULTIPLE = 8
MAX_HEAD_DIM = 256
WARP = 32
# Warps per attention block (the simulator's are fewer: one Python thread per CUDA thread).
ATTENTION_WARPS = 2 if SIMULATOR else 4
MAX_REGISTERS = 128  # per thread: 4 blocks of 128 threads per SM
SHARED_BYTES = 40 * 1024  # static shared memory an attention block may take (the limit is 48 KB)
# In the tensor-core split kernel the last partition block of a (token, KV head) merges the partials
# itself (attention_blocks), rather than a merge kernel after the split one (attention_merge; the
# CUDA-core kernel, at its register cap, keeps it); bench/ablation.py times the step both ways.
MERGE_IN_PARTITION = True
# Default partition length of a workspace made by attention_workspace_shapes.
PARTITION_KEYS = 256
FULL_MASK = 0xFFFFFFFF
INT32 = np.dtype(np.int32)


# ----------------------------------------------------------------------------------- store_kv


@functools.lru_cache(maxsize=None)
def _store_kv_kernel(vec: int, dim: int) -> Callable:
    """The store kernel moving ``vec`` elements per load and store (8 float16 / 4 float32: 16 bytes),
    for heads of ``dim`` elements (a constant, so that a thread finds its head without a division loop)."""
    load, store = loader(vec), storer(vec)
    chunks = dim // vec

    def kernel(k, v, k_cache, v_cache, slots, positions, static, heads, block_size, strides):
        """One thread per (KV head, chunk of ``vec`` elements) of a token, blocks' y over tokens; a
        negative slot skips its token.

        k, v: flat views from their first element, strided by ``strides`` = (k token, k head, v token,
        v head) elements; caches: flat ``[blocks * block_size * heads * dim]``. Paged: ``slots[t]`` is
        ``block * block_size + offset``. Static (``static != 0``): ``slots[t]`` is the cache row and
        ``positions[t]`` the offset in it.
        """
        await_previous_kernels()
        column = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        if column >= heads * chunks:
            return
        h = column // chunks
        d = (column - h * chunks) * vec
        blocks = k_cache.shape[0] // (block_size * heads * dim)
        t = cuda.blockIdx.y
        while t < slots.shape[0]:
            # K and V first: their loads need not wait for the slot's
            kv = load(k, t * strides[0] + h * strides[1] + d)
            vv = load(v, t * strides[2] + h * strides[3] + d)
            slot = slots[t]
            if static:
                block = slot
                offset = positions[t]
            else:
                block = slot // block_size
                offset = slot - block * block_size
            if slot >= 0 and block < blocks and 0 <= offset < block_size:
                at = ((numba.int64(block) * block_size + offset) * heads + h) * dim + d
                store(k_cache, at, kv)
                store(v_cache, at, vv)
            t += cuda.gridDim.y

    return kernel


def check_store(op: str, k: Any, v: Any, k_cache: Any, v_cache: Any) -> None:
    """Raise ``ValueError`` unless k, v ``[T, Hk, D]`` and the caches ``[*, *, Hk, D]`` fit each other
    and share a float dtype, bfloat16 included (the arguments of a K/V cache store)."""
    check_array(op, "k", k, (None, None, None), WITH_BFLOAT16, contiguous=False)
    tokens, heads, dim = k.shape
    check_array(op, "v", v, (tokens, heads, dim), WITH_BFLOAT16, contiguous=False)
    check_array(op, "k_cache", k_cache, (None, None, heads, dim), WITH_BFLOAT16)
    check_array(op, "v_cache", v_cache, tuple(k_cache.shape), WITH_BFLOAT16)
    check_same_dtype(op, "k", k, v=v, k_cache=k_cache, v_cache=v_cache)


def _copied_bits(array: Any) -> Any:
    """``array`` as float16 if it holds bfloat16: the store kernel only moves elements, and float16
    moves bits unchanged (through the 16-byte intrinsics, which take float16 only) where a bfloat16
    build would widen and round them."""
    return array.view(np.float16) if is_bf16(array.dtype) else array


def _launch_store(
    op: str, k: Any, v: Any, k_cache: Any, v_cache: Any, slots: Any, positions: Any, static: int
) -> None:
    k_flat, v_flat = _copied_bits(flat_view(op, "k", k)), _copied_bits(flat_view(op, "v", v))
    if k.size == 0 or k_cache.size == 0:
        return
    _, heads, dim = k.shape
    strides = element_strides(k)[:2] + element_strides(v)[:2]
    vec = vector_width(k.dtype, (k, v, k_cache, v_cache), (dim,) + strides)
    t = numba_type(k_flat.dtype)
    kernel = compiled(
        _store_kv_kernel(vec, dim),
        f"void({t}[::1], {t}[::1], {t}[::1], {t}[::1], int32[::1], int32[::1], int32, int64, int32, "
        "UniTuple(int64, 4))",
    )
    grid, threads = row_grid(k.shape[0], heads * dim // vec, STORE_THREADS)
    launch(kernel, grid, threads, (
        k_flat, v_flat, _copied_bits(k_cache.reshape(-1)), _copied_bits(v_cache.reshape(-1)), slots, positions,
        static, heads, k_cache.shape[1], strides,
    ))


def store_kv(k: Any, v: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:
    """Write each token's K and V into a paged cache; see :func:`reference.store_kv`.

    k and v may be strided views into a fused QKV buffer (unit stride along the head dim).
    """
    check_store("store_kv", k, v, k_cache, v_cache)
    check_array("store_kv", "slot_mapping", slot_mapping, (k.shape[0],), (INT32,))
    _launch_store("store_kv", k, v, k_cache, v_cache, slot_mapping, slot_mapping, 0)


def store_kv_static(k: Any, v: Any, k_cache: Any, v_cache: Any, cache_slots: Any, positions: Any) -> None:
    """Write each token's K and V into a static cache; see :func:`reference.store_kv_static`."""
    check_store("store_kv_static", k, v, k_cache, v_cache)
    check_array("store_kv_static", "cache_slots", cache_slots, (k.shape[0],), (INT32,))
    check_array("store_kv_static", "positions", positions, (k.shape[0],), (INT32,))
    _launch_store("store_kv_static", k, v, k_cache, v_cache, cache_slots, positions, 1)


# ------------------------------------------------------------------------------- attention


class AttentionWorkspace(NamedTuple):
    """Scratch for split-context attention; allocate once (shapes: :func:`attention_workspace_shapes`).

    stats: float32 ``[2, tokens, Hq, partitions]``, the running max and sum of each partition;
    partials: float32 ``[tokens, Hq, partitions, head_dim]``, its unnormalised output. A step with
    more tokens than the workspace was sized for runs unsplit (it fills the GPU by itself); a step
    with fewer may cut its contexts into up to ``tokens * partitions / its tokens`` partitions in the
    same memory (a batch-1 decode step then spreads over the whole GPU); a context longer than
    ``partitions * PARTITION_KEYS`` gets longer partitions.
    """

    stats: Any
    partials: Any
    finished: Any  # int32 [tokens, Hq]: partitions of a (token, KV head) done; zero between launches

    @classmethod
    def allocate(
        cls, xp: Any, num_tokens: int, num_heads: int, head_dim: int, max_context: int,
        partition_keys: int = PARTITION_KEYS,
    ) -> "AttentionWorkspace":
        """Allocate a workspace with ``xp`` (CuPy or NumPy) for steps of up to ``num_tokens`` tokens."""
        shapes = attention_workspace_shapes(num_tokens, num_heads, head_dim, max_context, partition_keys)
        return cls(**{name: xp.empty(shape, dtype=np.float32) for name, shape in shapes.items()},
                   finished=xp.zeros((num_tokens, num_heads), dtype=np.int32))


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


def _geometry(head_dim: int, group: int, vec: int) -> tuple[int, int, int]:
    """(lanes per key, elements per lane, keys in flight per lane group) for one head dim, GQA group
    size and load width: the most lanes per key (at most a warp, a power of two dividing the row's
    chunks), so each lane keeps few accumulators; fewer keys in flight when the group is large, so
    that the loaded values, query and accumulators stay in registers."""
    chunks = head_dim // vec
    lanes = min(WARP, chunks & -chunks)
    per_lane = head_dim // lanes
    held = group * per_lane
    return lanes, per_lane, 4 if held <= 32 else 2 if held <= 64 else 1


@functools.lru_cache(maxsize=None)
def _attention_kernels(
    head_dim: int, group: int, vec: int, warps: int, block_size: int, bf16: bool
) -> tuple[Callable, Callable]:
    """The (whole-range, partition) kernel functions for one head dim, GQA group size, load width
    (8 float16 or bfloat16 / 4 float32, or 1), warps per block and cache block size; ``bf16``: q,
    the caches and out hold bfloat16 bits.

    The sizes are closure constants, so loops unroll and per-thread arrays stay in registers.
    Compile them with :func:`_compile_options`.
    """
    D, G, VEC, BS = head_dim, group, vec, block_size
    LPK, EPL, U = _geometry(D, G, VEC)
    CPL = EPL // VEC  # chunks per lane
    NT = warps * WARP
    GROUPS = NT // LPK  # lane groups per block
    STEP = GROUPS * U  # keys per step of the block
    ACC = G * EPL
    BUF = U * EPL
    SCORES = U * G
    _, FACTORS, SUMS, _ = shared_layout(D, G, GROUPS)
    fold = stream_folder(G, GROUPS)
    cache_row = row_finder(BS, D)
    # widened as loaded: with the conversions left to the dot products the float16 build spilled
    load, as_stored = widening_loader(VEC, bf16), to_stored(bf16)

    @cuda.jit(device=True, fastmath=True)
    def attend(q, k, v, block_tables, b, t, g, kv_heads, key_start, key_stop, scale, part_s, state_s):
        """Online softmax over keys ``key_start .. key_stop - 1`` (at least one).

        Leaves each lane group's unnormalised output in ``part_s[(group * G + h) * D + d]``, its rescale
        factor to the block's max in ``state_s[FACTORS + group * G + h]``, and the block's max and sum
        in ``state_s[h]`` and ``state_s[G + h]`` (:func:`.attention_blocks.stream_folder`).
        """
        tid = cuda.threadIdx.x
        li = tid % LPK
        gi = tid // LPK
        qreg = cuda.local.array(ACC, numba.float32)  # [h * EPL + c * VEC + e]: element (c * LPK + li) * VEC + e
        acc = cuda.local.array(ACC, numba.float32)
        kbuf = cuda.local.array(BUF, numba.float32)
        vbuf = cuda.local.array(BUF, numba.float32)
        score = cuda.local.array(SCORES, numba.float32)
        top = cuda.local.array(G, numba.float32)
        total = cuda.local.array(G, numba.float32)
        for h in range(G):
            for c in range(CPL):
                for e in range(VEC):
                    qreg[h * EPL + c * VEC + e] = as_f32(q[t, g * G + h, (c * LPK + li) * VEC + e]) * scale
            top[h] = NEG_INF
            total[h] = 0.0
        for i in range(ACC):
            acc[i] = 0.0
        for base in range(key_start, key_stop, STEP):
            # all the step's K and V loads first; keys past the range load the last valid row
            for u in range(U):
                j = min(base + u * GROUPS + gi, key_stop - 1)
                row = cache_row(block_tables, b, j, kv_heads, g)
                for c in range(CPL):
                    at = row + (c * LPK + li) * VEC
                    kv = load(k, at)
                    vv = load(v, at)
                    for e in range(VEC):
                        kbuf[u * EPL + c * VEC + e] = numba.float32(kv[e])
                        vbuf[u * EPL + c * VEC + e] = numba.float32(vv[e])
            for u in range(U):
                live = base + u * GROUPS + gi < key_stop
                for h in range(G):
                    part = numba.float32(0.0)
                    for i in range(EPL):
                        part += qreg[h * EPL + i] * kbuf[u * EPL + i]
                    off = LPK // 2
                    while off > 0:
                        part += cuda.shfl_xor_sync(FULL_MASK, part, off)
                        off //= 2
                    score[u * G + h] = part if live else NEG_INF
            for h in range(G):
                new_top = top[h]
                for u in range(U):
                    new_top = max(new_top, score[u * G + h])
                if new_top != NEG_INF:  # else the group has seen no key yet: nothing to fold
                    if new_top != top[h]:  # rescale only when the max moved (rarely, once warmed up)
                        alpha = math.exp(top[h] - new_top)
                        total[h] *= alpha
                        for i in range(EPL):
                            acc[h * EPL + i] *= alpha
                    for u in range(U):
                        p = math.exp(score[u * G + h] - new_top)
                        total[h] += p
                        for i in range(EPL):
                            acc[h * EPL + i] += p * vbuf[u * EPL + i]
                    top[h] = new_top
        for h in range(G):
            if li == 0:
                state_s[FACTORS + gi * G + h] = top[h]
                state_s[SUMS + gi * G + h] = total[h]
            for c in range(CPL):
                for e in range(VEC):
                    part_s[(gi * G + h) * D + (c * LPK + li) * VEC + e] = acc[h * EPL + c * VEC + e]
        fold(state_s)

    return block_kernels(attend, D, G, GROUPS, NT, BS, as_stored)


def _warps(head_dim: int, group: int, vec: int) -> int:
    """Warps per attention block: ``ATTENTION_WARPS``, fewer where the groups' parts would not fit
    in the static shared memory."""
    lanes, _, _ = _geometry(head_dim, group, vec)
    per_warp = (WARP // lanes) * group * head_dim * 4
    return max(1, min(ATTENTION_WARPS, SHARED_BYTES // per_warp))


def _attention(
    op: str, q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any,
    query_start_loc: Any, scale: float, out: Any, workspace: AttentionWorkspace | None,
    max_query_len: int | None = None,
) -> Any:
    """Shared body of paged_attention / static_attention (block_tables already ``[B, blocks]``)."""
    check_array(op, "q", q, (None, None, None), WITH_BFLOAT16, contiguous=False)
    tokens, q_heads, dim = q.shape
    check_array(op, "k_cache", k_cache, (None, None, None, dim), WITH_BFLOAT16)
    check_array(op, "v_cache", v_cache, tuple(k_cache.shape), WITH_BFLOAT16)
    check_array(op, "out", out, (tokens, q_heads, dim), WITH_BFLOAT16, contiguous=False)
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
        check_array(op, "workspace.finished", workspace.finished, (room, q_heads), (INT32,))
        if 0 < tokens <= room:
            # a step with fewer tokens than the workspace was sized for splits finer in the same memory
            max_parts = min(room * parts // tokens, 65535)  # the grid's z limit
    if tokens == 0 or num_seqs == 0 or k_cache.size == 0:
        return out
    static = op == "static_attention"
    # float16 only (bfloat16 and float32 stay on the CUDA-core kernels below)
    if attention_prefill.usable(q, k_cache, v_cache, block_size, static, max_query_len):
        attention_prefill.prefill_attention(
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, out, static
        )
        return out
    capacity = block_tables.shape[1] * block_size
    group = q_heads // kv_heads
    # flat caches: the kernels address a key's row by its slot, block * block_size + offset
    caches = (k_cache.reshape(-1), v_cache.reshape(-1))
    candidates = []
    if attention_mma.usable(q, k_cache, v_cache, group):
        # The tensor-core trip is less than half the CUDA-core one's instructions per key, but at 168
        # registers an SM holds fewer of its blocks. It takes a step whose (token, KV head) pairs fit
        # in one wave of its blocks of some warp count; past that the fuller SMs of the CUDA-core
        # kernel stream faster (H100, float16, 32 / 8 heads, 4-warp blocks: batch 16 at 8K keys 95%
        # of copy against 89%; batch 64 at 2K 84% against 90%).
        for kernels in _mma_kernels(q, caches, block_tables, context_lens, query_start_loc, kv_heads, scale,
                                    block_size):
            if not attention_mma.WITHIN_ONE_WAVE or tokens * kv_heads <= _wave(kernels):
                candidates.append(kernels)
    if not candidates:
        candidates.append(_cuda_core_kernels(q, caches, block_tables, context_lens, query_start_loc, kv_heads,
                                             scale, block_size, group))
    key_bytes = 2 * dim * q.dtype.itemsize  # a key's K and V rows
    kernels, asked = _plan(candidates, tokens * kv_heads, capacity, max_parts, key_bytes)
    parts, _ = split_of(capacity, asked)
    whole, partition, split_signature, args, threads, options, merges = kernels
    merge_here = merges and MERGE_IN_PARTITION
    if parts == 1:
        launch(whole, (tokens, kv_heads), threads, (*args, out))
        return out
    stats, partials = _workspace_views(workspace, tokens, q_heads, parts, dim)
    split = compiled(partition, split_signature, **options)
    launch(split, (tokens, kv_heads, parts), threads,
           (*args, KEY_GRAIN, stats, partials, workspace.finished, merge_here, out))
    if not merge_here:
        merge_partitions(context_lens, query_start_loc, capacity, KEY_GRAIN, stats, partials, out)
    return out


class _Kernels(NamedTuple):
    """One attention kernel family ready to launch: the compiled whole-range kernel, the partition
    kernel's function and signature (compiled only when a step splits), their leading arguments."""

    whole: Any
    partition: Callable
    split_signature: str
    args: tuple
    threads: int
    options: dict
    merges: bool  # the last partition block can merge (attention_blocks.block_kernels)


def _mma_kernels(
    q: Any, caches: tuple, block_tables: Any, context_lens: Any, query_start_loc: Any, kv_heads: int, scale: float,
    block_size: int,
) -> list[_Kernels]:
    """The tensor-core kernels (:mod:`.attention_mma`) for a checked float16 step, one family for each
    of :data:`.attention_mma.WARP_CHOICES` warps a block, all with the same arguments."""
    dim, group = q.shape[2], q.shape[1] // kv_heads
    whole_signature, split_signature = attention_mma.kernel_signatures()
    options = {"fastmath": True}
    args = (q.view(np.uint16), *caches, block_tables, context_lens, query_start_loc, kv_heads,
            attention_mma.scale_log2(scale))
    families = []
    for warps in attention_mma.WARP_CHOICES:
        whole_range, partition = attention_mma.mma_attention_kernels(dim, group, block_size, warps)
        families.append(_Kernels(compiled(whole_range, whole_signature, **options), partition, split_signature,
                                 args, warps * WARP, options, merges=True))
    return families


def _cuda_core_kernels(
    q: Any, caches: tuple, block_tables: Any, context_lens: Any, query_start_loc: Any, kv_heads: int, scale: float,
    block_size: int, group: int,
) -> _Kernels:
    """The CUDA-core kernels for a checked step of any dtype."""
    dim = q.shape[2]
    vec = vector_width(caches[0].dtype, caches)
    warps = _warps(dim, group, vec)
    whole_range, partition = _attention_kernels(dim, group, vec, warps, block_size, is_bf16(q.dtype))
    whole_signature, split_signature = kernel_signatures(numba_type(q.dtype))
    options = _compile_options(dim, group, vec)
    args = (q, *caches, block_tables, context_lens, query_start_loc, kv_heads, scale)
    return _Kernels(compiled(whole_range, whole_signature, **options), partition, split_signature, args,
                    warps * WARP, options, merges=False)


def kernel_signatures(t: str) -> tuple[str, str]:
    """The signatures of the whole-range and the split (partition) attention kernels for numba type
    name ``t`` of q, the caches and out (``uint16``: bfloat16)."""
    common = f"{t}[:, :, :], {t}[::1], {t}[::1], int32[:, ::1], int32[::1], int32[::1], int64, float32"
    return f"void({common}, {t}[:, :, :])", f"void({common}, {split_workspace(t)})"


def _workspace_views(workspace: AttentionWorkspace, tokens: int, heads: int, parts: int, dim: int) -> tuple[Any, Any]:
    """The leading memory of the workspace as C-contiguous ``[2, tokens, heads, parts]`` stats and
    ``[tokens, heads, parts, dim]`` partials (``tokens * parts`` at most what it was sized for)."""
    stats = workspace.stats.reshape(-1)[: 2 * tokens * heads * parts].reshape(2, tokens, heads, parts)
    partials = workspace.partials.reshape(-1)[: tokens * heads * parts * dim].reshape(tokens, heads, parts, dim)
    return stats, partials


def _compile_options(head_dim: int, group: int, vec: int) -> dict[str, Any]:
    """Fast math (``exp`` is one ``ex2.approx``: the softmax needs no more) and, on the GPU, a cap of
    ``MAX_REGISTERS`` where a lane holds little: NVVM otherwise takes a few registers more than that,
    which costs a resident block per SM (measured: 145 registers, 3 blocks, against 128 and 4)."""
    _, per_lane, _ = _geometry(head_dim, group, vec)
    if SIMULATOR or group * per_lane > 32:
        return {"fastmath": True}
    return {"fastmath": True, "max_registers": MAX_REGISTERS}


def _plan(candidates: list[_Kernels], pairs: int, keys: int, most: int, key_bytes: int) -> tuple[_Kernels, int]:
    """:func:`fastest_launch` over ``candidates`` (their split kernels compiled when a step may split).
    The simulator takes the first family and every partition, so that tiny test contexts still split."""
    if SIMULATOR:
        return candidates[0], most
    families = []
    for kernels in candidates:
        whole = _blocks_per_sm(kernels.whole, kernels.threads)
        split = whole
        if most > 1:
            split = _blocks_per_sm(compiled(kernels.partition, kernels.split_signature, **kernels.options),
                                   kernels.threads)
        families.append((kernels.threads // WARP, whole, split))
    index, parts = fastest_launch(pairs, keys, most, tuple(families), multiprocessors(), key_bytes)
    return candidates[index], parts


def _wave(kernels: _Kernels) -> int:
    """The (token, KV head) pairs that one wave of ``kernels``' whole-range blocks holds (the
    simulator: any number)."""
    return sys.maxsize if SIMULATOR else _blocks_per_sm(kernels.whole, kernels.threads) * multiprocessors()


_per_sm: dict[Any, int] = {}


def _blocks_per_sm(kernel: Any, threads: int) -> int:
    """Blocks of ``kernel`` (compiled for one signature, ``threads`` a block) that an SM holds at once."""
    if kernel not in _per_sm:
        device = cuda.get_current_device()
        regs, shared = kernel.get_regs_per_thread(), kernel.get_shared_mem_per_block()
        regs = max(regs.values()) if isinstance(regs, dict) else regs
        shared = max(shared.values()) if isinstance(shared, dict) else shared
        per_sm = min(
            device.MAX_BLOCKS_PER_MULTIPROCESSOR,
            device.MAX_THREADS_PER_MULTIPROCESSOR // threads,
            device.MAX_REGISTERS_PER_MULTIPROCESSOR // (cdiv(max(regs, 1), 8) * 8 * threads),
            device.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR // (shared + 1024),  # 1 KB per block is the runtime's
        )
        _per_sm[kernel] = max(1, per_sm)
    return _per_sm[kernel]


def paged_attention(
    q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any, query_start_loc: Any,
    scale: float, out: Any, workspace: AttentionWorkspace | None = None, max_query_len: int | None = None,
) -> Any:
    """Causal attention of a flattened prefill/decode batch over a paged KV cache.

    See :func:`reference.paged_attention`. q and out may be strided views (unit stride along the head
    dim). ``workspace`` (optional, see :class:`AttentionWorkspace`) splits each token's context over
    several blocks, which a decode step with few sequences needs to fill the GPU. ``max_query_len``
    (optional, the host's longest ``n`` of the step): from ``attention_prefill.MIN_QUERIES`` on, a
    float16 step runs on tensor cores (:mod:`.attention_prefill`); unknown, it never does. q, the
    caches and out are float16, float32 or bfloat16 (uint16 bits), all the same.
    """
    return _attention(
        "paged_attention", q, k_cache, v_cache, block_tables, context_lens, query_start_loc, scale, out, workspace,
        max_query_len,
    )


def static_attention(
    q: Any, k_cache: Any, v_cache: Any, cache_slots: Any, context_lens: Any, query_start_loc: Any,
    scale: float, out: Any, workspace: AttentionWorkspace | None = None, max_query_len: int | None = None,
) -> Any:
    """:func:`paged_attention` over a static cache ``[num_slots, max_len, Hk, D]``.

    A static cache is a paged cache with one block per sequence, so the block table is
    ``cache_slots[:, None]`` (a view; nothing is allocated).
    """
    check_array("static_attention", "context_lens", context_lens, (None,), (INT32,))
    check_array("static_attention", "cache_slots", cache_slots, (context_lens.shape[0],), (INT32,))
    return _attention(
        "static_attention", q, k_cache, v_cache, cache_slots.reshape(-1, 1), context_lens, query_start_loc,
        scale, out, workspace, max_query_len,
    )
