"""The float16 decode linear on tensor cores: ``out = x @ weight.T``, M <= 32, at the memory roofline.

Decode reads every weight once and uses it for M rows of x; on CUDA cores that costs M float32 FMAs
per 2-byte weight, which at M = 16..32 outruns the FMA units before the memory. Here each weight
goes through ``mma.sync`` m16n8k16 (:mod:`.mma`) with W as the A operand (16 weight rows) and x as
B (8 rows of x), so the arithmetic is free and the kernel only streams W.

* A warp owns ``16 * tiles_w`` weight rows and all ``8 * tiles_x`` rows of x, and walks one
  slice of K in steps of 32 columns. At each step lane ``(g, t) = (lane // 4, lane % 4)`` loads
  16 bytes of weight rows ``g`` and ``g + 8`` of each W tile, and 16 bytes of x row ``g`` of each
  x tile, all at column ``step * 32 + 8 t``. The product sums over K, so K may be permuted as long
  as A and B agree: those 8 columns feed the lane's four A / two B k-positions of two mma
  (words 0-1, then 2-3), without shuffles or shared memory.
* ``unroll`` steps of loads are issued before their mma, so each lane keeps ``unroll * 2 *
  tiles_w`` 16-byte weight loads in flight. Weight loads skip L1 (read once); x loads go through
  it (every warp re-reads x).
* A block is ``warps_k`` warps splitting K (interleaved by ``unroll`` steps, so a block reads each
  row in long runs) times ``warps_n`` warps on neighbouring rows. Every warp runs the same number
  of steps, those past K masked to zero, so the block stays in step (the simulator's shuffles need
  that). The split-K partial sums meet in shared memory and are added in a fixed order (no
  atomics: results do not depend on timing), then the epilogue adds bias and residual, or (fused)
  pairs gate row n with up row ``n + N`` and writes ``silu(gate) * up``.
* With ``splits > 1`` the grid has ``splits`` blocks on each group of rows, each taking a
  contiguous share of K's steps. A block adds its warps' partial sums as above and parks them in a
  workspace in global memory; the block that arrives last at its group (an atomic count) adds the
  ``splits`` shares in order and runs the epilogue, then sets the count back to zero for the next
  launch. x costs the L2 ``M / rows per block`` of the weight's bytes per block's share of K, so
  splitting K over blocks lets a block own more rows (x read once for all of them) and still give
  every SM work: at M = 32, x read by 16-row blocks had cost the L2 twice the weight's bytes.

With ``normalise`` the product is of each x row divided by its root mean square, ``x / sqrt(mean(x^2)
+ eps)``: RMSNorm without its weight, which the caller has folded into the weight's columns
(``W diag(gamma)``). Each lane adds the squares of the x words it loads anyway (its row ``g``, its
columns) as it goes; the sums meet across the warp by shuffles and across K slices in shared memory,
and the epilogue scales the row's products by ``1 / rms`` before bias and SiLU. So the RMSNorm that a
decode GEMM follows costs neither a kernel nor a pass over x, only those FMAs.

With ``rope_dim = D`` the kernel is a layer's QKV projection that also does RoPE and the K / V cache
store (:func:`.reference.linear_rope_store_kv`), so no kernel runs between QKV and attention.
RoPE rotates row ``j < D / 2`` of a q or k head with row ``j + D / 2``; a warp's W tile of 16
rows therefore takes rows ``8 i .. 8 i + 7`` and ``D / 2 + 8 i .. D / 2 + 8 i + 7`` of its head
(:func:`rope_row`), so that the two rows of each pair land in one fragment, registers ``c`` and
``c + 2`` of one lane. The epilogue rotates them in float32 by the angles of the row's position,
writes them where they belong in out (the head's own order), and writes the k and v rows of
tokens with a slot into the caches.

Rows past N and x rows past M are clamped for loading and never stored. K must be a multiple of 8
and x and weight 16-byte aligned (the launcher checks).

Measured on an H200 (graph-timed, weights rotated, Llama-3-8B shapes, :mod:`bench.gemm_sweep`): the
wide shapes (gate-up, down, lm_head) reach 83-102% of copy bandwidth up to M = 16; QKV and o stop at
60-80% because one launch of 34-50 MB is latency-bound (a bare 16-byte read of the same bytes reaches
81-87%); at M = 32 each warp re-reads x (x traffic is M / rows per block of the weight's), 46-82%.
The L2 prefetch hint of the weight loads was worth 1.1-1.4x; a cp.async ring in shared memory,
register double-buffering and an L1-leaning carveout measured no faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from numba import cuda, float32, int64, uint32

from .common import SIMULATOR
from .intrinsics import arrived_last, await_previous_kernels, load_f32_l2, unpack_f16x2
from .mma import load_words, load_words_stream, mma_16816

WARP = 32
FULL_MASK = 0xFFFFFFFF
CHUNK = 8  # float16 per 16-byte load
STEP_K = 4 * CHUNK  # columns of K per step: 4 lanes of a row, 16 bytes each
SHARED_BYTES = 48 * 1024


@dataclass(frozen=True)
class MmaConfig:
    """One compiled variant: tiles per warp, warps per block, loads in flight."""

    tiles_w: int  # 16-row W tiles per warp; even when fused (half gate, half up)
    tiles_x: int  # 8-row x tiles (covers M)
    warps_n: int  # warps on different rows
    warps_k: int  # warps splitting K
    unroll: int  # steps whose loads are issued together
    fused: bool = False  # SiLU-mul epilogue over [gate | up] weight rows
    normalise: bool = False  # x rows divided by their RMS (module doc)
    max_registers: int = 0  # a cap for ptxas (0: none)
    rope_dim: int = 0  # QKV: head dim of the RoPE and cache-store epilogue (module doc; 0: none)
    splits: int = 1  # blocks splitting K, whose sums meet in a workspace (module doc)

    @property
    def threads(self) -> int:
        return WARP * self.warps_n * self.warps_k

    @property
    def outputs_per_warp(self) -> int:
        """Output columns (n) per warp: 16 per W tile, half of them when gate and up pair up."""
        return 16 * self.tiles_w // (2 if self.fused else 1)

    @property
    def outputs_per_block(self) -> int:
        return self.outputs_per_warp * self.warps_n

    @property
    def shared_floats(self) -> int:
        """Shared memory of the split-K reduction: every warp's partial sums (and, normalising, each K
        slice's sums of squares of the x rows)."""
        squares = self.warps_k * 8 * self.tiles_x if self.normalise else 0
        return self.warps_k * self.warps_n * self.tiles_w * self.tiles_x * 4 * WARP + squares

    @property
    def parked_floats(self) -> int:
        """Workspace a block of a ``splits > 1`` variant parks its share in: its outputs' sums over its
        share of K as fragments (gate and up tiles alike), then, normalising, its x rows' squares."""
        return self.warps_n * self.tiles_w * self.tiles_x * 4 * WARP + (8 * self.tiles_x if self.normalise else 0)

    @property
    def words(self) -> int:
        """32-bit values a lane keeps in registers: the loaded words and the sums. Past about 160,
        NVVM 12.9 stops unrolling the loops over them and they go to local memory."""
        return 4 * self.unroll * (2 * self.tiles_w + self.tiles_x) + 4 * self.tiles_w * self.tiles_x


@cuda.jit(device=True)
def silu(value):
    """``value * sigmoid(value)`` in float32."""
    return value / (float32(1) + math.exp(-value))


@cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
def add_squares(words, at, total):
    """``total`` plus the squares of the 8 float16 in ``words[at : at + 4]``, in float32."""
    for q in range(4):
        low, high = unpack_f16x2(words[at + q])
        total += low * low + high * high
    return total


def rope_row(n: int, head_dim: int) -> int:
    """The weight row a ``rope_dim`` kernel puts at row ``n`` of its tiles: tile ``i`` of a head
    holds rows ``8 i ..`` of its first half, then the same rows of its second (module doc)."""
    head = n // head_dim
    j = n - head * head_dim
    i = j // 16
    r = j - 16 * i
    if r >= 8:
        r += head_dim // 2 - 8
    return head * head_dim + 8 * i + r


_rope_row = cuda.jit(device=True)(rope_row)  # the same in the kernel


@lru_cache(maxsize=None)
def mma_kernel(config: MmaConfig) -> Callable:
    """The kernel for ``config``; signature :func:`.gemm.mma_signature` (float16; with
    ``config.rope_dim``, the RoPE and cache-store arguments after the norm's eps and the split-K workspace)."""
    tiles_w, tiles_x = config.tiles_w, config.tiles_x
    warps_n, warps_k, unroll, fused = config.warps_n, config.warps_k, config.unroll, config.fused
    normalise, splits = config.normalise, config.splits
    assert config.shared_floats * 4 <= SHARED_BYTES, config
    rows_w = 2 * tiles_w  # weight rows a lane loads per step (g and g + 8 of each tile)
    tiles_out = tiles_w // 2 if fused else tiles_w  # W tiles whose rows are outputs (gate tiles)
    per_warp = 16 * tiles_out
    per_block = per_warp * warps_n
    acc_size = tiles_w * tiles_x * 4
    w_words = unroll * rows_w * 4
    x_words = unroll * tiles_x * 4
    slot = warps_n * acc_size * WARP  # one warp_k's partial sums in shared memory
    squares_at = warps_k * slot  # then each K slice's sums of squares of the 8 * tiles_x x rows
    shared_size = config.shared_floats
    outputs = warps_n * tiles_out * tiles_x * 4 * WARP  # output values per block, as fragments
    threads = config.threads
    x_rows = 8 * tiles_x
    parked = config.parked_floats
    slices = 1 if splits > 1 else warps_k  # partial sums per output the epilogue adds
    D = config.rope_dim
    half = D // 2
    assert not (D and (fused or D % 16)), config

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def load_step(x, weight, K, w_base, x_base, first, w, xw):
        """Load ``unroll`` steps from this lane's column ``first`` on; columns past K read as zeros."""
        for u in range(unroll):
            k = first + u * STEP_K
            inside = k < K
            k = min(k, K - CHUNK)
            for r in range(rows_w):
                v = load_words_stream(weight, w_base[r] + k)
                for q in range(4):
                    w[(u * rows_w + r) * 4 + q] = v[q] if inside else uint32(0)
            for ib in range(tiles_x):
                v = load_words(x, x_base[ib] + k)
                for q in range(4):
                    xw[(u * tiles_x + ib) * 4 + q] = v[q] if inside else uint32(0)

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def multiply(w, xw, acc):
        """``acc += W x`` over the loaded steps: words 0-1 of each 16-byte chunk, then words 2-3."""
        for u in range(unroll):
            for half in range(2):
                for ia in range(tiles_w):
                    wa = (u * rows_w + 2 * ia) * 4 + 2 * half  # row g; row g + 8 is 4 words on
                    for ib in range(tiles_x):
                        xa = (u * tiles_x + ib) * 4 + 2 * half
                        i = (ia * tiles_x + ib) * 4
                        # written out rather than mma.mma_accumulate: through it NVVM schedules this
                        # tuned loop differently (ptxas: 2-8 more instructions a trip)
                        d = mma_16816(
                            w[wa], w[wa + 4], w[wa + 1], w[wa + 5], xw[xa], xw[xa + 1],
                            acc[i], acc[i + 1], acc[i + 2], acc[i + 3],
                        )  # fmt: skip
                        for q in range(4):
                            acc[i + q] = d[q]

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def park(partial, at, count, workspace, to):
        """``workspace[to + i]`` = the warps' ``partial[at + s * count + i]`` added in order, ``i < count``."""
        for i in range(cuda.threadIdx.x, count, threads):
            total = float32(0)
            for s in range(warps_k):
                total += partial[at + s * count + i]
            workspace[to + i] = total

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def gather(workspace, at, count, partial, to):
        """``partial[to + i]`` = the group's parked ``workspace[at + s * parked + i]`` added in order,
        ``i < count``. From L2 only: this SM's L1 may hold a line of them read before they were
        written, by the last block of the group before (groups' shares are not whole lines when
        normalising)."""
        for i in range(cuda.threadIdx.x, count, threads):
            total = float32(0)
            for s in range(splits):
                total += load_f32_l2(workspace, at + s * parked + i)[0]
            partial[to + i] = total

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def gather_shares(partial, workspace, arrivals, group, share):
        """``splits > 1``: park this block's sums (its warps' partials added in order) in the
        workspace; whether this block arrived last at its group, in which case the first slice of
        ``partial`` (and of the squares) now holds the sums over every share, added in order."""
        mine = (group * splits + share) * parked
        park(partial, 0, slot, workspace, mine)
        if normalise:
            park(partial, squares_at, x_rows, workspace, mine + slot)
        if not arrived_last(arrivals, group, splits):
            return False
        first = group * splits * parked
        gather(workspace, first, slot, partial, 0)
        if normalise:
            gather(workspace, first + slot, x_rows, partial, squares_at)
        if cuda.threadIdx.x == 0:
            arrivals[group] = 0  # ready for the next launch
        cuda.syncthreads()
        return True

    @cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))
    def body(
        x, weight, bias, residual, out, M, N, K, has_bias, has_residual, eps, workspace, arrivals,
        positions, cos_sin, slots, k_cache, v_cache, q_heads, kv_heads,
    ):
        """Both kernels: the arguments from ``positions`` on are the RoPE variant's (never read when
        ``rope_dim`` is 0), which adds no residual; ``workspace`` and ``arrivals`` are read only when
        ``splits > 1``."""
        await_previous_kernels()
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        wn = warp // warps_k
        wk = warp - wn * warps_k
        g = lane // 4
        t = lane % 4
        group = cuda.blockIdx.x // splits  # blocks of one group of rows are neighbours
        share = cuda.blockIdx.x - group * splits
        n0 = group * per_block + wn * per_warp
        stride = 4 * warps_k * unroll * CHUNK  # columns one iteration of the block covers
        iterations = (K + stride - 1) // stride
        per_share = (iterations + splits - 1) // splits
        begin = share * per_share
        end = min(begin + per_share, iterations)
        first = (wk * unroll * 4 + t) * CHUNK  # this lane's column at step 0 of iteration 0

        rotated = (q_heads + kv_heads) * D  # rope_dim: the q and k rows
        w_base = cuda.local.array(rows_w, int64)
        for ia in range(tiles_w):
            for h in range(2):
                n = min(n0 + 16 * (ia % tiles_out) + 8 * h + g, N - 1)
                if D and n < rotated:
                    n = _rope_row(n, D)
                w_base[2 * ia + h] = (n + (N if ia >= tiles_out else 0)) * K
        x_base = cuda.local.array(tiles_x, int64)
        for ib in range(tiles_x):
            x_base[ib] = min(8 * ib + g, M - 1) * K

        acc = cuda.local.array(acc_size, float32)
        for i in range(acc_size):
            acc[i] = 0
        w = cuda.local.array(w_words, uint32)
        xw = cuda.local.array(x_words, uint32)
        squares = cuda.local.array(tiles_x, float32)  # this lane's share of x row 8 ib + g
        for ib in range(tiles_x):
            squares[ib] = 0
        for it in range(begin, end):
            load_step(x, weight, K, w_base, x_base, first + it * stride, w, xw)
            multiply(w, xw, acc)
            if normalise:
                for u in range(unroll):
                    for ib in range(tiles_x):
                        squares[ib] = add_squares(xw, (u * tiles_x + ib) * 4, squares[ib])

        # Each warp parks its partial sums in its slot; then each output's thread adds the warps_k
        # partial sums in order (no atomics: results do not depend on timing). Output e is register c
        # of tile (ia, ib) in lane e % 32 of the warps wn: W row 16 ia + 8 (c // 2) + g, x row
        # 8 ib + 2 t + c % 2; when fused, its up partner is tile ia + tiles_out in the same lane.
        partial = cuda.shared.array(shared_size, float32)
        for i in range(acc_size):
            partial[wk * slot + (wn * acc_size + i) * WARP + lane] = acc[i]
        if normalise:  # the 4 lanes of row g hold its columns of this K slice
            for ib in range(tiles_x):
                total = squares[ib]
                total += cuda.shfl_xor_sync(FULL_MASK, total, 1)
                total += cuda.shfl_xor_sync(FULL_MASK, total, 2)
                if wn == 0 and t == 0:
                    partial[squares_at + wk * x_rows + 8 * ib + g] = total
        cuda.syncthreads()
        if splits > 1 and not gather_shares(partial, workspace, arrivals, group, share):
            return
        for e in range(tid, outputs, threads):
            src_lane = e % WARP
            fragment = e // WARP
            c = fragment % 4
            ib = (fragment // 4) % tiles_x
            ia = (fragment // (4 * tiles_x)) % tiles_out
            src_wn = fragment // (4 * tiles_x * tiles_out)
            m = 8 * ib + 2 * (src_lane % 4) + c % 2
            n = group * per_block + src_wn * per_warp + 16 * ia + 8 * (c // 2) + src_lane // 4
            if m < M and n < N:
                at = (src_wn * acc_size + (ia * tiles_x + ib) * 4 + c) * WARP + src_lane
                total = float32(0)
                for s in range(slices):
                    total += partial[s * slot + at]
                scale = float32(1)
                if normalise:
                    sum_squares = float32(0)
                    for s in range(slices):
                        sum_squares += partial[squares_at + s * x_rows + m]
                    scale = float32(1) / math.sqrt(sum_squares / float32(K) + eps)
                    total *= scale
                if fused:
                    up = float32(0)
                    for s in range(slices):
                        up += partial[s * slot + at + tiles_out * tiles_x * 4 * WARP]
                    total = silu(total) * (up * scale)
                elif D and n < rotated:
                    # the pair's other row: register c ^ 2 of the same lane and tile, row n ^ 8
                    pair_at = at + (2 - 4 * (c // 2)) * WARP
                    pair = float32(0)
                    for s in range(slices):
                        pair += partial[s * slot + pair_at]
                    pair *= scale
                    pair_n = _rope_row(n ^ 8, D)
                    n = _rope_row(n, D)
                    if has_bias:
                        total += float32(bias[n])
                        pair += float32(bias[pair_n])
                    j = n % D
                    angle = int64(positions[m]) * D + j % half
                    cos, sin = cos_sin[angle], cos_sin[angle + half]
                    total = total * cos - pair * sin if j < half else total * cos + pair * sin
                else:
                    if has_bias:
                        total += float32(bias[n])
                    if has_residual:
                        total += float32(residual[m * N + n])
                out[m * N + n] = total
                if D and n >= q_heads * D:  # a k or v row: into the cache at the token's slot
                    slot_m = slots[m]
                    row = n - q_heads * D
                    kv_row = kv_heads * D
                    if 0 <= slot_m < k_cache.shape[0] // kv_row:
                        if row < kv_row:
                            k_cache[int64(slot_m) * kv_row + row] = total
                        else:
                            v_cache[int64(slot_m) * kv_row + row - kv_row] = total

    def kernel(x, weight, bias, residual, out, M, N, K, has_bias, has_residual, eps, workspace, arrivals):
        body(
            x, weight, bias, residual, out, M, N, K, has_bias, has_residual, eps, workspace, arrivals,
            x, x, x, x, x, M, M,
        )

    def rope_kernel(
        x, weight, bias, residual, out, M, N, K, has_bias, has_residual, eps, workspace, arrivals,
        positions, cos_sin, slots, k_cache, v_cache, q_heads, kv_heads,
    ):
        """``kernel``, and RoPE and the cache store in its epilogue: positions and slots ``[M]``,
        cos_sin flat ``[P * D]``, caches flat ``[slots * kv_heads * D]``."""
        body(
            x, weight, bias, residual, out, M, N, K, has_bias, has_residual, eps, workspace, arrivals,
            positions, cos_sin, slots, k_cache, v_cache, q_heads, kv_heads,
        )

    return rope_kernel if D else kernel
