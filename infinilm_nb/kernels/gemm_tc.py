"""The float16 prefill linear on tensor cores: ``out = x @ weight.T (+ bias) (+ residual)``, M >= 64.

``weight`` is ``[N, K]`` row-major, which is exactly the "col" B operand of
``mma.sync.m16n8k16.row.col`` with x as the row-major A operand, so neither operand is transposed.

* A block computes a ``block_m x block_n`` tile of out with ``warps_m x warps_n`` warps, each owning
  a ``(block_m / warps_m) x (block_n / warps_n)`` sub-tile as ``16 x 8`` mma tiles, float32
  accumulators in registers.
* K is walked ``block_k`` (32 or 64) columns at a time through a ``stages``-deep ring of shared-memory
  tiles filled by ``cp.async`` (16 bytes per copy, L1 bypassed). One barrier per K tile: after it,
  tile ``kt`` has landed for every thread and everyone is done with tile ``kt - 1``, whose slot the
  copies for tile ``kt + stages - 1`` then refill while the warps compute on tile ``kt``.
* Shared tiles are row-major with ``2 * block_k``-byte rows (4 or 8 chunks of 16 bytes) and no
  padding (3 stages of 128 + 128 rows of 64 bytes fill the 48 KB of static shared memory exactly;
  larger rings are dynamic shared memory, up to Hopper's 227 KB a block). Chunk ``c`` of row ``r``
  is stored at chunk ``c ^ ((r >> 1) & 3)`` in 64-byte rows, ``c ^ (r & 7)`` in 128-byte rows.
  ldmatrix reads one chunk column of 8 consecutive rows per phase: unswizzled those would hit the
  same 4 banks several times over, swizzled they cover all 32 banks. A k-step (16 columns, 2
  chunks) flips chunk bits 1 and up: the offset of k-step ``kk`` is that of k-step 0 ``^ (kk << 5)``.
* Fragments come from ``ldmatrix.x4`` (see :mod:`.intrinsics` and :mod:`.mma` for the layouts): for
  an A tile, lane ``l`` addresses row ``l % 16`` at k-chunk ``l // 16``, giving ``a0..a3``; for a pair
  of B tiles (16 weight rows), lane ``l`` addresses row ``l % 8 + 8 (l // 16)`` at k-chunk
  ``(l // 8) % 2``, giving ``b0, b1`` of the first tile then of the second.
* Ragged edges: rows past M or N and K chunks past K are copied with ``src-size`` 0, which fills
  the shared chunk with zeros (K % 8 == 0, so a 16-byte chunk is wholly inside K or wholly past it);
  the epilogue stores only in-range elements.
* Epilogue: each warp parks its accumulators, one 16-row tile row at a time, in its own slice of
  the (then idle) shared memory and reads them back along n, so that stores are coalesced; it adds
  ``bias`` and ``residual`` as in :func:`.gemm.linear`. The tile rows are written out one call each
  (at most four: warp sub-tiles of up to 64 rows), so that with 64 x 64 sub-tiles (128 accumulators
  a thread) NVVM still keeps the accumulators in registers. Fused (``linear_silu_mul``): each warp's B
  rows are half gate rows, half the matching up rows, so a warp holds both products of an output
  and writes ``silu(gate) * up``.
* Blocks are numbered in groups of ``GROUP_M`` tile rows, column by column, so that the blocks
  resident at once share their x rows and weight rows in L2.
* ``wgmma`` (a variant, sm_90 only, :mod:`.wgmma`): the same ring of 64-column tiles, whose
  ``c ^ (r & 7)`` chunk order is wgmma's 128-byte swizzle once the ring starts on a 1024-byte
  boundary. Each warpgroup (4 warps, 16 rows each) multiplies its 64 rows by every column of the
  block (64, 128 or 256) in one m64nNk16 per 16 columns of K, straight from shared memory through
  matrix descriptors; no ldmatrix. It waits for its products at the end of each K tile, so the
  refill after the next barrier is safe; with ``in_flight = 1`` it leaves them running over the
  next barrier and the refills skip their stage (one tile less of lookahead). The accumulators
  keep the mma fragment layout, so the epilogue is the same.

Preconditions (the launcher in :mod:`.gemm` checks them): float16, K % 8 == 0, x and weight
16-byte aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from numba import cuda, float32, int32, int64, uint32

from .common import STATIC_SHARED_BYTES, TENSOR_CORES
from .gemm_mma import silu
from .intrinsics import (
    await_previous_kernels, cp_async_16, cp_async_commit, cp_async_wait_group, ldmatrix_x4, shared_address,
)
from .mma import mma_accumulate
from .vector import inline_device
from .wgmma import (
    MMA_BY_WIDTH, fence_proxy_async, hold_registers, swizzled_k_step, wgmma_commit, wgmma_fence, wgmma_wait,
)

# The switch: off (common.TENSOR_CORES, INFINILM_NB_TENSOR_CORES=0) sends every float16 prefill linear
# to the CUDA-core tiled kernel.
ENABLED = TENSOR_CORES
MIN_M = 64  # smaller M is decode: gemm_mma.py / the CUDA-core decode kernel

WARP = 32
CHUNK = 8  # float16 per 16-byte copy
# Dynamic shared memory a Hopper block may opt in to (227 KB): deeper pipelines than 48 KB holds
MAX_SHARED_BYTES = 227 * 1024
PARK_PAD = 4  # float32 of padding per row of parked accumulators (fewer bank conflicts)
GROUP_M = 8  # tile rows per raster group
SWIZZLE_ATOM = 1024  # bytes: wgmma's 128-byte swizzle repeats every 8 rows, and its tiles start on it


@dataclass(frozen=True)
class TcConfig:
    """One compiled variant of the tensor-core GEMM."""

    block_m: int = 128
    block_n: int = 128  # weight rows per block (fused: half gate, half up)
    warps_m: int = 2
    warps_n: int = 4
    stages: int = 3
    fused: bool = False
    block_k: int = 32  # K columns per stage: 64-byte rows, or 128-byte rows at 64
    wgmma: bool = False  # Hopper's warpgroup MMA from the shared tiles instead of ldmatrix + mma.sync
    # wgmma groups left running past a K tile (wgmma only): 1 overlaps the next tile's barrier and
    # copies with this tile's products, and costs a stage of lookahead (the refill skips the tile
    # still being read)
    in_flight: int = 0

    @property
    def row_bytes(self) -> int:
        return 2 * self.block_k

    @property
    def chunks_k(self) -> int:
        """16-byte chunks per tile row."""
        return self.block_k // CHUNK

    @property
    def threads(self) -> int:
        return WARP * self.warps_m * self.warps_n

    @property
    def outputs_n(self) -> int:
        """Output columns per block."""
        return self.block_n // 2 if self.fused else self.block_n

    @property
    def label(self) -> str:
        """``block_m x block_n x block_k / warps, stages``, e.g. ``128x128x64/8w s3`` (bench rows)."""
        wgmma = (" wgmma" + ("+1" if self.in_flight else "")) if self.wgmma else ""
        return f"{self.block_m}x{self.block_n}x{self.block_k}/{self.threads // WARP}w s{self.stages}{wgmma}"

    @property
    def shared_bytes(self) -> int:
        """The ring of tiles (with wgmma, and room to start it on a swizzle atom)."""
        return self.stages * (self.block_m + self.block_n) * self.row_bytes + (SWIZZLE_ATOM if self.wgmma else 0)

    def check(self) -> None:
        """Raise ``ValueError`` for a geometry the kernel does not support."""
        wm, wn = self.block_m // self.warps_m, self.block_n // self.warps_n
        ok = (
            wm % 16 == 0
            and wn % 16 == 0
            and self.block_k in (32, 64)
            and (self.block_m * self.chunks_k) % self.threads == 0
            and (self.block_n * self.chunks_k) % self.threads == 0
            and self.stages >= 2 + self.in_flight
            and self.in_flight in ((0, 1) if self.wgmma else (0,))
            and self.shared_bytes <= MAX_SHARED_BYTES
            and self.warps_m * self.warps_n * 16 * (wn + PARK_PAD) * 4 <= self.shared_bytes
            and (not self.fused or (wn // 2) % 8 == 0)
            and wm <= 64  # the epilogue's tile rows are written out, four at most
            # wgmma: each warpgroup takes 64 rows (a warp 16 of them) and every column of the block in
            # one instruction (block_n / 2 accumulators a thread), from 128-byte swizzled rows
            and (not self.wgmma or (wm == 16 and self.warps_m % 4 == 0 and self.warps_n == 1
                                    and self.block_n in MMA_BY_WIDTH and self.block_k == 64))
        )
        if not ok:
            raise ValueError(f"unsupported tensor-core GEMM geometry {self}")


def tc_config(M: int, fused: bool = False, wgmma: bool = False) -> TcConfig:
    """The variant for M rows.

    With ``wgmma`` (a Hopper): 128 x 128 tiles of two warpgroups, 64-column K tiles through 3 stages
    (97 KB): 0.52-0.70x cuBLAS on the Llama-3-8B shapes at M = 512, 2048 and 8192 on an H200, against
    0.37-0.52x for the best mma.sync variant (bench/RESULTS.md, seventh session). Otherwise mma.sync:
    128 x 128 tiles of 8 warps; 64 x 128 tiles of 4 warps at M <= 512, where 128-row tiles leave SMs
    idle. Both give each warp a 64 x 32 sub-tile (6 ldmatrix per 16 mma) and walk K 64 columns at a
    time through 3 stages (96 / 72 KB of dynamic shared memory): half the barriers and waits of
    32-column tiles, which won on every shape at M >= 2048 on an H200 (fifth session)."""
    if wgmma:
        return TcConfig(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True, fused=fused)
    if M <= 512:
        return TcConfig(block_m=64, block_n=128, warps_m=1, warps_n=4, block_k=64, fused=fused)
    return TcConfig(block_k=64, fused=fused)


@lru_cache(maxsize=None)
def tc_kernel(config: TcConfig) -> Callable:
    """The kernel for ``config``; signature :func:`.gemm.kernel_signature` (float16), launched on a
    1-D grid of ``cdiv(N, config.outputs_n) * cdiv(M, config.block_m)`` blocks of ``config.threads`` threads."""
    config.check()
    BM, BN, STAGES, FUSED = config.block_m, config.block_n, config.stages, config.fused
    WARPS_M, WARPS_N = config.warps_m, config.warps_n
    THREADS = config.threads
    WM, WN = BM // WARPS_M, BN // WARPS_N  # warp sub-tile
    MT, NT = WM // 16, WN // 8  # mma tiles per warp along m and n
    HALF = WN // 2  # fused: gate rows per warp, then as many up rows
    OUT_N = config.outputs_n
    BLOCK_K, CHUNKS_K, ROW_BYTES = config.block_k, config.chunks_k, config.row_bytes
    K_STEPS = BLOCK_K // 16
    WIDE_ROWS = CHUNKS_K == 8  # 128-byte rows: swizzle by r & 7 (64-byte rows: by (r >> 1) & 3)
    A_LOADS = BM * CHUNKS_K // THREADS  # 16-byte copies per thread per K tile
    B_LOADS = BN * CHUNKS_K // THREADS
    ROWS_PER_PASS = THREADS // CHUNKS_K
    A_STAGE, B_STAGE = BM * ROW_BYTES, BN * ROW_BYTES
    B_OFFSET = STAGES * A_STAGE
    SMEM_WORDS = config.shared_bytes // 4
    DYNAMIC = config.shared_bytes > STATIC_SHARED_BYTES  # then opted in at launch
    PARK_STRIDE = WN + PARK_PAD  # float32 per parked accumulator row
    PARK_WORDS = 16 * PARK_STRIDE  # one warp's slice: a 16-row tile row
    OUT_W = HALF if FUSED else WN  # output columns per warp
    IN_FLIGHT = config.in_flight
    LOOKAHEAD = STAGES - 1 - IN_FLIGHT  # K tiles being copied ahead of the one computed on
    PENDING = LOOKAHEAD - 1  # copy groups allowed in flight when a tile must have landed
    ACC = MT * NT * 4
    A_FRAGS, B_FRAGS = MT * 4, NT * 2  # fragment words per k-step
    WGMMA = config.wgmma
    GROUP_ROWS = 64 * ROW_BYTES  # wgmma: a warpgroup's A rows, in bytes
    # (the mma.sync configs never call it, but numba types the branch: any width will do there)
    wgmma_block = MMA_BY_WIDTH.get(BN, MMA_BY_WIDTH[64])

    @inline_device
    def swizzle(r):
        """The chunk XOR of tile row ``r`` (module doc)."""
        return r & 7 if WIDE_ROWS else (r >> 1) & 3

    @inline_device
    def k_step(a_k, b_k, af, bf, acc):
        """One 16-deep k-step of the warp's sub-tile: ldmatrix its fragments from the shared
        addresses of A tile 0 and B pair 0 (the others 16 rows apart), then MT x NT mma."""
        for mi in range(MT):
            v = ldmatrix_x4(a_k + mi * 16 * ROW_BYTES)
            for q in range(4):
                af[4 * mi + q] = v[q]
        for p in range(NT // 2):
            v = ldmatrix_x4(b_k + p * 16 * ROW_BYTES)
            for q in range(4):
                bf[4 * p + q] = v[q]  # b0, b1 of n tile 2p, then of n tile 2p + 1
        for mi in range(MT):
            for ni in range(NT):
                i = (mi * NT + ni) * 4
                a = 4 * mi
                mma_accumulate(acc, i, af[a], af[a + 1], af[a + 2], af[a + 3], bf[2 * ni], bf[2 * ni + 1])

    @inline_device
    def k_tile_wgmma(a_stage, b_stage, acc):
        """The warpgroup's 64 rows of the K tile on wgmma: 16 columns at a time (32 bytes into the
        swizzled rows), each one m64n<BN>k16 over every B row; then waits until at most
        ``IN_FLIGHT`` K tiles' products are running, whose stages the next refills skip."""
        hold_registers(acc, ACC)
        wgmma_fence()
        for kk in range(K_STEPS):  # the tiles are one 64-column panel each
            wgmma_block(acc, 0, swizzled_k_step(a_stage, kk, 0), swizzled_k_step(b_stage, kk, 0), 1)
        wgmma_commit()
        if IN_FLIGHT:
            wgmma_wait(1)
        else:
            wgmma_wait(0)
        hold_registers(acc, ACC)

    @inline_device
    def store_tile_row(mi, acc, smem, park, lane, m_warp, n_warp, M, N, bias, residual, out, has_bias, has_residual):
        """The epilogue of the warp's 16-row tile row ``mi`` (a constant at each call): park its
        accumulators in the warp's slice of shared memory (lane (g, t) holds rows g, g + 8 and
        columns 2t, 2t + 1 of each mma tile), read them back a row at a time, lanes along n, and store."""
        g = lane // 4
        t = lane % 4
        for ni in range(NT):
            for q in range(4):
                smem[park + (g + 8 * (q // 2)) * PARK_STRIDE + ni * 8 + 2 * t + q % 2] = acc[(mi * NT + ni) * 4 + q]
        cuda.syncwarp()
        m_tile = m_warp + mi * 16
        for e in range(lane, 16 * OUT_W, WARP):
            row = e // OUT_W
            j = e - row * OUT_W
            m = m_tile + row
            n = n_warp + j
            if m < M and n < N:
                if FUSED:
                    value = silu(smem[park + row * PARK_STRIDE + j]) * smem[park + row * PARK_STRIDE + j + HALF]
                else:
                    value = smem[park + row * PARK_STRIDE + j]
                    if has_bias:
                        value += float32(bias[n])
                    if has_residual:
                        value += float32(residual[m * N + n])
                out[m * N + n] = value
        cuda.syncwarp()  # the slice is read before the next tile row overwrites it

    @inline_device
    def copy_tile(x, weight, a_stage, b_stage, k, K, a_src, a_bytes, a_dst, b_src, b_bytes, b_dst):
        """Start this thread's cp.async copies of the K tile at column ``k`` into the stages at shared
        addresses ``a_stage`` / ``b_stage`` (zero-filled past K)."""
        inside = k < K
        kk = k if inside else 0
        for i in range(A_LOADS):
            cp_async_16(a_stage + a_dst[i], x, a_src[i] + kk, a_bytes[i] if inside else 0)
        for i in range(B_LOADS):
            cp_async_16(b_stage + b_dst[i], weight, b_src[i] + kk, b_bytes[i] if inside else 0)

    def kernel(x, weight, bias, residual, out, M, N, K, has_bias, has_residual):
        await_previous_kernels()
        tid = cuda.threadIdx.x
        lane = tid % WARP
        warp = tid // WARP
        wm = warp // WARPS_N
        wn = warp - wm * WARPS_N
        # Grouped raster: consecutive blocks walk GROUP_M tile rows down one tile column, then the
        # next column, so that the blocks resident at once share a few rows of x and columns of
        # weight in L2 instead of sweeping the whole weight for every row of tiles.
        tiles_n = (N + OUT_N - 1) // OUT_N
        tiles_m = (M + BM - 1) // BM
        per_group = GROUP_M * tiles_n
        first_m = (cuda.blockIdx.x // per_group) * GROUP_M
        rows_in_group = min(tiles_m - first_m, GROUP_M)
        in_group = cuda.blockIdx.x % per_group
        m0 = (first_m + in_group % rows_in_group) * BM
        n0 = (in_group // rows_in_group) * OUT_N
        # float16 tiles addressed by byte (ldmatrix / cp.async need 16-byte aligned rows); float32 in the epilogue
        if DYNAMIC:
            smem = cuda.shared.array(0, float32, alignment=128)
        else:
            smem = cuda.shared.array(SMEM_WORDS, float32, alignment=128)
        base = int32(shared_address(smem, 0))
        if WGMMA:
            base = (base + SWIZZLE_ATOM - 1) & -SWIZZLE_ATOM
        k_tiles = int32((K + BLOCK_K - 1) // BLOCK_K)

        # This thread's copies: chunk column c of rows tid // 4 + i * ROWS_PER_PASS of each tile.
        # Per copy: the source row's first element (0 past the edge), its byte count (16, or 0 to
        # zero-fill) and its swizzled shared offset within a stage.
        c = tid % CHUNKS_K
        a_src = cuda.local.array(A_LOADS, int64)
        a_bytes = cuda.local.array(A_LOADS, int32)
        a_dst = cuda.local.array(A_LOADS, int32)
        for i in range(A_LOADS):
            r = tid // CHUNKS_K + i * ROWS_PER_PASS
            inside = m0 + r < M
            a_src[i] = (m0 + r) * K if inside else 0
            a_bytes[i] = 16 if inside else 0
            a_dst[i] = r * ROW_BYTES + ((c ^ swizzle(r)) << 4)
        b_src = cuda.local.array(B_LOADS, int64)
        b_bytes = cuda.local.array(B_LOADS, int32)
        b_dst = cuda.local.array(B_LOADS, int32)
        for i in range(B_LOADS):
            r = tid // CHUNKS_K + i * ROWS_PER_PASS
            if FUSED:
                j = r % WN  # row j of warp slice r // WN: gate rows first, then the matching up rows
                n = n0 + (r // WN) * HALF + j % HALF
                row = n + N if j >= HALF else n
            else:
                n = n0 + r
                row = n
            b_src[i] = row * K if n < N else 0
            b_bytes[i] = 16 if n < N else 0
            b_dst[i] = r * ROW_BYTES + ((c ^ swizzle(r)) << 4)

        # This lane's ldmatrix offsets (bytes within a stage) at k-step 0 of a tile, for A tile 0 and
        # B tile pair 0. The swizzle only depends on the row mod 8, so the next A tile (B pair) is
        # 16 rows on at the same swizzle, and k-step kk is at offset ^ (kk << 5).
        r = wm * WM + lane % 16
        a_frag = r * ROW_BYTES + (((lane // 16) ^ swizzle(r)) << 4)
        r = wn * WN + lane % 8 + 8 * (lane // 16)
        b_frag = r * ROW_BYTES + ((((lane // 8) % 2) ^ swizzle(r)) << 4)

        acc = cuda.local.array(ACC, float32)
        for i in range(ACC):
            acc[i] = 0

        # Prologue: tiles 0 .. LOOKAHEAD - 1 in flight, one commit group each (empty past K).
        k = c * CHUNK  # this thread's column in the next tile to copy
        for s in range(LOOKAHEAD):
            if s < k_tiles:
                copy_tile(x, weight, base + s * A_STAGE, base + B_OFFSET + s * B_STAGE, k, K,
                          a_src, a_bytes, a_dst, b_src, b_bytes, b_dst)
            cp_async_commit()
            k += BLOCK_K

        af = cuda.local.array(A_FRAGS, uint32)
        bf = cuda.local.array(B_FRAGS, uint32)
        read = int32(0)  # the stage computed on
        write = int32(LOOKAHEAD)  # the stage refilled
        for kt in range(k_tiles):
            cp_async_wait_group(PENDING)
            if WGMMA:
                fence_proxy_async()  # the landed copies visible to wgmma's reads
            cuda.syncthreads()  # tile kt landed for all; all are done with stage `write` (tile kt - 1 - IN_FLIGHT)
            if kt + LOOKAHEAD < k_tiles:
                copy_tile(x, weight, base + write * A_STAGE, base + B_OFFSET + write * B_STAGE, k, K,
                          a_src, a_bytes, a_dst, b_src, b_bytes, b_dst)
            cp_async_commit()
            k += BLOCK_K

            a_stage = base + read * A_STAGE
            b_stage = base + B_OFFSET + read * B_STAGE
            if WGMMA:
                k_tile_wgmma(a_stage + (warp // 4) * GROUP_ROWS, b_stage, acc)
            elif K_STEPS == 2:
                k_step(a_stage + a_frag, b_stage + b_frag, af, bf, acc)
                k_step(a_stage + (a_frag ^ 32), b_stage + (b_frag ^ 32), af, bf, acc)
            else:
                # two at a time (kk = 2 pair + j is at offset ^ (pair << 6) ^ (j << 5)): all four
                # written out take 161 registers, one 8-warp block per SM instead of two
                for pair in range(K_STEPS // 2):
                    a_k, b_k = a_frag ^ (pair << 6), b_frag ^ (pair << 6)
                    k_step(a_stage + a_k, b_stage + b_k, af, bf, acc)
                    k_step(a_stage + (a_k ^ 32), b_stage + (b_k ^ 32), af, bf, acc)
            read = read + 1 if read < STAGES - 1 else 0
            write = write + 1 if write < STAGES - 1 else 0

        # Epilogue, one 16-row mma tile row at a time, each warp on its own: the warp parks its
        # accumulators of tile row mi in its own slice of shared memory (fragment layout: lane
        # (g, t) holds rows g, g + 8 and columns 2t, 2t + 1 of each mma tile), then reads them back
        # a row at a time, lanes along n, so that stores are coalesced and accumulators die early.
        if IN_FLIGHT:
            wgmma_wait(0)
            hold_registers(acc, ACC)
        cp_async_wait_group(0)
        cuda.syncthreads()  # every warp is done reading the pipeline's tiles
        park = warp * PARK_WORDS
        # The tile rows one by one as written, not a loop: NVVM does not unroll a loop over 4 tile rows
        # (the 64-row warp tiles), and a loop index into acc would put it in local memory.
        m_warp, n_warp = m0 + wm * WM, n0 + wn * OUT_W
        store_tile_row(0, acc, smem, park, lane, m_warp, n_warp, M, N, bias, residual, out, has_bias, has_residual)
        if MT > 1:
            store_tile_row(1, acc, smem, park, lane, m_warp, n_warp, M, N, bias, residual, out, has_bias, has_residual)
        if MT > 2:
            store_tile_row(2, acc, smem, park, lane, m_warp, n_warp, M, N, bias, residual, out, has_bias, has_residual)
        if MT > 3:
            store_tile_row(3, acc, smem, park, lane, m_warp, n_warp, M, N, bias, residual, out, has_bias, has_residual)

    return kernel
