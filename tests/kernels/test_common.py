"""common.launch: plain launches, and programmatic dependent launch (PDL) for kernels that await the
kernels before them (intrinsics.await_previous_kernels), on a Hopper GPU."""

import numpy as np
import pytest
from numba import cuda

from infinilm_nb.kernels import common
from infinilm_nb.kernels.common import compiled, launch
from infinilm_nb.kernels.intrinsics import await_previous_kernels, let_next_kernel_launch
from tests.conftest import ON_GPU
from tests.helpers import poisoned

SPINS = 1_000_000  # atomic reads of the flag before the first kernel gives up on seeing it

def _affine(x, out):
    """out = 2 x + 1, after the wait."""
    await_previous_kernels()
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = 2 * x[i] + 1


def _plain_affine(x, out):
    i = cuda.grid(1)
    if i < x.shape[0]:
        out[i] = 2 * x[i] + 1


def _first(flag, seen, data):
    """Lets the next kernel launch, waits (bounded) for it to raise ``flag``, then writes ``data``."""
    await_previous_kernels()
    let_next_kernel_launch()
    if cuda.threadIdx.x == 0:
        spins = 0
        while cuda.atomic.add(flag, 0, 0) == 0 and spins < SPINS:
            spins += 1
        seen[0] = cuda.atomic.add(flag, 0, 0)
    cuda.syncthreads()
    for i in range(cuda.threadIdx.x, data.shape[0], cuda.blockDim.x):
        data[i] = i + 1


def _second(flag, data, out):
    """Raises ``flag`` before its wait (only a test may write before it), then copies ``data``."""
    if cuda.threadIdx.x == 0:
        cuda.atomic.add(flag, 0, 1)
    await_previous_kernels()
    for i in range(cuda.threadIdx.x, data.shape[0], cuda.blockDim.x):
        out[i] = data[i]


def _hopper_pdl() -> bool:
    return ON_GPU and common._programmatic_launch_config()


@pytest.mark.parametrize("n", [1, 300])
def test_launch_runs_the_kernel(kb, rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    for function in (_affine, _plain_affine):
        out = poisoned(kb, (n,), np.float32)
        launch(compiled(function, "void(float32[::1], float32[::1])"), (n + 127) // 128, 128, (kb.asarray(x), out))
        np.testing.assert_allclose(kb.to_host(out), 2 * x + 1, rtol=1e-6)


@pytest.mark.gpu
def test_only_kernels_that_await_are_launched_programmatically(kb, monkeypatch):
    if not _hopper_pdl():
        pytest.skip("programmatic dependent launch needs a Hopper GPU and a cuda.core that sets it")
    import cuda.core

    programmatic = []
    real = cuda.core.launch

    def spy(stream, config, *args):
        programmatic.append(config.programmatic_stream_serialization)
        return real(stream, config, *args)

    monkeypatch.setattr(cuda.core, "launch", spy)
    monkeypatch.setattr(common, "PDL", True)
    x, out = kb.asarray(np.arange(64, dtype=np.float32)), poisoned(kb, (64,), np.float32)
    awaiting = compiled(_affine, "void(float32[::1], float32[::1])")
    plain = compiled(_plain_affine, "void(float32[::1], float32[::1])")
    launch(awaiting, 1, 64, (x, out))
    launch(plain, 1, 64, (x, out))
    assert programmatic == [True]  # the plain kernel went through numba's own launch
    monkeypatch.setattr(common, "PDL", False)
    launch(awaiting, 1, 64, (x, out))
    assert programmatic == [True]
    assert common._awaits_previous_kernels(awaiting) and not common._awaits_previous_kernels(plain)


@pytest.mark.gpu
@pytest.mark.parametrize("captured", [False, True])
def test_a_dependent_kernel_runs_beside_the_one_before_and_sees_its_writes(kb, monkeypatch, captured):
    """Once the first kernel lets it, the second is resident while the first still runs (the first
    sees the flag it raises before its wait), and its wait still gives it everything the first
    wrote; eagerly and replayed from a CUDA graph."""
    if not _hopper_pdl():
        pytest.skip("programmatic dependent launch needs a Hopper GPU and a cuda.core that sets it")
    import cupy

    monkeypatch.setattr(common, "PDL", True)
    first = compiled(_first, "void(int32[::1], int32[::1], float32[::1])")
    second = compiled(_second, "void(int32[::1], float32[::1], float32[::1])")
    flag, seen = cupy.zeros(1, np.int32), cupy.zeros(1, np.int32)
    data, out = cupy.zeros(4096, np.float32), poisoned(kb, (4096,), np.float32)

    def both():
        launch(first, 1, 256, (flag, seen, data))
        launch(second, 1, 256, (flag, data, out))

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        both()  # loads both modules (not allowed while capturing)
        for array, value in ((flag, 0), (seen, 0), (data, 0), (out, np.nan)):
            array.fill(value)
        if captured:
            stream.begin_capture()
            both()
            stream.end_capture().launch(stream)
        else:
            both()
        stream.synchronize()
    assert int(seen[0]) == 1
    np.testing.assert_array_equal(kb.to_host(out), np.arange(1, 4097, dtype=np.float32))
