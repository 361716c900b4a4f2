"""The wgmma building blocks against NumPy: the descriptor's bits (anywhere), and on a Hopper GPU one
warpgroup multiplying float16 tiles from shared memory, unswizzled and with the 128-byte swizzle.
Each kernel writes back every accumulator register, so a wrong layout shows as a precise mismatch."""

import numpy as np
import pytest
from numba import cuda, float32, uint16

from infinilm_nb.kernels import intrinsics
from infinilm_nb.kernels.common import launch_stream
from infinilm_nb.kernels.wgmma import (
    ACCUMULATORS, MMA_BY_WIDTH, MMA_RS_BY_WIDTH, SWIZZLE_128B, SWIZZLE_NONE, fence_proxy_async, hold_registers,
    matrix_descriptor, mn_major_k_step, supported, wgmma_commit, wgmma_fence, wgmma_m64n64k16, wgmma_wait,
)
from tests.conftest import ON_GPU

THREADS = 128  # one warpgroup
TILE = 64  # rows of A (M) and of B (N)


def _descriptor_kernel(fields, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = matrix_descriptor(fields[i, 0], fields[i, 1], fields[i, 2], fields[i, 3])


def test_matrix_descriptor_packs_the_ptx_fields(kb):
    fields = np.array([[0x400, 128, 256, SWIZZLE_NONE], [0x2400, 16, 1024, SWIZZLE_128B],
                       [0x3FFF0, 0, 0, 3], [0x40010, 32, 64, 2]], np.int64)  # the last address wraps past 18 bits
    out = kb.asarray(np.zeros(len(fields), np.uint64))
    kernel = cuda.jit("void(int64[:, ::1], uint64[::1])")(_descriptor_kernel)
    kernel[1, 32, launch_stream()](kb.asarray(fields), out)
    want = [0x40 | 8 << 16 | 16 << 32, 0x240 | 1 << 16 | 64 << 32 | 1 << 62, 0x3FFF | 3 << 62,
            0x1 | 2 << 16 | 4 << 32 | 2 << 62]
    assert kb.to_host(out).tolist() == want


gpu_only = pytest.mark.skipif(not (ON_GPU and supported()), reason="wgmma needs a Hopper GPU")


@cuda.jit(device=True)
def _unswizzled_index(row, k):
    """Element (row, k) of a K-major 64 x 16 tile of core matrices (8 rows x 8 columns, 128 bytes
    each), K-neighbours 128 bytes apart and row-neighbours 256: as float16 elements."""
    return ((row // 8) * 256 + (k // 8) * 128 + (row % 8) * 16 + (k % 8) * 2) // 2


@cuda.jit(device=True)
def _swizzled_index(row, k):
    """Element (row, k) of a 64 x 64 tile with the 128-byte swizzle: chunk c of row r at c ^ (r % 8)."""
    return row * 64 + ((k // 8) ^ (row % 8)) * 8 + k % 8


def _unswizzled_kernel(a_src, b_src, out, accumulate):
    """acc = out's values; one m64n64k16 (accumulating into them or not); out = acc."""
    tid = cuda.threadIdx.x
    a = cuda.shared.array(1024, uint16, alignment=1024)
    b = cuda.shared.array(1024, uint16, alignment=1024)
    for i in range(tid, TILE * 16, THREADS):
        at = _unswizzled_index(i // 16, i % 16)
        a[at] = a_src[i]
        b[at] = b_src[i]
    fence_proxy_async()
    cuda.syncthreads()
    acc = cuda.local.array(ACCUMULATORS, float32)
    for i in range(ACCUMULATORS):
        acc[i] = out[tid, i]
    desc_a = matrix_descriptor(intrinsics.shared_address(a, 0), 128, 256, SWIZZLE_NONE)
    desc_b = matrix_descriptor(intrinsics.shared_address(b, 0), 128, 256, SWIZZLE_NONE)
    hold_registers(acc, ACCUMULATORS)
    wgmma_fence()
    wgmma_m64n64k16(acc, 0, desc_a, desc_b, accumulate)
    wgmma_commit()
    wgmma_wait(0)
    hold_registers(acc, ACCUMULATORS)
    for i in range(ACCUMULATORS):
        out[tid, i] = acc[i]


def _collector(count):
    """A device function that waits for the warpgroup's wgmma and stores its ``count`` accumulators
    into ``out[tid]``."""

    @cuda.jit(device=True)
    def collect(acc, out, tid):
        wgmma_wait(0)
        hold_registers(acc, count)
        for i in range(count):
            out[tid, i] = acc[i]

    return collect


def _swizzled_kernel(width):
    """out = the accumulators of A[64 x 64] @ B[width x 64]^T: four k16 steps of m64n<width>k16 on
    swizzled tiles."""
    count = width // 2
    a_elements, b_elements = TILE * 64, width * 64  # shared array sizes must be plain constants
    multiply = MMA_BY_WIDTH[width]
    collect = _collector(count)

    def kernel(a_src, b_src, out):
        tid = cuda.threadIdx.x
        a = cuda.shared.array(a_elements, uint16, alignment=1024)
        b = cuda.shared.array(b_elements, uint16, alignment=1024)
        for i in range(tid, b_elements, THREADS):
            at = _swizzled_index(i // 64, i % 64)
            if i < a_elements:
                a[at] = a_src[i]
            b[at] = b_src[i]
        fence_proxy_async()
        cuda.syncthreads()
        acc = cuda.local.array(count, float32)
        base_a = intrinsics.shared_address(a, 0)
        base_b = intrinsics.shared_address(b, 0)
        wgmma_fence()
        for step in range(4):
            desc_a = matrix_descriptor(base_a + 32 * step, 16, 1024, SWIZZLE_128B)
            desc_b = matrix_descriptor(base_b + 32 * step, 16, 1024, SWIZZLE_128B)
            multiply(acc, 0, desc_a, desc_b, step)
        wgmma_commit()
        collect(acc, out, tid)

    return kernel


PANEL = 64 * 64  # float16 elements of a 64 x 64 panel of an MN-major B


def _registers_kernel(width):
    """out = the accumulators of A[64 x 64] @ B[64 x width]: four k16 steps of m64n<width>k16_rs, A
    from registers (mma A fragments packed from a float32 copy), B MN-major in swizzled panels."""
    count = width // 2
    b_elements = width * 64
    multiply = MMA_RS_BY_WIDTH[width]
    collect = _collector(count)

    def kernel(a_src, b_src, out):
        tid = cuda.threadIdx.x
        warp, g, t = tid // 32, tid % 32 // 4, tid % 4
        b = cuda.shared.array(b_elements, uint16, alignment=1024)
        for i in range(tid, b_elements, THREADS):
            k, n = i // width, i % width
            b[(n // 64) * PANEL + _swizzled_index(k, n % 64)] = b_src[i]
        fence_proxy_async()
        cuda.syncthreads()
        acc = cuda.local.array(count, float32)
        base_b = intrinsics.shared_address(b, 0)
        row = 16 * warp + g
        wgmma_fence()
        for step in range(4):
            col = 16 * step + 2 * t
            a0 = intrinsics.pack_f16x2(a_src[row, col], a_src[row, col + 1])
            a1 = intrinsics.pack_f16x2(a_src[row + 8, col], a_src[row + 8, col + 1])
            a2 = intrinsics.pack_f16x2(a_src[row, col + 8], a_src[row, col + 9])
            a3 = intrinsics.pack_f16x2(a_src[row + 8, col + 8], a_src[row + 8, col + 9])
            multiply(acc, 0, a0, a1, a2, a3, mn_major_k_step(base_b, step, 2 * PANEL), step)
        wgmma_commit()
        collect(acc, out, tid)

    return kernel


def _fragments(d: np.ndarray) -> np.ndarray:
    """``[128, N / 2]``: what thread t holds in acc[i] of the 64 x N result ``d`` (module doc of .wgmma)."""
    out = np.zeros((THREADS, d.shape[1] // 2), np.float32)
    for tid in range(THREADS):
        warp, lane = tid // 32, tid % 32
        for i in range(d.shape[1] // 2):
            j, e = i // 4, i % 4
            out[tid, i] = d[16 * warp + lane // 4 + 8 * (e // 2), 8 * j + 2 * (lane % 4) + e % 2]
    return out


@gpu_only
@pytest.mark.gpu
def test_wgmma_m64n64k16_unswizzled_sets_then_accumulates(kb, rng):
    a = rng.standard_normal((TILE, 16)).astype(np.float16)
    b = rng.standard_normal((TILE, 16)).astype(np.float16)
    product = _fragments(a.astype(np.float32) @ b.astype(np.float32).T)
    kernel = cuda.jit("void(uint16[::1], uint16[::1], float32[:, ::1], int32)")(_unswizzled_kernel)
    a_d, b_d = (kb.asarray(m.view(np.uint16).reshape(-1)) for m in (a, b))
    out = kb.asarray(np.full((THREADS, ACCUMULATORS), np.nan, np.float32))  # not accumulating: ignored
    kernel[1, THREADS, launch_stream()](a_d, b_d, out, 0)
    np.testing.assert_allclose(kb.to_host(out), product, rtol=1e-3, atol=1e-3)
    kernel[1, THREADS, launch_stream()](a_d, b_d, out, 1)
    np.testing.assert_allclose(kb.to_host(out), 2 * product, rtol=1e-3, atol=2e-3)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, 128, 256])
def test_wgmma_of_each_width_on_128_byte_swizzled_tiles(kb, rng, width):
    a = rng.standard_normal((TILE, 64)).astype(np.float16)
    b = rng.standard_normal((width, 64)).astype(np.float16)
    kernel = cuda.jit("void(uint16[::1], uint16[::1], float32[:, ::1])")(_swizzled_kernel(width))
    out = kb.asarray(np.full((THREADS, width // 2), np.nan, np.float32))
    kernel[1, THREADS, launch_stream()](*(kb.asarray(m.view(np.uint16).reshape(-1)) for m in (a, b)), out)
    np.testing.assert_allclose(kb.to_host(out), _fragments(a.astype(np.float32) @ b.astype(np.float32).T),
                               rtol=1e-3, atol=5e-3)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("width", [64, 128])
def test_wgmma_with_a_from_registers_and_an_mn_major_b(kb, rng, width):
    a = rng.standard_normal((TILE, 64)).astype(np.float16)
    b = rng.standard_normal((64, width)).astype(np.float16)  # [k][n], as a V tile is stored
    kernel = cuda.jit("void(float32[:, ::1], uint16[::1], float32[:, ::1])")(_registers_kernel(width))
    out = kb.asarray(np.full((THREADS, width // 2), np.nan, np.float32))
    kernel[1, THREADS, launch_stream()](kb.asarray(a.astype(np.float32)), kb.asarray(b.view(np.uint16).reshape(-1)),
                                       out)
    np.testing.assert_allclose(kb.to_host(out), _fragments(a.astype(np.float32) @ b.astype(np.float32)),
                               rtol=1e-3, atol=5e-3)
