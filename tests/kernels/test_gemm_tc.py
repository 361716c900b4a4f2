"""GPU tests of the tensor-core prefill linear (gemm_tc.py) and its dispatch from gemm.linear.

Every variant against reference.py on random float16 data with M, N, K that are not multiples of
the tiles, every epilogue, and the Llama-3-8B prefill shapes. GPU only: inline PTX does not run in
the simulator, where gemm.linear never takes this path (the fallback test runs there too).
"""

import numpy as np
import pytest

from infinilm_nb.kernels import gemm, gemm_tc, reference, wgmma
from infinilm_nb.kernels.common import compiled
from tests.helpers import poisoned, random, rel_err, tolerance

F16 = np.float16
CONFIGS = [
    gemm_tc.tc_config(64),  # M <= 512: 64-row tiles, 4 warps, 64-column K tiles, 3 stages (72 KB)
    gemm_tc.tc_config(4096),  # 128-row tiles, 8 warps, 64-column K tiles, 3 stages (96 KB)
    gemm_tc.TcConfig(block_m=64, warps_m=2, warps_n=4, stages=4),  # 64-row tiles, 8 warps (bench variant)
    gemm_tc.TcConfig(block_m=32, block_n=32, warps_m=1, warps_n=2, stages=2),  # a small geometry
    # 64 x 64 warp tiles (bench variants): 128 accumulators a thread, the epilogue's 4 tile rows written out
    gemm_tc.TcConfig(block_m=128, block_n=256, warps_m=2, warps_n=4, stages=2),
    gemm_tc.TcConfig(block_m=256, block_n=128, warps_m=4, warps_n=2, stages=2),
    # 32-column K tiles (bench variants): the 48 KB static ring, then deeper ones in dynamic shared memory
    gemm_tc.TcConfig(),  # 128 x 128, 3 stages: 48 KB
    gemm_tc.TcConfig(block_m=64, block_n=128, warps_m=1, warps_n=4, stages=4),  # 48 KB
    gemm_tc.TcConfig(stages=6),  # 96 KB
    gemm_tc.TcConfig(block_m=64, block_n=128, warps_m=1, warps_n=4, stages=6),  # 72 KB
    gemm_tc.TcConfig(block_m=128, block_n=256, warps_m=2, warps_n=4, stages=4),  # 96 KB
    gemm_tc.TcConfig(block_m=64, block_n=64, warps_m=2, warps_n=2, stages=6),  # 32 x 32 warp tiles, 48 KB
    gemm_tc.TcConfig(block_k=64, stages=4),  # 128 KB: one block an SM
]
BIG_TILES = CONFIGS[4:6]
DEEP = CONFIGS[6:]
# wgmma from the swizzled tiles (Hopper only): two warpgroups over 128 x 128, one over 64 x 64, a K
# tile's products left running over the next tile's barrier (4 stages), and two over 128 x 256
WGMMA = [
    gemm_tc.TcConfig(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True),
    gemm_tc.TcConfig(block_m=64, block_n=64, warps_m=4, warps_n=1, block_k=64, wgmma=True),
    gemm_tc.TcConfig(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True, stages=4, in_flight=1),
    gemm_tc.TcConfig(block_m=128, block_n=256, warps_m=8, warps_n=1, block_k=64, wgmma=True),  # m64n256k16
]
CONFIGS += WGMMA
# (M, N, K): ragged against 64 / 128-row tiles, 128 / 64-column tiles and 32-deep K tiles;
# K = 8 is a single partial K tile.
SHAPES = [(64, 64, 64), (65, 37, 40), (130, 200, 72), (200, 129, 8), (300, 1000, 264), (1030, 260, 136)]
LLAMA = {  # (N, K) of Llama-3-8B
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "down": (4096, 14336),
}


def _operands(kb, rng, M, N, K, with_bias, with_residual, rows=None):
    x = random(rng, (M, K), F16)
    weight = random(rng, (rows or N, K), F16, scale=K**-0.5)
    bias = random(rng, N, F16) if with_bias else None
    residual = random(rng, (M, N), F16) if with_residual else None
    return x, weight, bias, residual


def _spy_launch_tc(monkeypatch) -> list:
    """Record the configs gemm.linear launches on tensor cores (and still launch them)."""
    launched, real = [], gemm.launch_tc

    def spy(config, *args):
        launched.append(config)
        real(config, *args)

    monkeypatch.setattr(gemm, "launch_tc", spy)
    return launched


def _skip_wgmma_before_hopper(config):
    if config.wgmma and not wgmma.supported():
        pytest.skip("wgmma needs a Hopper GPU")


def _launch(kb, config, x, weight, bias, residual, N):
    _skip_wgmma_before_hopper(config)
    out = poisoned(kb, (x.shape[0], N), F16)
    gemm.launch_tc(
        config, kb.asarray(x), kb.asarray(weight), None if bias is None else kb.asarray(bias),
        None if residual is None else kb.asarray(residual), out,
    )
    return kb.to_host(out)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_tc_linear_with_bias_and_residual(kb, rng, config, M, N, K):
    x, weight, bias, residual = _operands(kb, rng, M, N, K, True, True)
    got = _launch(kb, config, x, weight, bias, residual, N)
    want = reference.linear(x, weight, np.empty((M, N), np.float32), bias=bias, residual=residual)
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS[:2], ids=str)
@pytest.mark.parametrize("with_bias,with_residual", [(False, False), (True, False), (False, True)])
def test_tc_linear_epilogues(kb, rng, config, with_bias, with_residual):
    M, N, K = 100, 300, 96
    x, weight, bias, residual = _operands(kb, rng, M, N, K, with_bias, with_residual)
    got = _launch(kb, config, x, weight, bias, residual, N)
    want = reference.linear(x, weight, np.empty((M, N), np.float32), bias=bias, residual=residual)
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
@pytest.mark.parametrize("config", CONFIGS[:2] + [DEEP[0], DEEP[2]] + WGMMA, ids=str)
@pytest.mark.parametrize("M,N,K", [(65, 37, 40), (130, 300, 72), (300, 1000, 264)])
def test_tc_linear_silu_mul(kb, rng, config, M, N, K):
    fused = gemm_tc.TcConfig(**{**config.__dict__, "fused": True})
    x, weight, _, _ = _operands(kb, rng, M, N, K, False, False, rows=2 * N)
    got = _launch(kb, fused, x, weight, None, None, N)
    want = reference.linear_silu_mul(x, weight, np.empty((M, N), np.float32))
    assert rel_err(got, want) < tolerance(F16)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [512, 2048])
@pytest.mark.parametrize("name", list(LLAMA))
def test_linear_llama_prefill_shapes_take_tensor_cores(kb, rng, monkeypatch, M, name):
    N, K = LLAMA[name]
    launched = _spy_launch_tc(monkeypatch)
    x, weight, _, residual = _operands(kb, rng, M, N, K, False, name != "qkv")
    out = poisoned(kb, (M, N), F16)
    kb.ops.linear(kb.asarray(x), kb.asarray(weight), out, residual=None if residual is None else kb.asarray(residual))
    assert launched == [gemm_tc.tc_config(M, wgmma=wgmma.enabled())]
    want = reference.linear(x, weight, np.empty((M, N), np.float32), residual=residual)
    assert rel_err(kb.to_host(out), want) < tolerance(F16)


@pytest.mark.gpu
def test_linear_silu_mul_takes_tensor_cores(kb, rng, monkeypatch):
    M, inter, K = 300, 700, 256
    launched = _spy_launch_tc(monkeypatch)
    x, weight, _, _ = _operands(kb, rng, M, inter, K, False, False, rows=2 * inter)
    out = poisoned(kb, (M, inter), F16)
    kb.ops.linear_silu_mul(kb.asarray(x), kb.asarray(weight), out)
    assert launched == [gemm_tc.tc_config(M, fused=True, wgmma=wgmma.enabled())]
    want = reference.linear_silu_mul(x, weight, np.empty((M, inter), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(F16)


@pytest.mark.parametrize("M", [64, 512, 8192])
def test_wgmma_dispatch_config_is_a_valid_wgmma_variant(M):
    config = gemm_tc.tc_config(M, fused=True, wgmma=True)
    config.check()
    assert config.wgmma and config.fused and config.shared_bytes <= gemm_tc.MAX_SHARED_BYTES


@pytest.mark.gpu
def test_linear_out_is_residual_on_tensor_cores(kb, rng):
    M, N, K = 130, 96, 64
    x, weight, _, residual = _operands(kb, rng, M, N, K, False, True)
    residual_d = kb.asarray(residual)
    kb.ops.linear(kb.asarray(x), kb.asarray(weight), residual_d, residual=residual_d)
    want = reference.linear(x, weight, np.empty((M, N), np.float32), residual=residual)
    assert rel_err(kb.to_host(residual_d), want) < tolerance(F16)


@pytest.mark.parametrize("case", ["switched_off", "k_not_multiple_of_8", "misaligned_x"])
def test_linear_falls_back_to_cuda_cores(kb, rng, monkeypatch, case):
    M, N, K = 100, 70, 44 if case == "k_not_multiple_of_8" else 48
    if case == "switched_off":
        monkeypatch.setattr(gemm_tc, "ENABLED", False)
    monkeypatch.setattr(gemm, "launch_tc", lambda *args: pytest.fail("took the tensor-core path"))
    x, weight, _, _ = _operands(kb, rng, M, N, K, False, False)
    x_d = kb.asarray(x)
    if case == "misaligned_x":  # 2 bytes past a 16-byte boundary: cp.async would fault
        buffer = kb.asarray(np.concatenate([np.ones(1, F16), x.reshape(-1)]))
        x_d = buffer[1:].reshape(M, K)
    out = poisoned(kb, (M, N), F16)
    kb.ops.linear(x_d, kb.asarray(weight), out)
    want = reference.linear(x, weight, np.empty((M, N), np.float32))
    assert rel_err(kb.to_host(out), want) < tolerance(F16)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    CONFIGS[:2] + BIG_TILES + DEEP + [gemm_tc.tc_config(M, fused=True) for M in (64, 4096)] + [
        gemm_tc.TcConfig(**{**BIG_TILES[0].__dict__, "fused": True}), gemm_tc.TcConfig(stages=6, fused=True),
        gemm_tc.TcConfig(fused=True), gemm_tc.TcConfig(**{**WGMMA[0].__dict__, "fused": True})],
    ids=str,
)
def test_tc_kernel_is_tensor_cores_without_local_memory(config):
    _skip_wgmma_before_hopper(config)
    kernel = compiled(gemm_tc.tc_kernel(config), gemm.kernel_signature(F16))
    ptx = "".join(kernel.inspect_asm().values())
    if config.wgmma:
        mma = f"wgmma.mma_async.sync.aligned.m64n{config.block_n}k16.f32.f16.f16"
        expected = (mma, "fence.proxy.async", "cp.async.cg")
    else:
        expected = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "ldmatrix.sync.aligned", "cp.async.cg")
    for instruction in expected:
        assert instruction in ptx, instruction
    assert kernel.get_local_mem_per_thread() == 0


def test_k_tiles_other_than_32_or_64_columns_are_refused():
    with pytest.raises(ValueError, match="unsupported tensor-core GEMM geometry"):
        gemm_tc.TcConfig(block_k=48).check()


def test_rings_past_the_opt_in_shared_memory_are_refused():
    gemm_tc.TcConfig(stages=14).check()  # 224 KB
    with pytest.raises(ValueError, match="unsupported tensor-core GEMM geometry"):
        gemm_tc.TcConfig(stages=15).check()  # 240 KB: more than a Hopper block may have


@pytest.mark.parametrize("geometry", [
    dict(block_m=128, block_n=128, warps_m=4, warps_n=2),  # warps side by side along n
    dict(block_m=64, block_n=128, warps_m=2, warps_n=1),  # a warp over 32 rows
    dict(block_m=128, block_n=192, warps_m=8, warps_n=1),  # no m64n192 here
    dict(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=32, stages=6),  # 64-byte rows: no 128-byte swizzle
])
def test_wgmma_geometries_other_than_a_warp_per_16_rows_are_refused(geometry):
    config = gemm_tc.TcConfig(**{"block_k": 64, **geometry, "wgmma": True})
    with pytest.raises(ValueError, match="unsupported tensor-core GEMM geometry"):
        config.check()
    gemm_tc.TcConfig(**{**config.__dict__, "wgmma": False}).check()  # fine on mma.sync


def test_wgmma_in_flight_needs_wgmma_and_a_stage_more():
    wgmma = dict(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True)
    gemm_tc.TcConfig(**wgmma, stages=3, in_flight=1).check()
    for config in (gemm_tc.TcConfig(**wgmma, stages=2, in_flight=1), gemm_tc.TcConfig(**wgmma, in_flight=2),
                   gemm_tc.TcConfig(block_k=64, in_flight=1)):
        with pytest.raises(ValueError, match="unsupported tensor-core GEMM geometry"):
            config.check()


def test_warp_tiles_past_64_rows_are_refused():
    # the epilogue writes out at most four 16-row tile rows per warp
    with pytest.raises(ValueError, match="unsupported tensor-core GEMM geometry"):
        gemm_tc.tc_kernel(gemm_tc.TcConfig(block_m=256, block_n=64, warps_m=2, warps_n=2, stages=2))
