"""GPU tests of the tensor-core intrinsics (ldmatrix, cp.async, f16x2 packing and unpacking, mma) against NumPy.

Each kernel is one warp (or two) doing one instruction and writing what it got back, so a wrong
fragment layout shows as a precise mismatch. The simulator has none of these (inline PTX): skipped there.
"""

import numpy as np
import pytest
from numba import cuda, float32, uint32

from infinilm_nb.kernels import intrinsics
from infinilm_nb.kernels.common import launch_stream
from infinilm_nb.kernels.mma import mma_16816

pytestmark = pytest.mark.gpu

ROWS = 32  # four 8 x 8 matrices of float16, one 16-byte row each, stacked: matrix j = rows 8j .. 8j + 7
ROW_WORDS = 128  # ROWS * 4 (shared array sizes must be plain constants)


def _ldmatrix_kernel(load, count):
    """One warp: the 32 x 8 float16 source (as 128 words) goes to shared memory; lane l addresses row
    l (matrix l // 8, row l % 8; x1 / x2 read only the first 8 / 16 addresses) and writes its
    ``count`` words to out[l]."""

    def kernel(src, out):
        lane = cuda.threadIdx.x
        tile = cuda.shared.array(ROW_WORDS, uint32, alignment=16)
        for i in range(4):
            tile[lane * 4 + i] = src[lane * 4 + i]
        cuda.syncthreads()
        words = load(intrinsics.shared_address(tile, lane * 4))
        for j in range(count):
            out[lane, j] = words[j]

    return kernel


def _expected_ldmatrix(source: np.ndarray, count: int, trans: bool) -> np.ndarray:
    """What PTX says lane l gets: word j holds elements (l // 4, 2 (l % 4)) and (l // 4, 2 (l % 4) + 1)
    of matrix j, the first in the low half; transposed, (2 (l % 4), l // 4) and (2 (l % 4) + 1, l // 4)."""
    matrices = source.reshape(4, 8, 8)
    words = np.zeros((32, count), np.uint32)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for j in range(count):
            m = matrices[j].T if trans else matrices[j]
            pair = np.array([m[g, 2 * t], m[g, 2 * t + 1]], np.float16)
            words[lane, j] = pair.view(np.uint32)[0]
    return words


LOADS = {
    (1, False): "ldmatrix_x1",
    (2, False): "ldmatrix_x2",
    (4, False): "ldmatrix_x4",
    (1, True): "ldmatrix_x1_trans",
    (2, True): "ldmatrix_x2_trans",
    (4, True): "ldmatrix_x4_trans",
}


@pytest.mark.parametrize("count,trans", list(LOADS))
def test_ldmatrix_gives_the_ptx_fragment(kb, rng, count, trans):
    source = rng.standard_normal((ROWS, 8)).astype(np.float16)
    kernel = cuda.jit("void(uint32[::1], uint32[:, ::1])")(
        _ldmatrix_kernel(getattr(intrinsics, LOADS[count, trans]), count)
    )
    out = kb.asarray(np.zeros((32, count), np.uint32))
    kernel[1, 32, launch_stream()](kb.asarray(source.view(np.uint32).reshape(-1)), out)
    np.testing.assert_array_equal(kb.to_host(out), _expected_ldmatrix(source, count, trans))


def _cp_async_kernel(src, out, src_bytes):
    """64 threads; thread i copies 16 bytes of src row i to shared slot 63 - i, reading only
    src_bytes[i] of them (the rest zero-filled). Two commit groups: rows 0-31, then 32-63; after
    wait_group(1) the first group must have landed, after wait_group(0) both. out: the slots as words."""
    tid = cuda.threadIdx.x
    tile = cuda.shared.array(256, uint32, alignment=16)
    base = intrinsics.shared_address(tile, 0)
    slot = 63 - tid
    if tid < 32:
        intrinsics.cp_async_16(base + slot * 16, src, tid * 8, src_bytes[tid])
    intrinsics.cp_async_commit()
    if tid >= 32:
        intrinsics.cp_async_16(base + slot * 16, src, tid * 8, src_bytes[tid])
    intrinsics.cp_async_commit()
    intrinsics.cp_async_wait_group(1)
    cuda.syncthreads()
    if tid < 32:
        for i in range(4):
            out[slot * 4 + i] = tile[slot * 4 + i]
    intrinsics.cp_async_wait_group(0)
    cuda.syncthreads()
    if tid >= 32:
        for i in range(4):
            out[slot * 4 + i] = tile[slot * 4 + i]


def test_cp_async_copies_and_zero_fills(kb, rng):
    source = rng.standard_normal(64 * 8).astype(np.float16)
    src_bytes = rng.choice(np.array([0, 8, 16], np.int32), size=64)
    kernel = cuda.jit("void(float16[::1], uint32[::1], int32[::1])")(_cp_async_kernel)
    out = kb.asarray(np.full(64 * 4, 0xFFFFFFFF, np.uint32))
    kernel[1, 64, launch_stream()](kb.asarray(source), out, kb.asarray(src_bytes))
    want = np.zeros((64, 8), np.float16)
    for i in range(64):
        n = src_bytes[i] // 2
        want[63 - i, :n] = source[i * 8 : i * 8 + n]
    np.testing.assert_array_equal(kb.to_host(out).view(np.float16).reshape(64, 8), want)


def _mma_kernel(a, b, c, out):
    """One warp: fragments of A [16, 16], B [16, 8] packed with pack_f16x2 in the layout of .mma,
    D = A @ B + C written back from the accumulator layout."""
    lane = cuda.threadIdx.x
    g, t = lane // 4, lane % 4
    pack = intrinsics.pack_f16x2
    a0 = pack(float32(a[g, 2 * t]), float32(a[g, 2 * t + 1]))
    a1 = pack(float32(a[g + 8, 2 * t]), float32(a[g + 8, 2 * t + 1]))
    a2 = pack(float32(a[g, 2 * t + 8]), float32(a[g, 2 * t + 9]))
    a3 = pack(float32(a[g + 8, 2 * t + 8]), float32(a[g + 8, 2 * t + 9]))
    b0 = pack(float32(b[2 * t, g]), float32(b[2 * t + 1, g]))
    b1 = pack(float32(b[2 * t + 8, g]), float32(b[2 * t + 9, g]))
    d = mma_16816(a0, a1, a2, a3, b0, b1, c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1])
    out[g, 2 * t] = d[0]
    out[g, 2 * t + 1] = d[1]
    out[g + 8, 2 * t] = d[2]
    out[g + 8, 2 * t + 1] = d[3]


def test_mma_of_packed_fragments_matches_numpy(kb, rng):
    a = rng.standard_normal((16, 16)).astype(np.float16)
    b = rng.standard_normal((16, 8)).astype(np.float16)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    kernel = cuda.jit("void(float16[:, ::1], float16[:, ::1], float32[:, ::1], float32[:, ::1])")(_mma_kernel)
    out = kb.asarray(np.full((16, 8), np.nan, np.float32))
    kernel[1, 32, launch_stream()](kb.asarray(a), kb.asarray(b), kb.asarray(c), out)
    want = a.astype(np.float64) @ b.astype(np.float64) + c
    got = kb.to_host(out)
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def _pack_kernel(values, out):
    i = cuda.threadIdx.x
    out[i] = intrinsics.pack_f16x2(values[2 * i], values[2 * i + 1])


def test_pack_f16x2_rounds_and_puts_lo_first(kb, rng):
    values = (rng.standard_normal(64) * 100).astype(np.float32)
    kernel = cuda.jit("void(float32[::1], uint32[::1])")(_pack_kernel)
    out = kb.asarray(np.zeros(32, np.uint32))
    kernel[1, 32, launch_stream()](kb.asarray(values), out)
    np.testing.assert_array_equal(kb.to_host(out), values.astype(np.float16).view(np.uint32))


def _unpack_kernel(words, out):
    i = cuda.threadIdx.x
    lo, hi = intrinsics.unpack_f16x2(words[i])
    out[2 * i] = lo
    out[2 * i + 1] = hi


def test_unpack_f16x2_widens_lo_first(kb, rng):
    halves = (rng.standard_normal(64) * 100).astype(np.float16)
    kernel = cuda.jit("void(uint32[::1], float32[::1])")(_unpack_kernel)
    out = kb.asarray(np.full(64, np.nan, np.float32))
    kernel[1, 32, launch_stream()](kb.asarray(halves.view(np.uint32)), out)
    np.testing.assert_array_equal(kb.to_host(out), halves.astype(np.float32))


def _l2_kernel(values, out):
    i = cuda.threadIdx.x
    chunk = intrinsics.load_f32x4_l2(values, 4 * i)
    for j in range(4):
        out[4 * i + j] = chunk[j] + intrinsics.load_f32_l2(values, 4 * i + j)[0]


def test_l2_loads_read_the_values(kb, rng):
    values = rng.standard_normal(128).astype(np.float32)
    kernel = cuda.jit("void(float32[::1], float32[::1])")(_l2_kernel)
    out = kb.asarray(np.full(128, np.nan, np.float32))
    kernel[1, 32, launch_stream()](kb.asarray(values), out)
    np.testing.assert_array_equal(kb.to_host(out), 2 * values)


def _address_kernel(out):
    tile = cuda.shared.array(64, float32)
    i = cuda.threadIdx.x
    out[i] = intrinsics.shared_address(tile, i) - intrinsics.shared_address(tile, 0)


def test_shared_address_steps_by_itemsize(kb):
    kernel = cuda.jit("void(int64[::1])")(_address_kernel)
    out = kb.asarray(np.zeros(64, np.int64))
    kernel[1, 64, launch_stream()](out)
    np.testing.assert_array_equal(kb.to_host(out), 4 * np.arange(64))
