"""Where a decode step's GPU time goes: every kernel of the step's CUDA graph, timed by CUPTI
(through torch.profiler, which sees every kernel of the process, numba's included), grouped by
kernel, with the idle time between kernels.

Usage: ``python3 bench/step_profile.py [--model-dir DIR] [--layers 32] [--batch 1] [--out DIR]``.
It prints, per kernel and grid, the launches per step and the microseconds per step, then the step's busy
time (the union of the kernels' intervals), its idle time (the gaps), its span and the step's time
replayed without the profiler (median of 5 runs of 50 replays); with
programmatic dependent launch on, a kernel waiting for the one before it is counted busy from its
start. A Hopper needs torch built with CUPTI (the GPU machine's torch is).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model import llama_config, model_directory  # noqa: E402

_NUMBA_KERNEL = re.compile(r"infinilm_nb::kernels::(.*?)\[abi:(v\d+)\]")


def kernel_name(name: str) -> str:
    """A numba kernel's name as CUPTI reports it, ``infinilm_nb::kernels::gemm_mma::mma_kernel::
    _3clocals_3e::kernel[abi:v31][abi:...]E...``, as ``gemm_mma.mma_kernel.kernel v31`` (the version
    tells apart the kernels one factory built); other kernels' names (cuBLAS, CuPy) as given."""
    match = _NUMBA_KERNEL.match(name)
    if match is None:
        return name
    return f"{match.group(1).replace('::_3clocals_3e::', '.').replace('::', '.')} {match.group(2)}"


def trace_kernels(trace: dict[str, Any]) -> list[tuple[str, float, float]]:
    """``(name, start_us, end_us)`` of the GPU kernels of a Chrome trace (what torch.profiler
    exports), sorted by start; the name is :func:`kernel_name` and the launch's grid when the trace
    has it, so that one kernel launched at several shapes (the decode GEMM's qkv, o and down) shows
    as several rows."""
    kernels = []
    for event in trace.get("traceEvents", []):
        if event.get("cat") != "kernel":
            continue
        name = kernel_name(event["name"])
        grid = event.get("args", {}).get("grid")
        if grid:
            name += " grid " + "x".join(str(g) for g in grid)
        kernels.append((name, float(event["ts"]), float(event["ts"]) + float(event["dur"])))
    return sorted(kernels, key=lambda kernel: kernel[1])


def step_kernels(replay: Any, steps: int) -> list[tuple[str, float, float]]:
    """The GPU kernels (:func:`trace_kernels`) that ``steps`` calls of ``replay()`` ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "trace.json"
        trace.export_chrome_trace(str(path))
        return trace_kernels(json.loads(path.read_text()))


def summarize(kernels: list[tuple[str, float, float]], steps: int) -> dict[str, Any]:
    """Per kernel name: launches and microseconds per step; the busy (union of intervals), idle and
    span microseconds per step."""
    per_kernel: dict[str, list[float]] = {}
    busy, reach = 0.0, None
    for name, start, end in kernels:
        count_time = per_kernel.setdefault(name, [0, 0.0])
        count_time[0] += 1
        count_time[1] += end - start
        if reach is None or start >= reach:
            busy += end - start
            reach = end
        elif end > reach:
            busy += end - reach
            reach = end
    span = kernels[-1][2] - kernels[0][1] if kernels else 0.0
    rows = sorted(((name, count / steps, total / steps) for name, (count, total) in per_kernel.items()),
                  key=lambda row: -row[2])
    return {"kernels": rows, "busy_us": busy / steps, "idle_us": (span - busy) / steps, "span_us": span / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, help="keep the random checkpoint here (reused if its config matches)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20, help="graph replays profiled")
    parser.add_argument("--out", type=Path, help="write step_profile.json here")
    args = parser.parse_args(argv)

    from bench.decode import graph_step_seconds, run_batch
    from bench.provenance import commit
    from bench.timing import gpu_name
    from infinilm_nb import LLM
    from infinilm_nb.kernels import common

    with model_directory(llama_config(args.layers), args.model_dir) as directory:
        llm = LLM(directory, backend="cuda", dtype="float16", max_num_seqs=args.batch, max_model_len=4096,
                  gpu_memory_utilization=0.5)
        run_batch(llm, args.batch, 128, 8, seed=99)  # real inputs in the graph's buffers
        step_ms = median(1e3 * graph_step_seconds(llm, args.batch) for _ in range(5))
        summary = summarize(step_kernels(lambda: llm.engine.graphs.replay(args.batch), args.steps), args.steps)
        summary["graph_step_ms"] = step_ms
        llm.close()
    title = f"{gpu_name()}  commit {commit()}  batch {args.batch}  {args.layers} layers  PDL {'on' if common.PDL else 'off'}"
    print(title)
    print(f"{'kernel':<64} {'per step':>8} {'us/step':>9} {'us each':>8}")
    for name, count, micros in summary["kernels"]:
        print(f"{name[:64]:<64} {count:>8.0f} {micros:>9.1f} {micros / count:>8.2f}")
    print(f"busy {summary['busy_us']:.1f} us, idle between kernels {summary['idle_us']:.1f} us, "
          f"span {summary['span_us']:.1f} us a step; unprofiled graph replay {step_ms:.3f} ms a step")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step_profile.json").write_text(json.dumps({"title": title, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
