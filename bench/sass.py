"""SASS profiles of the kernels that miss their targets, built for an H100 / H200 (sm_90a) without a GPU.

Usage: ``python bench/sass.py [--out DIR]``, with ``ptxas`` and ``nvdisasm`` (the CUDA toolkit, or
the ``nvidia-cuda-nvcc`` / ``nvidia-cuda-nvdisasm`` wheels) on PATH or named by the PTXAS and
NVDISASM variables. Each kernel's PTX comes from ``cuda.compile_ptx`` with the signature and options
its launcher uses; ptxas assembles it for sm_90a (what numba-cuda builds for a Hopper) and nvdisasm
lists the SASS. Per kernel: registers, spills, instructions, and the instructions of one trip of its
hot loop by kind: global loads by width, shared loads, ldmatrix, mma (HMMA; HGMMA: wgmma), shuffles,
MUFU (exp / log), FMA, for the loop that does the most loads and mma (the K loop of a GEMM, the key
loop of attention). Prints a table; writes each listing to DIR. The device's driver may schedule a
little differently from this ptxas.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

KINDS = {  # instruction kind: SASS opcode pattern (the first that matches counts)
    "LDGSTS": r"^LDGSTS",
    "LDG.128": r"^LDG\.[A-Z0-9.]*128",
    "LDG other": r"^LDG(?!DEPBAR)",
    "LDS": r"^LDS(?!M)",
    "LDSM": r"^LDSM",
    "HMMA": r"^HMMA",
    "HGMMA": r"^HGMMA",
    "SHFL": r"^SHFL",
    "MUFU": r"^MUFU",
    "FMA": r"^(FFMA|HFMA2)",
    "BAR": r"^BAR",
}


def tool(name: str) -> str:
    """The path of a CUDA tool: the environment variable named after it, else PATH."""
    path = os.environ.get(name.upper()) or shutil.which(name)
    if not path:
        raise SystemExit(f"{name} not found: put it on PATH or set {name.upper()}")
    return path


def kernels() -> list[tuple[str, Callable, str, dict[str, Any]]]:
    """(label, Python kernel, signature, compile options) of each profiled kernel, as launched for
    Llama-3-8B shapes in float16."""
    from infinilm_nb.kernels import attention, attention_mma, attention_prefill, gemm, gemm_tc, norm, rope, sampling
    from infinilm_nb.kernels.gemm_mma import mma_kernel

    f16 = gemm.kernel_signature(np.float16)
    rows = []
    for name, m, n, k, fused, normalise in (
        ("o", 1, 4096, 4096, False, False), ("rms+qkv+rope", 1, 6144, 4096, False, True),
        ("rms+qkv+rope", 32, 6144, 4096, False, True), ("rms+gate_up+silu", 32, 14336, 4096, True, True),
        ("down", 32, 4096, 14336, False, False),
    ):
        config = gemm.mma_config(m, n, k, fused, normalise)
        if name.endswith("rope"):  # as gemm.linear_rope_store_kv launches it
            config = replace(config, rope_dim=128)
        rows.append((f"decode GEMM {name} M={m}", mma_kernel(config), gemm.mma_signature(config),
                     gemm.mma_options(config)))
    dim, group, vec, block = 128, 4, 8, 16
    warps = attention._warps(dim, group, vec)
    _, partition = attention._attention_kernels(dim, group, vec, warps, block, False)
    rows.append(("decode attention (split, CUDA cores)", partition, attention.kernel_signatures("float16")[1],
                 attention._compile_options(dim, group, vec)))
    _, partition = attention_mma.mma_attention_kernels(dim, group, block)
    rows.append(("decode attention (split, mma)", partition, attention_mma.kernel_signatures()[1], {"fastmath": True}))
    for config in (gemm_tc.tc_config(512), gemm_tc.tc_config(2048), gemm_tc.TcConfig(), gemm_tc.TcConfig(stages=6),
                   gemm_tc.TcConfig(128, 256, 2, 4, stages=4),
                   gemm_tc.TcConfig(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True),
                   gemm_tc.TcConfig(block_m=128, block_n=128, warps_m=8, warps_n=1, block_k=64, wgmma=True, stages=4,
                                    in_flight=1),
                   gemm_tc.TcConfig(block_m=128, block_n=256, warps_m=8, warps_n=1, block_k=64, wgmma=True)):
        rows.append((f"prefill GEMM {config.label}", gemm_tc.tc_kernel(config), f16, {}))
    for stages, block_q, wgmma in ((2, 64, False), (2, 128, False), (2, 64, True), (2, 128, True)):
        label = f"prefill attention d=128, {stages} K/V stage(s), {block_q} queries" + (", wgmma" if wgmma else "")
        rows.append((label, attention_prefill.prefill_kernel(dim, stages, block_q, wgmma), attention_prefill.SIGNATURE,
                     {}))
    h16 = "float16[::1]"
    for add in (False, True):  # 4096 hidden, a 4096-row launch (no early launch, the weights as it writes)
        kernel = norm._norm_kernel(8, 8, add, "float16", "float16", False, False)
        rows.append(("add_rms_norm" if add else "rms_norm", kernel,
                     f"void({h16}, {h16}, {h16}, float32, {h16})", {}))
    rows.append(("rope (q and k in place)", rope._rope_kernels(8, 4, 64, False)[0],
                 f"void({h16}, {h16}, int32[::1], float32[::1], int64, int64, int64, int64, int64, int64)", {}))
    rows.append(("store_kv", attention._store_kv_kernel(8, 128),
                 f"void({h16}, {h16}, {h16}, {h16}, int32[::1], int32[::1], int32, int64, int32, UniTuple(int64, 4))",
                 {}))
    for dtype, vec in (("float32", 4), ("float16", 8), ("float16", 1)):
        rows.append((f"sampler ({dtype} logits, {vec} a load)", sampling._sampler(vec, False),
                     sampling.kernel_signature(dtype), {"max_registers": sampling.MAX_REGISTERS}))
    return rows


def assemble(ptx: str, max_registers: int | None, directory: Path, label: str) -> tuple[str, str]:
    """(ptxas -v report, nvdisasm listing) of ``ptx`` for sm_90a."""
    stem = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")
    ptx_path, cubin = directory / f"{stem}.ptx", directory / f"{stem}.cubin"
    ptx_path.write_text(ptx)
    command = [tool("ptxas"), "-arch=sm_90a", "-v", str(ptx_path), "-o", str(cubin)]
    if max_registers:
        command.insert(2, f"-maxrregcount={max_registers}")
    report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    listing = subprocess.run([tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return report, listing


def instructions(listing: str) -> tuple[list[str], dict[str, int]]:
    """The SASS instructions (opcode with modifiers and operands) of a listing, and the index of the
    instruction each label stands before."""
    ops: list[str] = []
    labels: dict[str, int] = {}
    for line in listing.splitlines():
        match = re.match(r"^\s*(\.L_x_\d+):", line)
        if match:
            labels[match.group(1)] = len(ops)
            continue
        match = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;", line)
        if match:
            ops.append(f"{match.group(1)} {match.group(2)}".strip())
    return ops, labels


def kinds(ops: list[str]) -> Counter:
    """How many of ``ops`` fall under each of :data:`KINDS` (first match wins)."""
    counts: Counter = Counter()
    for op in ops:
        for kind, pattern in KINDS.items():
            if re.match(pattern, op):
                counts[kind] += 1
                break
    return counts


def loops(ops: list[str], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of each loop: a branch back to a label above it."""
    found = []
    for i, op in enumerate(ops):
        match = re.match(r"^BRA\s+`?\(?(\.L_x_\d+)", op)
        if match and labels.get(match.group(1), i) < i:
            found.append((labels[match.group(1)], i))
    return found


def hot_loop(ops: list[str], labels: dict[str, int]) -> tuple[int, Counter] | None:
    """(size, kinds) of the innermost loop doing the most memory and tensor-core work: the one that
    runs once per K step (GEMM), per key block (attention) or per row chunk (sampler)."""
    found = loops(ops, labels)
    innermost = [(a, b) for a, b in found if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in found)]
    best = None
    for first, last in innermost:
        counts = kinds(ops[first : last + 1])
        work = (counts["HMMA"] + counts["HGMMA"] + counts["LDSM"] + counts["LDGSTS"] + counts["LDG.128"]
                + counts["LDG other"])
        key = (work, first - last)
        if work and (best is None or key > best[0]):
            best = (key, last - first + 1, counts)
    return None if best is None else (best[1], best[2])


def profile(label: str, pyfunc: Callable, signature: str, options: dict[str, Any], directory: Path) -> dict[str, Any]:
    from numba import cuda

    ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=(9, 0, "a"), fastmath=options.get("fastmath", False))
    report, listing = assemble(ptx, options.get("max_registers"), directory, label)
    (directory / f"{re.sub(r'[^A-Za-z0-9]+', '_', label).strip('_')}.sass").write_text(listing)
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    stack = int(re.search(r"(\d+) bytes stack frame", report).group(1))
    ops, labels = instructions(listing)
    return {"kernel": label, "registers": registers, "stack": stack, "spill_stores": int(spill.group(1)),
            "instructions": len(ops), "totals": kinds(ops), "hot_loop": hot_loop(ops, labels)}


def describe(counts: Counter) -> str:
    return " ".join(f"{kind} {counts[kind]}" for kind in KINDS if counts[kind])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/out/sass"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import numba.cuda.dispatcher as dispatcher

    # compile_ptx asks the current device for its compute capability even when cc is given
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    with tempfile.TemporaryDirectory():
        for label, pyfunc, signature, options in kernels():
            p = profile(label, pyfunc, signature, options, args.out)
            print(f"{p['kernel']}: {p['registers']} registers, stack {p['stack']} B, spill stores "
                  f"{p['spill_stores']} B, {p['instructions']} instructions ({describe(p['totals'])})")
            if p["hot_loop"]:
                size, counts = p["hot_loop"]
                print(f"    hot loop, one trip: {size} instructions ({describe(counts)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
