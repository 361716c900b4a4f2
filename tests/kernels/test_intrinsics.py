import re

import numpy as np
import pytest
from numba import cuda, float32, int64

from infinilm_nb.kernels.common import cdiv, compiled, launch, launch_stream
from infinilm_nb.kernels import reference
from infinilm_nb.kernels.intrinsics import (
    aligned16, arrived_last, as_f32, bf16_to_f32, cluster_blocks, cluster_sync, f32_to_bf16, load_bf16x8, load_f16x8,
    load_f16x8_f32, load_f32_l2, load_f32x4, load_shared_cluster, store_bf16x8, store_f16x8, store_f32x4,
)

SIGNATURES = {np.float16: "void(float16[:, ::1], float16[::1])", np.float32: "void(float32[:, ::1], float32[::1])"}


def _copier(load, width):
    """A kernel function copying ``width`` elements a thread through the 16-byte ``load``."""

    def copy(src, dst):
        i = cuda.grid(1) * width
        if i < src.size:
            v = load(src, i)
            for j in range(width):
                dst[i + j] = v[j]

    return copy


COPIES = {np.float16: (_copier(load_f16x8, 8), 8), np.float32: (_copier(load_f32x4, 4), 4)}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_vector_load_returns_the_elements_in_order(kb, rng, dtype):
    # a 2-D source: the index is flat over the whole C-contiguous array
    src = (rng.standard_normal((3, 24)) * 100).astype(dtype)
    dst = kb.asarray(np.full(src.size, np.nan, dtype))
    pyfunc, width = COPIES[dtype]
    kernel = cuda.jit(SIGNATURES[dtype])(pyfunc)
    kernel[cdiv(src.size // width, 32), 32, launch_stream()](kb.asarray(src), dst)
    np.testing.assert_array_equal(kb.to_host(dst), src.reshape(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_vector_load_is_one_16_byte_load(dtype):
    pyfunc, _ = COPIES[dtype]
    ptx, _ = cuda.compile_ptx(pyfunc, SIGNATURES[dtype])
    assert re.search(r"ld\.global(\.nc)?\.v4\.(u32|b32|f32)", ptx), "no 16-byte vector load in the PTX"
    assert not re.search(r"ld\.global(\.nc)?\.(v2|v4)\.(u16|b16|f16)", ptx), "the load was split"


def _round_trip_f16(src, dst):
    i = cuda.grid(1) * 8
    if i < src.size:
        v = load_f16x8(src, i)
        f = (float32(v[7]), float32(v[6]), float32(v[5]), float32(v[4]))
        g = (float32(v[3]), float32(v[2]), float32(v[1]), float32(v[0]))
        store_f16x8(dst, i, f + g)  # float32 values: the store casts them to float16


def _round_trip_f32(src, dst):
    i = cuda.grid(1) * 4
    if i < src.size:
        v = load_f32x4(src, i)
        store_f32x4(dst, i, (v[3], v[2], v[1], v[0]))


ROUND_TRIPS = {
    np.float16: (_round_trip_f16, 8, "void(float16[:, ::1], float16[:, ::1])"),
    np.float32: (_round_trip_f32, 4, "void(float32[:, ::1], float32[:, ::1])"),
}


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_vector_store_writes_the_elements_in_order(kb, rng, dtype):
    # each thread reverses its 16-byte chunk: lanes that landed in the wrong place would show
    src = (rng.standard_normal((3, 24)) * 100).astype(dtype)
    dst = kb.asarray(np.full(src.shape, np.nan, dtype))
    pyfunc, width, signature = ROUND_TRIPS[dtype]
    kernel = cuda.jit(signature)(pyfunc)
    kernel[cdiv(src.size // width, 32), 32, launch_stream()](kb.asarray(src), dst)
    want = src.reshape(-1, width)[:, ::-1].reshape(src.shape)
    np.testing.assert_array_equal(kb.to_host(dst), want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_vector_store_is_one_16_byte_store(dtype):
    pyfunc, _, signature = ROUND_TRIPS[dtype]
    ptx, _ = cuda.compile_ptx(pyfunc, signature)
    assert re.search(r"st\.global\.v4\.(u32|b32|f32)", ptx), "no 16-byte vector store in the PTX"
    assert not re.search(r"st\.global\.(v2|v4)\.(u16|b16|f16)", ptx), "the store was split"


def test_aligned16_accepts_one_offset_in_eight(kb):
    base = kb.asarray(np.zeros(64, np.float16))
    offsets = [offset for offset in range(8) if aligned16(base[offset:])]
    assert len(offsets) == 1
    start = offsets[0]
    assert aligned16(base[start:], base[start + 8 :])
    assert not aligned16(base[start:], base[start + 1 :])


def _bf16_round_trip(src, widened, doubled):
    """8 bfloat16 at a time through the 16-byte load (widened), and twice each through the store; the
    scalar conversions on element 0."""
    i = cuda.grid(1) * 8
    if i < src.size:
        v = load_bf16x8(src, i)
        for j in range(8):
            widened[i + j] = v[j]
        two = float32(2)
        store_bf16x8(doubled, i, (v[0] * two, v[1] * two, v[2] * two, v[3] * two, v[4] * two, v[5] * two,
                                  v[6] * two, v[7] * two))
        if i == 0:
            widened[0] = bf16_to_f32(src[0])
            doubled[0] = f32_to_bf16(bf16_to_f32(src[0]) * two)


def test_bfloat16_loads_widen_and_stores_round_to_nearest_even(kb, rng):
    values = (rng.standard_normal(48) * 100).astype(np.float32)
    values[[3, 11]] = np.nan, np.inf
    src = reference.cast(values, reference.BF16)
    widened = kb.asarray(np.full(48, np.nan, np.float32))
    doubled = kb.asarray(np.zeros(48, np.uint16))
    kernel = cuda.jit("void(uint16[::1], float32[::1], uint16[::1])")(_bf16_round_trip)
    kernel[1, 32, launch_stream()](kb.asarray(src), widened, doubled)
    np.testing.assert_array_equal(kb.to_host(widened), reference.to_f32(src))
    np.testing.assert_array_equal(kb.to_host(doubled), reference.cast(reference.to_f32(src) * 2, reference.BF16))


def test_reference_bfloat16_rounds_to_nearest_even():
    # 1 + 2^-8 is halfway between bfloat16 1 and 1 + 2^-7: to the even one, 1; 1 + 3 * 2^-8 goes up
    halfway = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38, np.nan], np.float32)
    bits = reference.cast(halfway, reference.BF16)
    assert bits.dtype == np.uint16
    assert bits[:3].tolist() == [0x3F80, 0x3F82, 0xBF80]
    assert bits[3] == 0x7F62 and np.isnan(reference.to_f32(bits)[4])
    np.testing.assert_array_equal(reference.to_f32(np.array([0x3F80, 0xC020], np.uint16)), [1.0, -2.5])


def _widen_each(half, single, bits, out):
    i = cuda.grid(1)
    if i < out.shape[1]:
        out[0, i] = as_f32(half[i])
        out[1, i] = as_f32(single[i])
        out[2, i] = as_f32(bits[i])


def test_as_f32_reads_an_element_of_each_activation_dtype(kb, rng):
    values = rng.standard_normal(40).astype(np.float32)
    bits = reference.cast(values, reference.BF16)
    out = kb.asarray(np.full((3, 40), np.nan, np.float32))
    kernel = cuda.jit("void(float16[::1], float32[::1], uint16[::1], float32[:, ::1])")(_widen_each)
    kernel[2, 32, launch_stream()](kb.asarray(values.astype(np.float16)), kb.asarray(values), kb.asarray(bits), out)
    got = kb.to_host(out)
    np.testing.assert_array_equal(got[0], values.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got[1], values)
    np.testing.assert_array_equal(got[2], reference.to_f32(bits))


def test_float16_load_widened_to_float32(kb, rng):
    src = (rng.standard_normal(40) * 100).astype(np.float16)
    dst = kb.asarray(np.full(40, np.nan, np.float32))
    cuda.jit("void(float16[::1], float32[::1])")(_copier(load_f16x8_f32, 8))[1, 32, launch_stream()](kb.asarray(src), dst)
    np.testing.assert_array_equal(kb.to_host(dst), src.astype(np.float32))


def _share_summer(two_d):
    """A kernel: block ``(group, share)`` writes its share, and the last block of each group to count
    itself in sums the group's shares (``counts`` 1-D, or 2-D indexed by a tuple as attention does)."""

    def kernel(shares, counts, lasts, out):
        group, share, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        blocks, threads = cuda.gridDim.y, cuda.blockDim.x
        shares[(group * blocks + share) * threads + tid] = float32(1000 * group + 10 * share + tid)
        index = (group // 2, group % 2) if two_d else group
        if arrived_last(counts, index, blocks):
            total = float32(0)
            for s in range(blocks):
                total += load_f32_l2(shares, (group * blocks + s) * threads + tid)[0]
            out[group * threads + tid] = total
            if tid == 0:
                lasts[group] += 1
                counts[index] = 0

    return kernel


@pytest.mark.parametrize("two_d", [False, True])
def test_the_last_block_of_a_group_sees_every_share_and_resets_the_count(kb, two_d):
    groups, blocks, threads = 4, 5, 64
    counts = kb.asarray(np.zeros((2, 2) if two_d else 4, np.int32))
    lasts = kb.asarray(np.zeros(groups, np.int32))
    counts_type = "int32[:, ::1]" if two_d else "int32[::1]"
    kernel = cuda.jit(f"void(float32[::1], {counts_type}, int32[::1], float32[::1])")(_share_summer(two_d))
    for launches in range(1, 3):  # the second sees the counts the first reset
        shares = kb.asarray(np.full(groups * blocks * threads, np.nan, np.float32))
        out = kb.asarray(np.full(groups * threads, np.nan, np.float32))
        kernel[(groups, blocks), threads, launch_stream()](shares, counts, lasts, out)
        g, t = np.arange(groups)[:, None], np.arange(threads)[None, :]
        want = blocks * (1000 * g + t) + 10 * blocks * (blocks - 1) // 2
        np.testing.assert_array_equal(kb.to_host(out).reshape(groups, threads), want.astype(np.float32))
        np.testing.assert_array_equal(kb.to_host(lasts), launches)  # one block a group took the shares
        np.testing.assert_array_equal(kb.to_host(counts), 0)


def _cluster_reader(floats, keys, blocks_seen):
    """Each block puts values of its own in shared memory; every thread then adds up those of the
    blocks of its cluster, weighted by rank, so that a block read in another's place shows."""
    row, part, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
    shared_f = cuda.shared.array((2, 3), float32)
    shared_k = cuda.shared.array(2, int64)
    blocks = cluster_blocks()
    if tid == 0:
        shared_f[1, 2] = float32(100 * row + part)
        shared_k[1] = int64(part + 1) << 40
    cluster_sync()
    total_f = float32(0)
    total_k = int64(0)
    for rank in range(blocks):
        total_f += load_shared_cluster(shared_f, 5, rank) * float32(rank + 1)
        total_k += load_shared_cluster(shared_k, 1, rank) * (rank + 1)
    cluster_sync()  # no block leaves while another reads its memory
    floats[row, part, tid] = total_f
    keys[row, part, tid] = total_k
    if tid == 0:
        blocks_seen[row, part] = blocks


@pytest.mark.parametrize("cluster", [None, pytest.param(4, marks=pytest.mark.gpu)])
def test_the_blocks_of_a_cluster_read_each_others_shared_memory(kb, cluster):
    rows, parts, threads = 3, 8, 64
    floats = kb.asarray(np.full((rows, parts, threads), np.nan, np.float32))
    keys = kb.asarray(np.full((rows, parts, threads), -1, np.int64))
    seen = kb.asarray(np.zeros((rows, parts), np.int32))
    kernel = compiled(_cluster_reader, "void(float32[:, :, ::1], int64[:, :, ::1], int32[:, ::1])")
    launch(kernel, (rows, parts), threads, (floats, keys, seen), cluster=None if cluster is None else (1, cluster))
    size = cluster or 1
    row, part = np.arange(rows)[:, None], np.arange(parts)[None, :]
    first = part - part % size  # the cluster's blocks: parts first .. first + size - 1, rank = part - first
    ranks = np.arange(size)[:, None, None]
    want_f = ((100 * row + first + ranks) * (ranks + 1)).sum(axis=0)
    want_k = (((first + ranks + 1) << 40) * (ranks + 1)).sum(axis=0)
    np.testing.assert_array_equal(kb.to_host(seen), size)
    shape = (rows, parts, threads)
    np.testing.assert_array_equal(kb.to_host(floats), np.broadcast_to(want_f[..., None], shape).astype(np.float32))
    np.testing.assert_array_equal(kb.to_host(keys), np.broadcast_to(want_k[..., None], shape))
