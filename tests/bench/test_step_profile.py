"""bench/step_profile.py: kernel names as CUPTI reports them, and a step's busy and idle time."""

from __future__ import annotations

import pytest

from bench.step_profile import kernel_name, summarize, trace_kernels

GEMM = ("infinilm_nb::kernels::gemm_mma::mma_kernel::_3clocals_3e::kernel[abi:v31][abi:cw51cXTLSUwv1sDUaKthqaNgoKm]"
        "E5ArrayIDhLi1E1C7mutable7alignedE")
SAMPLER = "infinilm_nb::kernels::sampling::_sample_kernel[abi:v38][abi:cw51cXTLSUwv1s]E5ArrayIfLi2E1C7mutable7alignedE"


def test_kernel_name_keeps_module_factory_function_and_version():
    assert kernel_name(GEMM) == "gemm_mma.mma_kernel.kernel v31"
    assert kernel_name(SAMPLER) == "sampling._sample_kernel v38"
    assert kernel_name("ampere_fp16_s16816gemm_fp16_128x64_ldg8_f2f_tn") == "ampere_fp16_s16816gemm_fp16_128x64_ldg8_f2f_tn"


def test_trace_kernels_keeps_the_kernels_named_with_their_grid_in_start_order():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": GEMM, "ts": 20.5, "dur": 4.0, "args": {"grid": [96, 1, 1]}},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 3.0},
        {"ph": "X", "cat": "kernel", "name": SAMPLER, "ts": 10.0, "dur": 2.5, "args": {}},
        {"ph": "X", "cat": "kernel", "name": GEMM, "ts": 30.0, "dur": 1.0, "args": {"grid": [32, 1, 1]}},
    ]}
    assert trace_kernels(trace) == [
        ("sampling._sample_kernel v38", 10.0, 12.5),
        ("gemm_mma.mma_kernel.kernel v31 grid 96x1x1", 20.5, 24.5),
        ("gemm_mma.mma_kernel.kernel v31 grid 32x1x1", 30.0, 31.0),
    ]


def test_summarize_counts_overlap_once_and_gaps_as_idle():
    # two steps: a 10 us kernel, a 2 us gap, a kernel from 12 to 20 overlapped by one from 18 to 21
    kernels = []
    for step in range(2):
        t = 100.0 * step
        kernels += [("a", t, t + 10), ("b", t + 12, t + 20), ("c", t + 18, t + 21)]
    summary = summarize(kernels, steps=2)
    assert summary["busy_us"] == pytest.approx(19.0)  # 10 + 8 + the 1 us of c past b
    assert summary["span_us"] == pytest.approx(60.5)  # 0 .. 121, per step
    assert summary["idle_us"] == pytest.approx(60.5 - 19.0)
    assert summary["kernels"] == [("a", 1, 10.0), ("b", 1, 8.0), ("c", 1, 3.0)]
    assert summarize([], steps=1)["busy_us"] == 0.0
