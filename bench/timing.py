"""GPU timing done right (../shared/DESIGN.md, "Benchmarks").

* A Numba launch costs the host 20-50 us, more than many decode kernels take: capture ``reps``
  launches in a CUDA graph and time its replays with events.
* The L2 holds 50-60 MB: each launch in the loop reads its own copy of the inputs, rotating over
  enough copies that the whole set is several times the L2.
* The timed calls run on a non-blocking stream, which does not wait for the default stream: each
  timer first waits for the device, so inputs made there (random data, positions) are written
  before a kernel reads them (a position read unwritten sent RoPE outside its table).
"""

from __future__ import annotations

from statistics import median
from typing import Any, Callable, Sequence

import cupy

L2_BYTES = cupy.cuda.runtime.getDeviceProperties(0)["l2CacheSize"]


def gpu_name() -> str:
    return cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()


def copies_needed(bytes_per_call: int, budget: int = 8 << 30) -> int:
    """How many input copies make the rotation at least 3x the L2 (at most ``budget`` bytes)."""
    want = -(-3 * L2_BYTES // max(bytes_per_call, 1)) + 1
    return max(1, min(want, budget // max(bytes_per_call, 1)))


def _events_ms(run: Callable[[], None], stream: Any, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        run()
        end.record(stream)
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end))
    return times


def time_graph(calls: Sequence[Callable[[], None]], reps: int = 50, rounds: int = 7) -> float:
    """Median seconds per call of ``calls`` (cycled ``reps`` times), captured once in a CUDA graph.

    Each call launches on CuPy's current stream; the first call of each is run eagerly first, so
    compilation and module loading stay out of the capture.
    """
    cupy.cuda.runtime.deviceSynchronize()  # the inputs, made on the default stream, must be written
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for call in calls:
            call()
        stream.synchronize()
        stream.begin_capture()
        for i in range(reps):
            calls[i % len(calls)]()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = _events_ms(lambda: graph.launch(stream), stream, rounds)
    return median(times) / 1e3 / reps


def time_eager(calls: Sequence[Callable[[], None]], reps: int = 50, rounds: int = 7) -> float:
    """Median seconds per call launched eagerly (for work that CuPy will not capture and that is long
    enough for the launch not to matter, such as the 1 GB copy)."""
    cupy.cuda.runtime.deviceSynchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for call in calls:
            call()
        stream.synchronize()

        def loop():
            for i in range(reps):
                calls[i % len(calls)]()

        times = _events_ms(loop, stream, rounds)
    return median(times) / 1e3 / reps


def time_torch_graph(calls: Sequence[Callable[[], None]], reps: int = 50, rounds: int = 7) -> float:
    """Median seconds per call of ``calls`` (cycled ``reps`` times), captured in one torch CUDA graph
    (for torch peers such as SDPA; the first call of each runs eagerly first, on a side stream)."""
    import torch

    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times) / 1e3 / reps


def time_cublas(operands: Sequence[tuple[Any, Any, Any]], reps: int = 50, rounds: int = 7) -> float:
    """Median seconds of cuBLAS's ``out = x @ w.T`` over the CuPy arrays ``(x, w, out)`` of each
    entry (cycled), through torch.matmul on the same memory (DLPack) replayed from a torch CUDA graph:
    the GPU's time alone. Launched eagerly, a decode-sized GEMM times the host instead (CuPy's matmul
    costs the host 20-30 us, more than the kernel, and the figure moved 40% between two H100s)."""
    import torch

    tensors = [tuple(torch.from_dlpack(array) for array in entry) for entry in operands]
    calls = [lambda x=x, w=w, out=out: torch.matmul(x, w.t(), out=out) for x, w, out in tensors]
    return time_torch_graph(calls, reps, rounds)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = cupy.empty(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    seconds = time_eager([lambda: dst.__setitem__(Ellipsis, src)], reps=10, rounds=5)
    return 2 * nbytes / seconds
