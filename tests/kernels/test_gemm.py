from dataclasses import replace

import numpy as np
import pytest

from infinilm_nb.kernels import gemm, gemm_mma, gemm_tc, reference
from infinilm_nb.kernels.common import compiled
from infinilm_nb.kernels.gemm_mma import MmaConfig
from infinilm_nb.kernels.intrinsics import VECTOR_WIDTH
from tests.helpers import as_float, nans, pick, poisoned, random, rel_err, tolerance

# (M, N, K). M <= gemm.DECODE_MAX_M takes the decode kernel (17 loops over groups of x rows), larger
# M the tiled one. K = 40 fits 16-byte loads in every dtype, K = 13 only plain loads. The GPU list
# adds Llama-3-8B decode (QKV 4096 -> 6144, down 14336 -> 4096, gate-up 4096 -> 28672; down at M = 32
# and 61 and o at M = 40 split K over blocks) and prefill shapes; there float16 with K % 8 == 0 and
# M <= gemm.MMA_MAX_M runs on tensor cores (gemm.mma_config's variants), larger M on the tensor-core
# prefill GEMM. bfloat16 (np.uint16 bits) always runs on CUDA cores.
SHAPES = pick(
    sim=[(1, 37, 40), (3, 37, 40), (17, 37, 40), (70, 37, 40), (3, 37, 13), (70, 37, 13)],
    gpu=[
        (1, 37, 40),
        (3, 37, 13),
        (17, 1000, 77),
        (70, 37, 40),
        (70, 130, 13),
        (1, 6144, 4096),
        (8, 6144, 4096),
        (1, 4096, 14336),
        (8, 4096, 14336),
        (16, 4096, 14336),
        (24, 28672, 4096),
        (32, 4096, 4096),
        (32, 4096, 14336),
        (40, 4096, 4096),
        (61, 4096, 14336),
        (64, 128256, 4096),
        (300, 4096, 4096),
    ],
)


def _run(kb, rng, dtype, M, N, K, with_bias, with_residual):
    x = random(rng, (M, K), dtype)
    weight = random(rng, (N, K), dtype, scale=0.1)
    bias = random(rng, N, dtype) if with_bias else None
    residual = random(rng, (M, N), dtype) if with_residual else None
    out = poisoned(kb, (M, N), dtype)
    result = kb.ops.linear(
        kb.asarray(x),
        kb.asarray(weight),
        out,
        bias=None if bias is None else kb.asarray(bias),
        residual=None if residual is None else kb.asarray(residual),
    )
    assert result is out
    want = reference.linear(x, weight, np.empty((M, N), np.float32), bias=bias, residual=residual)
    return kb.to_host(out), want


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_linear_with_bias_and_residual_matches_reference(kb, rng, dtype, M, N, K):
    got, want = _run(kb, rng, dtype, M, N, K, with_bias=True, with_residual=True)
    assert rel_err(got, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("M", [2, 70])
@pytest.mark.parametrize("with_bias,with_residual", [(False, False), (True, False), (False, True)])
def test_linear_epilogues_match_reference(kb, rng, dtype, M, with_bias, with_residual):
    got, want = _run(kb, rng, dtype, M, 37, 40, with_bias, with_residual)
    assert rel_err(got, want) < tolerance(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("M", [5, 70])
def test_linear_out_is_residual(kb, rng, dtype, M):
    x = random(rng, (M, 24), dtype)
    weight = random(rng, (37, 24), dtype, scale=0.1)
    residual = random(rng, (M, 37), dtype)
    residual_d = kb.asarray(residual.copy())  # the simulator's asarray would hand back residual itself
    kb.ops.linear(kb.asarray(x), kb.asarray(weight), residual_d, residual=residual_d)
    want = reference.linear(x, weight, np.empty((M, 37), np.float32), residual=residual)
    assert rel_err(kb.to_host(residual_d), want) < tolerance(dtype)


@pytest.mark.parametrize("M", [3, 70])
def test_linear_bfloat16_stays_on_cuda_cores(kb, rng, monkeypatch, M):
    # with the tensor-core paths switched on (the simulator has them off), bfloat16 must not reach
    # the float16-only mma / prefill kernels, which would read its bits as float16
    monkeypatch.setattr(gemm, "USE_MMA", True)
    monkeypatch.setattr(gemm_tc, "ENABLED", True)
    got, want = _run(kb, rng, np.uint16, M, 37, 40, with_bias=True, with_residual=False)
    assert rel_err(got, want) < tolerance(np.uint16)


@pytest.mark.parametrize("M", [3, 70])
def test_linear_misaligned_operands_take_plain_loads(kb, rng, M):
    # x starts 2 bytes past a 16-byte boundary, so 16-byte loads would fault on the GPU
    x = random(rng, (M, 24), np.float16)
    weight = random(rng, (37, 24), np.float16, scale=0.1)
    buffer = kb.asarray(np.concatenate([np.ones(1, np.float16), x.reshape(-1)]))
    x_d = buffer[1:].reshape(M, 24)
    out = poisoned(kb, (M, 37), np.float16)
    kb.ops.linear(x_d, kb.asarray(weight), out)
    want = reference.linear(x, weight, np.empty((M, 37), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(np.float16)


def _operands(kb, rng, M=4, N=5, K=8, dtype=np.float32):
    return kb.asarray(random(rng, (M, K), dtype)), kb.asarray(random(rng, (N, K), dtype))


def test_linear_rejects_k_mismatch(kb, rng):
    x = kb.asarray(random(rng, (4, 6)))
    weight = kb.asarray(random(rng, (5, 7)))
    with pytest.raises(ValueError, match=r"linear: x \(4, 6\) and weight \(5, 7\) disagree on K"):
        kb.ops.linear(x, weight, kb.asarray(np.zeros((4, 5), np.float32)))


def test_linear_rejects_wrong_output_shape(kb, rng):
    x, weight = _operands(kb, rng)
    with pytest.raises(ValueError, match=r"linear: out must have shape \(4, 5\), got \(5, 4\)"):
        kb.ops.linear(x, weight, kb.asarray(np.zeros((5, 4), np.float32)))


def test_linear_rejects_wrong_bias_and_residual_shapes(kb, rng):
    x, weight = _operands(kb, rng)
    out = kb.asarray(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(5,?\), got \(4,\)"):
        kb.ops.linear(x, weight, out, bias=kb.asarray(np.zeros(4, np.float32)))
    with pytest.raises(ValueError, match=r"linear: residual must have shape \(4, 5\), got \(4, 6\)"):
        kb.ops.linear(x, weight, out, residual=kb.asarray(np.zeros((4, 6), np.float32)))


def test_linear_rejects_mixed_dtypes(kb, rng):
    x, _ = _operands(kb, rng)
    weight16 = kb.asarray(random(rng, (5, 8), np.float16))
    with pytest.raises(ValueError, match=r"linear: weight must have the dtype of x \(float32\), got float16"):
        kb.ops.linear(x, weight16, kb.asarray(np.zeros((4, 5), np.float32)))
    x_bf16 = kb.asarray(random(rng, (4, 8), np.uint16))
    with pytest.raises(ValueError, match=r"linear: weight must have the dtype of x \(bfloat16\), got float16"):
        kb.ops.linear(x_bf16, weight16, kb.asarray(np.zeros((4, 5), np.uint16)))


def test_linear_rejects_non_contiguous_weight(kb, rng):
    x, _ = _operands(kb, rng)
    wide = kb.asarray(random(rng, (5, 16)))
    with pytest.raises(ValueError, match="linear: weight must be C-contiguous"):
        kb.ops.linear(x, wide[:, :8], kb.asarray(np.zeros((4, 5), np.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])
def test_linear_kernels_keep_accumulators_in_registers(dtype):
    # partial sums spill to local memory when NVVM does not fully unroll the loops over them
    vec = VECTOR_WIDTH[np.dtype(dtype)]
    bf16 = dtype == np.uint16
    kernels = [
        gemm._decode_kernel(group, vec, fused, bf16) for group in gemm.DECODE_GROUPS for fused in (False, True)
    ]
    kernels += [gemm._tiled_kernel(vec, fused, bf16) for fused in (False, True)]
    for pyfunc in kernels:
        assert compiled(pyfunc, gemm.kernel_signature(dtype)).get_local_mem_per_thread() == 0, pyfunc


# (M, I, K) of the gate-up projection with SwiGLU fused: weight [2I, K], out [M, I].
FUSED_SHAPES = pick(
    sim=[(1, 21, 40), (17, 21, 40), (70, 21, 40), (3, 21, 13)],
    gpu=[(1, 21, 40), (3, 37, 13), (70, 37, 40), (1, 14336, 4096), (8, 14336, 4096), (32, 14336, 4096),
         (57, 14336, 4096), (300, 1000, 4096)],
)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("M,inter,K", FUSED_SHAPES)
def test_linear_silu_mul_matches_reference(kb, rng, dtype, M, inter, K):
    x = random(rng, (M, K), dtype)
    weight = random(rng, (2 * inter, K), dtype, scale=0.1)
    out = poisoned(kb, (M, inter), dtype)
    assert kb.ops.linear_silu_mul(kb.asarray(x), kb.asarray(weight), out) is out
    want = reference.linear_silu_mul(x, weight, np.empty((M, inter), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


# RMS-normalised x (the input norm folded into the weight): float16 decode normalises inside the
# tensor-core GEMM on the GPU, everything else (and the simulator) runs RMSNorm into normed first.
NORMED_SHAPES = pick(
    sim=[(1, 21, 40), (3, 21, 13), (70, 21, 40)],
    gpu=[(1, 21, 40), (3, 37, 13), (1, 3072, 4096), (8, 3072, 4096), (64, 3072, 4096), (300, 1000, 4096)],
)


@pytest.mark.parametrize("fused", [False, True], ids=["linear", "silu_mul"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("M,N,K", NORMED_SHAPES)
@pytest.mark.parametrize("in_gemm", [True, False], ids=["in_gemm", "norm_kernel"])
def test_linear_of_normalised_rows_matches_reference(kb, rng, monkeypatch, fused, dtype, M, N, K, in_gemm):
    monkeypatch.setattr(gemm, "NORM_IN_GEMM", in_gemm)
    x = random(rng, (M, K), dtype, scale=3.0)
    weight = random(rng, (2 * N if fused else N, K), dtype, scale=0.1)
    out = poisoned(kb, (M, N), dtype)
    normed = poisoned(kb, (M, K), dtype)
    if fused:
        assert kb.ops.linear_silu_mul(kb.asarray(x), kb.asarray(weight), out, norm_eps=1e-5, normed=normed) is out
        want = reference.linear_silu_mul(x, weight, np.empty((M, N), np.float32), norm_eps=1e-5)
    else:
        bias = random(rng, N, dtype)
        got = kb.ops.linear(kb.asarray(x), kb.asarray(weight), out, bias=kb.asarray(bias), norm_eps=1e-5, normed=normed)
        assert got is out
        want = reference.linear(x, weight, np.empty((M, N), np.float32), bias=bias, norm_eps=1e-5)
    assert rel_err(kb.to_host(out), want) < tolerance(dtype)


def test_reference_normalised_linear_is_rms_norm_then_linear(rng):
    x = random(rng, (3, 16), scale=5.0)
    weight, gamma = random(rng, (7, 16)), random(rng, 16)
    normed = reference.rms_norm(x, gamma, 1e-6, np.empty_like(x))
    want = reference.linear(normed, weight, np.empty((3, 7), np.float32))
    got = reference.linear(x, weight * gamma, np.empty((3, 7), np.float32), norm_eps=1e-6)
    assert rel_err(got, want) < 1e-5


def test_linear_norm_eps_needs_normed_of_the_shape_of_x(kb, rng):
    x, weight = _operands(kb, rng)
    out = kb.asarray(np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"linear: norm_eps needs normed, an array like x \(4, 8\)"):
        kb.ops.linear(x, weight, out, norm_eps=1e-5)
    with pytest.raises(ValueError, match=r"linear_silu_mul: normed must have shape \(4, 8\), got \(4, 5\)"):
        kb.ops.linear_silu_mul(x, kb.asarray(random(rng, (6, 8))), kb.asarray(np.zeros((4, 3), np.float32)),
                               norm_eps=1e-5, normed=out)


# Tensor-core variants run directly (in the simulator too, whose mma gathers fragments through
# shuffles): several W and x tiles, warps on rows and on K, unrolled steps, fused; M not a multiple
# of 8, N of 16, K of 32 (the last step is partly past K); x rows RMS-normalised in the loop, with
# warps on rows and on K; K split over blocks (splits), with shares of one step, of two, and empty
# ones (more splits than steps). Blocks of at most 64 threads for the simulator.
MMA_CASES = [
    (MmaConfig(1, 2, 1, 2, 1), 11, 37, 136),
    (MmaConfig(2, 1, 2, 1, 2), 5, 45, 200),
    (MmaConfig(2, 4, 1, 2, 1, fused=True), 27, 21, 72),
    (MmaConfig(2, 1, 1, 1, 1, fused=True), 1, 9, 40),
    (MmaConfig(1, 8, 1, 2, 1), 61, 19, 72),
    (MmaConfig(1, 2, 1, 2, 1, normalise=True), 11, 37, 136),
    (MmaConfig(2, 1, 2, 1, 2, normalise=True), 5, 45, 200),
    (MmaConfig(2, 1, 1, 2, 1, fused=True, normalise=True), 1, 9, 72),
    (MmaConfig(1, 2, 1, 2, 1, splits=3), 11, 37, 136),
    (MmaConfig(2, 1, 2, 1, 2, normalise=True, splits=2), 5, 45, 200),
    (MmaConfig(2, 1, 1, 2, 1, fused=True, normalise=True, splits=4), 1, 9, 72),
]


@pytest.mark.parametrize("config,M,N,K", MMA_CASES, ids=[str(i) for i in range(len(MMA_CASES))])
def test_tensor_core_variants_match_reference(kb, rng, config, M, N, K):
    rows = 2 * N if config.fused else N
    x = random(rng, (M, K), np.float16, scale=4.0 if config.normalise else 1.0)
    weight = random(rng, (rows, K), np.float16, scale=0.1)
    bias = None if config.fused else random(rng, N, np.float16)
    residual = None if config.fused else random(rng, (M, N), np.float16)
    eps = 1e-5 if config.normalise else None
    out = poisoned(kb, (M, N), np.float16)
    gemm.launch_mma(
        config,
        kb.asarray(x),
        kb.asarray(weight),
        None if bias is None else kb.asarray(bias),
        None if residual is None else kb.asarray(residual),
        out,
        eps or 0.0,
    )
    if config.fused:
        want = reference.linear_silu_mul(x, weight, np.empty((M, N), np.float32), norm_eps=eps)
    else:
        want = reference.linear(x, weight, np.empty((M, N), np.float32), bias=bias, residual=residual, norm_eps=eps)
    assert rel_err(kb.to_host(out), want) < tolerance(np.float16)


def test_split_k_launches_leave_their_arrival_counts_at_zero(kb, rng):
    # the last block of each group of rows sets its count back, so a second launch (a graph replay)
    # sums its own shares, not stale ones; its shares' sums are parked where the first launch's were
    config, M, N, K = MmaConfig(1, 2, 1, 2, 1, splits=3), 9, 40, 136
    weight = random(rng, (N, K), np.float16, scale=0.1)
    for _ in range(2):
        x = random(rng, (M, K), np.float16)
        out = poisoned(kb, (M, N), np.float16)
        gemm.launch_mma(config, kb.asarray(x), kb.asarray(weight), None, None, out)
        want = reference.linear(x, weight, np.empty((M, N), np.float32))
        assert rel_err(kb.to_host(out), want) < tolerance(np.float16)
        _, arrivals = gemm._split_workspace(out, config, 3)
        np.testing.assert_array_equal(kb.to_host(arrivals), 0)


@pytest.mark.gpu
def test_split_k_linear_replayed_from_a_cuda_graph_matches_reference(kb, rng):
    # down at M = 32 as a decode graph runs it: captured once, replayed over fresh rows of x
    import cupy

    M, N, K = 32, 4096, 14336
    assert gemm.mma_config(M, N, K).splits > 1
    weight = random(rng, (N, K), np.float16, scale=0.02)
    residual = random(rng, (M, N), np.float16)
    x_d, weight_d, residual_d = kb.asarray(np.zeros((M, K), np.float16)), kb.asarray(weight), kb.asarray(residual)
    out = poisoned(kb, (M, N), np.float16)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        kb.ops.linear(x_d, weight_d, out, residual=residual_d)  # compiles and makes the kept workspace
        stream.begin_capture()
        kb.ops.linear(x_d, weight_d, out, residual=residual_d)
        graph = stream.end_capture()
        for _ in range(2):
            x = random(rng, (M, K), np.float16)
            x_d.set(x, stream=stream)
            out.fill(np.nan)
            graph.launch(stream)
            stream.synchronize()
            want = reference.linear(x, weight, np.empty((M, N), np.float32), residual=residual)
            assert rel_err(kb.to_host(out), want) < tolerance(np.float16)


# The QKV variant with RoPE and the cache store in its epilogue (rope_dim): head dims 32 and 64, a
# bias, warps on rows and on K, x rows normalised; M not a multiple of 8; padding tokens (slot -1).
ROPE_CASES = [
    (MmaConfig(1, 1, 1, 2, 1, rope_dim=32), 3, (2, 1), 40, False),
    (MmaConfig(2, 1, 2, 1, 2, rope_dim=64), 5, (2, 2), 72, True),
    (MmaConfig(1, 2, 1, 2, 1, normalise=True, rope_dim=32), 9, (3, 1), 72, True),
    (MmaConfig(1, 2, 1, 2, 1, normalise=True, rope_dim=32, splits=2), 9, (3, 1), 72, True),
]


def _rope_operands(rng, M, q_heads, kv_heads, head_dim, K, with_bias, dtype=np.float16):
    """Fresh inputs of linear_rope_store_kv: x, weight, bias, positions, cos_sin, slots (every third
    a padding -1) and NaN-poisoned caches of 4-slot blocks."""
    N = (q_heads + 2 * kv_heads) * head_dim
    positions = rng.integers(0, 64, M).astype(np.int32)
    slots = rng.permutation(4 * (M // 4 + 2))[:M].astype(np.int32)
    slots[::3] = -1
    caches = [nans((M // 4 + 2, 4, kv_heads, head_dim), dtype) for _ in range(2)]
    return (
        random(rng, (M, K), dtype, scale=4.0), random(rng, (N, K), dtype, scale=0.1),
        random(rng, N, dtype) if with_bias else None, positions, reference.rope_cache(head_dim, 64, 10000.0),
        slots, caches,
    )


def _assert_rope_outputs(kb, out, caches_d, want_out, want_caches, dtype):
    assert rel_err(kb.to_host(out), want_out) < tolerance(dtype)
    for got, want in zip(caches_d, want_caches):
        got = as_float(kb.to_host(got))
        written = ~np.isnan(as_float(want))
        np.testing.assert_array_equal(np.isnan(got), ~written)  # padding tokens' slots keep their NaN
        assert rel_err(got[written], as_float(want)[written]) < tolerance(dtype)


@pytest.mark.parametrize("config,M,heads,K,with_bias", ROPE_CASES, ids=[str(i) for i in range(len(ROPE_CASES))])
def test_tensor_core_rope_variants_match_reference(kb, rng, config, M, heads, K, with_bias):
    x, weight, bias, positions, cos_sin, slots, caches = _rope_operands(rng, M, *heads, config.rope_dim, K, with_bias)
    eps = 1e-5 if config.normalise else None
    out = poisoned(kb, (M, weight.shape[0]), np.float16)
    caches_d = [kb.asarray(c.copy()) for c in caches]
    rope_args = (kb.asarray(positions), kb.asarray(cos_sin.reshape(-1)), kb.asarray(slots),
                 caches_d[0].reshape(-1), caches_d[1].reshape(-1), *heads)
    gemm.launch_mma(config, kb.asarray(x), kb.asarray(weight), None if bias is None else kb.asarray(bias), None,
                    out, eps or 0.0, rope_args)
    want = reference.linear_rope_store_kv(x, weight, np.empty(out.shape, np.float32), positions, cos_sin, *caches,
                                          slots, *heads, bias=bias, norm_eps=eps)
    _assert_rope_outputs(kb, out, caches_d, want, caches, np.float16)


def test_rope_rows_pair_each_row_with_the_one_half_a_head_on():
    for head_dim in (32, 64, 128):
        rows = [gemm_mma.rope_row(n, head_dim) for n in range(3 * head_dim)]
        assert sorted(rows) == list(range(3 * head_dim))  # a permutation, head by head
        for n in range(0, 3 * head_dim, 16):
            assert [rows[n + 8 + g] - rows[n + g] for g in range(8)] == [head_dim // 2] * 8


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint16])
@pytest.mark.parametrize("M,heads,head_dim,with_bias,norm", pick(
    sim=[(3, (2, 1), 16, True, False), (5, (1, 1), 32, False, True)],
    gpu=[(1, (32, 8), 128, False, True), (7, (4, 2), 64, True, True), (64, (8, 8), 128, True, False),
         (70, (4, 2), 64, False, True)],
))
def test_linear_rope_store_kv_matches_reference(kb, rng, dtype, M, heads, head_dim, with_bias, norm):
    K = pick(sim=24, gpu=512)
    x, weight, bias, positions, cos_sin, slots, caches = _rope_operands(rng, M, *heads, head_dim, K, with_bias, dtype)
    eps = 1e-5 if norm else None
    out = poisoned(kb, (M, weight.shape[0]), dtype)
    caches_d = [kb.asarray(c.copy()) for c in caches]
    kb.ops.linear_rope_store_kv(
        kb.asarray(x), kb.asarray(weight), out, kb.asarray(positions), kb.asarray(cos_sin), *caches_d,
        kb.asarray(slots), *heads, bias=None if bias is None else kb.asarray(bias), norm_eps=eps,
        normed=kb.asarray(np.zeros_like(x)) if norm else None,
    )
    want = reference.linear_rope_store_kv(x, weight, np.empty(out.shape, np.float32), positions, cos_sin, *caches,
                                          slots, *heads, bias=bias, norm_eps=eps)
    _assert_rope_outputs(kb, out, caches_d, want, caches, dtype)


def test_linear_rope_store_kv_rejects_bad_arguments(kb, rng):
    x, weight = _operands(kb, rng, N=16)
    cache = kb.asarray(np.zeros((2, 4, 1, 4), np.float32))
    positions, slots = kb.asarray(np.arange(4, dtype=np.int32)), kb.asarray(np.arange(4, dtype=np.int32))
    cos_sin = kb.asarray(reference.rope_cache(4, 16, 10000.0))
    out = kb.asarray(np.zeros((4, 16), np.float32))
    with pytest.raises(ValueError, match=r"linear_rope_store_kv: weight must have \(q_heads \+ 2 kv_heads\) \* "
                                         r"head_dim = \(3 \+ 2 \* 1\) \* 4 rows \(head_dim: k_cache's last axis\), got 16"):
        kb.ops.linear_rope_store_kv(x, weight, out, positions, cos_sin, cache, cache, slots, 3, 1)
    with pytest.raises(ValueError, match=r"linear_rope_store_kv: out must have shape \(4, 16\), got \(4, 12\)"):
        kb.ops.linear_rope_store_kv(x, weight, kb.asarray(np.zeros((4, 12), np.float32)), positions, cos_sin,
                                    cache, cache, slots, 2, 1)
    with pytest.raises(ValueError, match="rope_store_kv: slot_mapping must be int32, got int64"):
        kb.ops.linear_rope_store_kv(x, weight, out, positions, cos_sin, cache, cache, kb.asarray(np.arange(4)), 2, 1)
    with pytest.raises(ValueError, match=r"linear_rope_store_kv: k_cache must have shape \(\*, \*, 1, \*\), got \(8, 1, 4\)"):
        flat = kb.asarray(np.zeros((8, 1, 4), np.float32))
        kb.ops.linear_rope_store_kv(x, weight, out, positions, cos_sin, flat, flat, slots, 2, 1)


def test_linear_silu_mul_rejects_odd_weight_rows(kb, rng):
    x, weight = _operands(kb, rng, N=5)
    with pytest.raises(ValueError, match=r"linear_silu_mul: weight must have an even number of rows \[gate \| up\], got 5"):
        kb.ops.linear_silu_mul(x, weight, kb.asarray(np.zeros((4, 2), np.float32)))


def test_linear_silu_mul_rejects_wrong_output_shape_and_dtype(kb, rng):
    x, weight = _operands(kb, rng, N=6)
    with pytest.raises(ValueError, match=r"linear_silu_mul: out must have shape \(4, 3\), got \(4, 6\)"):
        kb.ops.linear_silu_mul(x, weight, kb.asarray(np.zeros((4, 6), np.float32)))
    with pytest.raises(ValueError, match=r"linear_silu_mul: out must have the dtype of x \(float32\), got float16"):
        kb.ops.linear_silu_mul(x, weight, kb.asarray(np.zeros((4, 3), np.float16)))
    with pytest.raises(ValueError, match=r"linear_silu_mul: x \(4, 8\) and weight \(6, 7\) disagree on K"):
        kb.ops.linear_silu_mul(x, kb.asarray(random(rng, (6, 7))), kb.asarray(np.zeros((4, 3), np.float32)))


def test_tensor_core_rows_round_up_to_the_decode_buckets():
    rows = (1, 8, 9, 16, 17, 24, 32, 33, 40, 64)
    assert [gemm.mma_config(m, 4096, 4096).tiles_x for m in rows] == [1, 1, 2, 2, 4, 4, 4, 8, 8, 8]
    variants = {gemm.mma_config(m, 4096, 4096) for m in range(1, gemm.MMA_MAX_M + 1)}
    assert {config.tiles_x for config in variants} == {1, 2, 4, 8}


@pytest.mark.gpu
def test_tensor_core_variants_keep_their_arrays_in_registers():
    # every variant the launcher picks for the Llama-3-8B decode shapes, M = 1..MMA_MAX_M, fused gate-up too
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]
    rows = range(1, gemm.MMA_MAX_M + 1)
    configs = {gemm.mma_config(m, n, k) for m in rows for n, k in shapes}
    configs |= {gemm.mma_config(m, 14336, 4096, fused=True) for m in rows}
    configs |= {gemm.mma_config(m, 6144, 4096, normalise=True) for m in rows}
    configs |= {gemm.mma_config(m, 14336, 4096, fused=True, normalise=True) for m in rows}
    configs |= {replace(gemm.mma_config(m, 6144, 4096, normalise=True), rope_dim=128) for m in rows}
    for config in configs:
        kernel = gemm.compiled_mma(config)
        # a register cap may spill a value or two, outside the loop (gemm.mma_config)
        assert kernel.get_local_mem_per_thread() <= (8 if config.max_registers else 0), config
        assert not config.max_registers or kernel.get_regs_per_thread() <= config.max_registers, config
        ptx = "".join(kernel.inspect_asm().values())  # a dict: one entry per signature
        assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx, config
