"""Test harness: kernels run on the GPU when one is usable, otherwise in numba's CUDA simulator.

The choice is made here, before anything imports numba, because ``NUMBA_ENABLE_CUDASIM`` is read
once at numba's import. ``INFINILM_NB_TEST_BACKEND=sim`` forces the simulator on a GPU machine.
"""

from __future__ import annotations

import os
import pytest


def _gpu_usable() -> bool:
    if os.environ.get("INFINILM_NB_TEST_BACKEND", "").lower() == "sim":
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


ON_GPU = _gpu_usable()
if not ON_GPU:
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")  # tests launch small grids on purpose

from infinilm_nb.backend import get_backend  # noqa: E402  (after the simulator switch)
from infinilm_nb.runtime.distributed import find_mpiexec  # noqa: E402

KERNEL_BACKEND = get_backend("cuda" if ON_GPU else "sim")


def pytest_report_header(config: pytest.Config) -> str:
    if ON_GPU:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        return f"infinilm-nb kernels run on the GPU: {name}"
    return "infinilm-nb kernels run in numba's CUDA simulator (no usable GPU): tiny shapes"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in the GPU session)")
    no_mpi = pytest.mark.skip(reason="mpiexec not found (pip install 'infinilm-nb[mpi]')")
    for item in items:
        if "gpu" in item.keywords and not ON_GPU:
            item.add_marker(no_gpu)
        if "mpi" in item.keywords and find_mpiexec() is None:
            item.add_marker(no_mpi)


@pytest.fixture(scope="session")
def kb():
    """The kernel backend under test: ``cuda`` on a GPU machine, ``sim`` elsewhere."""
    return KERNEL_BACKEND


@pytest.fixture
def rng(request: pytest.FixtureRequest):
    """A fresh generator per test, seeded from the test's name so failures reproduce."""
    import zlib

    import numpy as np

    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
