"""Kernel tests on a GPU exercise the tensor-core paths even where INFINILM_NB_TENSOR_CORES=0 turned
them off (common.TENSOR_CORES); tests that want the CUDA-core fallback switch them off themselves."""

import pytest

from tests.conftest import ON_GPU


@pytest.fixture(autouse=True)
def tensor_cores_on(monkeypatch):
    if ON_GPU:
        from infinilm_nb.kernels import attention_prefill, gemm, gemm_tc

        monkeypatch.setattr(gemm, "USE_MMA", True)
        monkeypatch.setattr(gemm_tc, "ENABLED", True)
        monkeypatch.setattr(attention_prefill, "ENABLED", True)
