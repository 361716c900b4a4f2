"""Decode attention on tensor cores: a GQA group's query heads are the rows of ``mma.sync`` m16n8k16.

The blocks are those of the CUDA-core kernel in :mod:`.attention`: one per (query token, KV head,
context partition), writing ``out`` (whole range) or an unnormalised partial and its (max, sum) for
the same merge kernel. Only the inner work differs. The CUDA-core kernel spends ~100 instructions
per key and lane on dot products, shuffles and exps, so it is bound by instruction issue well
below the copy bandwidth. Here each warp takes 16 keys per step: two mma tiles give the scores of
all the group's heads (``S = Q K^T``, heads as rows, keys as columns), and ``D / 8`` more give
``O += P V``, about a tenth of the instructions.

Every operand comes straight from 16-byte global loads, with no shared memory and no ldmatrix, by
choosing which element sits in which fragment slot. Lane ``l`` has ``g = l // 4`` and
``t = l % 4`` (see :mod:`.mma`):

* ``S = Q K^T``, k-step ``ks = 2 j + s``: the slots ``k = 2t, 2t+1`` hold head dim ``d0 = 8 (t + 4 j)
  + 4 s`` and ``d0 + 1``, the slots ``2t+8, 2t+9`` hold ``d0 + 2, d0 + 3``. One 16-byte load of K row
  (key) ``g``, chunk ``t + 4 j``, gives B for both k-steps ``2 j`` and ``2 j + 1``; Q's A fragment
  takes the same elements of head ``g`` (rows 8-15 are zero: groups of up to 8 heads).
* ``O += P V``, 16 keys: P's A fragment is the S accumulators of the step's two 8-key tiles (keys
  ``2t, 2t+1`` and ``2t+8, 2t+9``), as in FlashAttention-2. B needs V at two keys and one head dim
  per word. Output column ``n`` of n-tile ``no`` stands for head dim ``8 (n + 8 (no // 8)) + no % 8``,
  so lane ``g`` needs chunk ``g + 8 (no // 8)`` of the four key rows ``2t, 2t+1, 2t+8, 2t+9``. It
  loads those chunks whole and pairs the halves of two rows' words with shifts and masks.

Each K and V byte is loaded once per block, in rows of 64 and 128 contiguous bytes. Warps take
every ``warps``-th 16-key step of the block's range and keep their own online-softmax state (scores
in log2 units, exp2), which the block adds up at the end, rescaled to its max, in a fixed order.
float16 only, head dim 64 or 128, at most 8 query heads per KV head, caches 16-byte aligned.

In numba's CUDA simulator the loads and the mma run as NumPy fallbacks, so these kernels are tested
there too (slowly: keep the shapes tiny) when a test turns :data:`ENABLED` on.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import numpy as np
from numba import cuda, float32, int64, uint32

from .attention_blocks import NEG_INF, block_kernels, row_finder, shared_layout, split_workspace, stream_folder
from .common import SIMULATOR, TENSOR_CORES
from .intrinsics import aligned16, pack_f16x2
from .mma import load_words_stream, mma_16816
from .vector import to_stored

# The switch: on with common.TENSOR_CORES (the default on a GPU); INFINILM_NB_ATTENTION_MMA=0 keeps
# decode attention on the CUDA-core kernel (and INFINILM_NB_TENSOR_CORES=0 every kernel). Which steps
# it takes when on: :func:`.attention._attention`.
ENABLED = TENSOR_CORES and os.environ.get("INFINILM_NB_ATTENTION_MMA", "1") != "0"
# The dispatcher sends a step here only when its (token, KV head) pairs fit in one wave of this
# kernel's blocks (why: :func:`.attention._attention`); False lifts that limit (the kernel bench's
# ``split mma`` rows time this kernel on every shape).
WITHIN_ONE_WAVE = True
HEAD_DIMS = (64, 128)
MAX_GROUP = 8  # query heads per KV head: the rows g = lane // 4 of an m16n8k16 tile
WARP = 32
KEYS = 16  # keys per warp step: two 8-key tiles of S, one k-step of P V
# Warps a block, from most to fewest, that the dispatcher chooses among for each step by its model
# of the step's time (:mod:`.attention_plan`). More warps stream a block's keys faster; fewer let
# an SM hold more blocks (at ~168 registers: one of 8 warps, 2 of 6, 3 of 4, 6 of 2). Measured on an
# H200 (32 / 8 heads, d 128), the fastest were 8 warps at batch 1 over 8K keys (20.7 us against 22.9
# with 4) and batch 16 over 1K (25.1 against 26.6), 6 at batch 32 over 2K (70.8 against 76.5), and 2
# at batch 64 over 2K, the only one whose wave holds its 512 (token, KV head) pairs.
WARP_CHOICES = (2, 1) if SIMULATOR else (8, 6, 4, 2)
FULL_MASK = 0xFFFFFFFF
LOG2E = 1.4426950408889634
LN2 = np.float32(math.log(2.0))
LOW = uint32(0xFFFF)
HIGH = uint32(0xFFFF0000)


def usable(q: Any, k_cache: Any, v_cache: Any, group: int) -> bool:
    """Whether a checked attention step may run here: the switch on, float16, head dim 64 or 128, at
    most :data:`MAX_GROUP` query heads per KV head, 16-byte aligned caches."""
    return (
        ENABLED
        and (TENSOR_CORES or SIMULATOR)  # the simulator runs it on NumPy fallbacks when asked
        and np.dtype(q.dtype) == np.float16
        and q.shape[2] in HEAD_DIMS
        and group <= MAX_GROUP
        and aligned16(k_cache, v_cache)
    )


def kernel_signatures() -> tuple[str, str]:
    """The signatures of the whole-range and the split kernels: q as its float16 bits (uint16), the
    caches flat float16, the scale in log2 units; then ``out``, or the partition length and the
    workspace views."""
    common = "uint16[:, :, :], float16[::1], float16[::1], int32[:, ::1], int32[::1], int32[::1], int64, float32"
    return f"void({common}, float16[:, :, :])", f"void({common}, {split_workspace('float16')})"


@functools.lru_cache(maxsize=None)
def mma_attention_kernels(head_dim: int, group: int, block_size: int, warps: int) -> tuple[Callable, Callable]:
    """The (whole-range, partition) kernel functions for one head dim, GQA group size, cache block
    size and number of warps a block. Signatures: :func:`kernel_signatures`."""
    D, G, BS, W = head_dim, group, block_size, warps
    KC = D // 32  # 16-byte K chunks per lane and key row (chunks t + 4 j)
    VC = D // 64  # 16-byte V chunks per lane and key row (chunks g + 8 i)
    KSTEPS = D // 16
    NT_O = D // 8  # 8-column n-tiles of O
    QWORDS, OACC, KWORDS, VWORDS = 2 * KSTEPS, 2 * NT_O, 8 * KC, 16 * VC  # local array sizes
    STEP = W * KEYS  # keys per block step
    _, FACTORS, SUMS, _ = shared_layout(D, G, W)
    fold = stream_folder(G, W)

    ONE_BLOCK = BS % KEYS == 0  # a step's 16 keys (16-aligned) then lie in one cache block

    row_of = row_finder(BS, D)

    @cuda.jit(device=True)
    def step_row(block_tables, b, base, key, last, kv_heads, g):
        """``row_of(min(key, last))`` for a key of the step from ``base``: with one cache block per
        step, one table lookup (shared by the step's rows, so hoisted) and an offset."""
        if ONE_BLOCK:
            first = min(base, last)
            return row_of(block_tables, b, first, kv_heads, g) + int64(min(key, last) - first) * kv_heads * D
        return row_of(block_tables, b, min(key, last), kv_heads, g)

    @cuda.jit(device=True)
    def attend(q, k, v, block_tables, b, tok, g, kv_heads, key_start, key_stop, scale_log2, part_s, state_s):
        """Online softmax over keys ``key_start .. key_stop - 1`` (at least one): leaves each warp's
        unnormalised output in ``part_s[(warp * G + h) * D + d]``, and the block's state folded
        (:func:`.attention_blocks.stream_folder`)."""
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        row = lane // 4  # the head of this lane's S and O rows; the K row of its B loads
        quad = lane % 4
        head = g * G + row
        qf = cuda.local.array(QWORDS, uint32)  # A words a0, a2 per k-step (a1 = a3 = 0)
        for j in range(KC):
            for s in range(2):
                d0 = 8 * (quad + 4 * j) + 4 * s
                for w in range(2):
                    word = uint32(0)
                    if row < G:
                        lo = uint32(q[tok, head, d0 + 2 * w])
                        hi = uint32(q[tok, head, d0 + 2 * w + 1])
                        word = lo | (hi << 16)
                    qf[2 * (2 * j + s) + w] = word
        o = cuda.local.array(OACC, float32)  # O[row][8 (2 quad + e + 8 (no // 8)) + no % 8] at 2 no + e
        for i in range(OACC):
            o[i] = 0
        kw = cuda.local.array(KWORDS, uint32)  # [tile][chunk j][word]
        vw = cuda.local.array(VWORDS, uint32)  # [key row 2 quad, +1, +8, +9][chunk i][word]
        s = cuda.local.array(4, float32)  # scores then probabilities: keys 2 quad + e, 8 + 2 quad + e
        pair = cuda.local.array(2, uint32)
        top = NEG_INF
        total = float32(0)
        last = key_stop - 1  # keys past the range load the last key's row, masked below
        # block-uniform trips (the simulator's mma and shuffles meet at block barriers): a warp past
        # the range in the last step runs it fully masked
        for block_base in range(key_start, key_stop, STEP):
            base = block_base + warp * KEYS
            for tile in range(2):
                at = step_row(block_tables, b, base, base + 8 * tile + row, last, kv_heads, g)
                for j in range(KC):
                    words = load_words_stream(k, at + 8 * (quad + 4 * j))
                    for w in range(4):
                        kw[(tile * KC + j) * 4 + w] = words[w]
            for r in range(4):
                at = step_row(block_tables, b, base, base + 2 * quad + (r % 2) + 8 * (r // 2), last, kv_heads, g)
                for i in range(VC):
                    words = load_words_stream(v, at + 8 * (row + 8 * i))
                    for w in range(4):
                        vw[(r * VC + i) * 4 + w] = words[w]
            for tile in range(2):
                c0 = float32(0)
                c1 = float32(0)
                for ks in range(KSTEPS):
                    j, half = ks // 2, ks % 2
                    b0 = kw[(tile * KC + j) * 4 + 2 * half]
                    b1 = kw[(tile * KC + j) * 4 + 2 * half + 1]
                    d = mma_16816(qf[2 * ks], uint32(0), qf[2 * ks + 1], uint32(0), b0, b1, c0, c1, float32(0), float32(0))
                    c0, c1 = d[0], d[1]
                for e in range(2):
                    key = base + 8 * tile + 2 * quad + e
                    s[2 * tile + e] = c0 * scale_log2 if e == 0 else c1 * scale_log2
                    if key > last:
                        s[2 * tile + e] = NEG_INF
            step_top = max(max(s[0], s[1]), max(s[2], s[3]))
            step_top = max(step_top, cuda.shfl_xor_sync(FULL_MASK, step_top, 1))
            step_top = max(step_top, cuda.shfl_xor_sync(FULL_MASK, step_top, 2))
            new_top = max(top, step_top)
            if new_top != top:  # then new_top is finite
                alpha = math.exp2(top - new_top)
                total *= alpha
                for i in range(OACC):
                    o[i] *= alpha
                top = new_top
            shift = top if top != NEG_INF else float32(0)  # no key yet: every p is 0, not NaN
            for i in range(4):
                s[i] = math.exp2(s[i] - shift)
                total += s[i]
            a0 = pack_f16x2(s[0], s[1])
            a2 = pack_f16x2(s[2], s[3])
            for no in range(NT_O):
                i, w, half = no // 8, (no % 8) // 2, no % 2
                for r in range(2):  # keys 2 quad, 2 quad + 1 (b0); 2 quad + 8, 2 quad + 9 (b1)
                    first = vw[((2 * r) * VC + i) * 4 + w]
                    second = vw[((2 * r + 1) * VC + i) * 4 + w]
                    if half == 0:
                        pair[r] = (first & LOW) | (second << 16)
                    else:
                        pair[r] = (first >> 16) | (second & HIGH)
                d = mma_16816(a0, uint32(0), a2, uint32(0), pair[0], pair[1], o[2 * no], o[2 * no + 1], float32(0), float32(0))
                o[2 * no] = d[0]
                o[2 * no + 1] = d[1]
        total += cuda.shfl_xor_sync(FULL_MASK, total, 1)
        total += cuda.shfl_xor_sync(FULL_MASK, total, 2)
        if row < G:
            if quad == 0:
                state_s[FACTORS + warp * G + row] = top * LN2  # natural log units, as the fold takes them
                state_s[SUMS + warp * G + row] = total
            for no in range(NT_O):
                for e in range(2):
                    d = 8 * (2 * quad + e + 8 * (no // 8)) + no % 8
                    part_s[(warp * G + row) * D + d] = o[2 * no + e]
        fold(state_s)

    return block_kernels(attend, D, G, W, W * WARP, BS, to_stored(False), merges=True)


def scale_log2(scale: float) -> np.float32:
    """The softmax scale in the kernels' log2 units."""
    return np.float32(scale * LOG2E)
