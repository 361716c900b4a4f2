"""bench/summary.py: the closing table of a GPU session, from the files the run left."""

from __future__ import annotations

import json

from bench import summary

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="20"></testsuite></testsuites>"""


def test_counts_come_from_the_junit_totals(tmp_path):
    (tmp_path / "gpu-tests.xml").write_text(JUNIT)
    (tmp_path / "gpu-tests-cuda-cores.xml").write_text(JUNIT.replace('tests="20"', 'tests="7"'))
    assert summary.summary(tmp_path) == [
        "tests-cuda-cores: 1 passed, 2 failed, 1 errors, 3 skipped",
        "tests: 14 passed, 2 failed, 1 errors, 3 skipped",
    ]


def test_kernel_families_decode_throughput_and_tp(tmp_path):
    row = dict(kernel="linear qkv", shape="M=1", us=1.0, rate=1.0, unit="GB/s", peer="cuBLAS")
    kernels = {"gpu": "G", "commit": "c", "copy_gbps": 3000.0, "rows": [
        dict(row, roofline_pct=89.0, peer_us=1.2, ratio=1.2), dict(row, roofline_pct=63.0, peer_us=0.9, ratio=0.9),
        dict(row, kernel="rms_norm", roofline_pct=81.0, peer="copy", peer_us=None, ratio=None)],
        "resources": [{"kernel": "attention.k", "local_bytes": 8}, {"kernel": "norm.k", "local_bytes": 0}]}
    decode = {"gpu": "G", "commit": "c", "layers": 32, "long_prompt": 2048, "long_prompt_ttft_ms": 104.6,
              "batch1": {"decode_tok_s": 150.0, "roofline_pct": 81.2, "host_pct": 2.7},
              "batches": [{"batch": 8, "decode_tok_s": 1156.1, "host_pct": 1.4, "ttft_ms": 55.4}],
              "sampled": [{"batch": 1, "decode_tok_s": 144.2, "host_pct": 2.9,
                           "sampling": {"temperature": 0.8, "top_p": 0.9}}],
              "hf": {"decode_tok_s": 15.0, "long_ttft_ms": 65.8},
              "ablation_gpu_ms": {"fused": 6.0, "silu": 6.25, "rope": 6.125}}
    throughput = {"ours": {"output_tok_s": 3821.0, "requests": 256}, "hf": {"output_tok_s": 178.0}}
    tp = {"title": "t", "tp1": {"decode_tok_s": 100.0}, "tp2": {"tp": 2, "agreement": 0.992, "decode_tok_s": 150.0}}
    step_profile = {"title": "G  commit c  batch 1", "idle_us": 3.04, "span_us": 4650.2, "kernels": [
        ["gemm_mma.mma_kernel.kernel v33", 32, 1898.2], ["gemm_mma.mma_kernel.kernel v13", 96, 1843.1],
        ["norm._norm_kernel.kernel v5", 65, 180.9], ["rope._rope_kernels.kernel_store v16", 32, 70.9],
        ["sampling._sample_kernel v40", 1, 37.1]]}
    for name, data in (("kernels", kernels), ("decode", decode), ("throughput", throughput), ("tp", tp),
                       ("step_profile", step_profile)):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    assert summary.summary(tmp_path) == [
        "kernels (G, c, copy 3000 GB/s)",
        "  linear           2 rows  63-89% of copy, 0.90-1.20x cuBLAS",
        "  rms_norm         1 rows  81-81% of copy",
        "  local memory (spills) in: attention.k",
        "decode (G, c, 32 layers)",
        "  batch 1: 150.0 tok/s, 81.2% of roofline (target 85%), host 2.7%",
        "  batch 8: 1156 tok/s, host 1.4%, TTFT 55 ms",
        "  sampled (temperature 0.8, top_p 0.9) batch 1: 144 tok/s, host 2.9%",
        "  HF transformers batch 1: 15.0 tok/s (10.0x)",
        "  fusions undone, PDL switched, step GPU time: silu +0.250 ms, rope +0.125 ms",
        "  TTFT of 2048 tokens: 104.6 ms, HF 65.8 ms",
        "step profile (G  commit c  batch 1): gemm_mma.mma_kernel.kernel v33 1898 us, gemm_mma.mma_kernel.kernel v13 "
        "1843 us, norm._norm_kernel.kernel v5 181 us, rope._rope_kernels.kernel_store v16 71 us; idle 3.0 us of 4650",
        "throughput: 3821 output tok/s over 256 requests; HF transformers 178 (21.5x)",
        "tensor parallel tp=2: top-1 agreement 99.2%, decode 100.0 -> 150.0 tok/s",
    ]


def test_an_empty_folder_gives_no_lines(tmp_path):
    assert summary.summary(tmp_path) == []
