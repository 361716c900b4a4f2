"""What every launcher shares: argument checks, compiled-kernel caching, the launch stream and the
launch itself.

Launchers check every argument before anything is launched and raise ``ValueError`` naming the
argument, the expected and the given shape / dtype. They launch through :func:`launch` on CuPy's
current stream, so that ``with stream:`` (and CUDA-graph capture on that stream) covers them.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from typing import Any, Callable, Sequence

import numpy as np
from numba import config, cuda

SIMULATOR = bool(config.ENABLE_CUDASIM)
# The tensor-core paths (the mma decode GEMM, the prefill GEMM and prefill attention) run on a GPU
# unless INFINILM_NB_TENSOR_CORES=0, which keeps every op on the CUDA-core kernels. The simulator
# cannot run inline PTX, so there they are always off.
TENSOR_CORES = not SIMULATOR and os.environ.get("INFINILM_NB_TENSOR_CORES", "1") != "0"
# Programmatic dependent launch (launch) unless INFINILM_NB_PDL=0: it took the batch-1 decode step
# of the Llama-3-8B shape from 4.75 to 4.65 ms on an H200 (bench/RESULTS.md). Letting every kernel
# launch the next as it starts (griddepcontrol.launch_dependents) made the step 4.93 ms, and letting
# only the kernels other than the GEMMs 4.64.
PDL = not SIMULATOR and os.environ.get("INFINILM_NB_PDL", "1") != "0"
# The short kernels a decode GEMM follows (RMSNorm, the split attention's merge) let it launch as
# soon as they have waited for theirs (intrinsics.let_next_kernel_launch), so that its blocks are
# resident when those end. Read when a kernel is built for a launch; bench/ablation.py times the step
# with it off.
LAUNCH_NEXT_EARLY = True
FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
# bfloat16 travels as uint16 bit patterns (NumPy and CuPy have no bfloat16); see reference.BF16
BFLOAT16 = np.dtype(np.uint16)
WITH_BFLOAT16 = FLOAT_DTYPES + (BFLOAT16,)  # the launchers whose kernels take bfloat16 too


def dtype_name(dtype: Any) -> str:
    """The name of a dtype in messages: ``bfloat16`` for the uint16 bit patterns."""
    return "bfloat16" if np.dtype(dtype) == BFLOAT16 else np.dtype(dtype).name


def _describe(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_array(
    op: str,
    name: str,
    array: Any,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[Any] | None = None,
    contiguous: bool = True,
) -> None:
    """Raise ``ValueError`` unless ``array`` is a device array of the given shape / dtype / layout.

    ``None`` in ``shape`` accepts any size on that axis. ``contiguous`` asks for C order; with it
    False only the last axis must be unit-stride (strided views into a fused buffer).
    """
    if array is None:
        raise ValueError(f"{op}: {name} is required")
    on_device = hasattr(array, "__cuda_array_interface__") or (SIMULATOR and isinstance(array, np.ndarray))
    if not on_device:
        where = "a NumPy array (simulator)" if SIMULATOR else "a device array (CuPy / numba)"
        raise ValueError(f"{op}: {name} must be {where}, got {type(array).__name__}")
    if shape is not None:
        given = tuple(array.shape)
        if len(given) != len(shape) or any(e is not None and e != g for e, g in zip(shape, given)):
            expected = "(" + ", ".join("*" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
            raise ValueError(f"{op}: {name} must have shape {expected}, got {_describe(given)}")
    if dtypes is not None and np.dtype(array.dtype) not in [np.dtype(d) for d in dtypes]:
        names = [dtype_name(d) for d in dtypes]
        names = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise ValueError(f"{op}: {name} must be {names}, got {dtype_name(array.dtype)}")
    itemsize = np.dtype(array.dtype).itemsize
    strides = array.strides
    if array.size == 0:
        return  # NumPy gives empty arrays zero strides; there is nothing to lay out
    if contiguous:
        expected_strides, step = [], itemsize
        for size in reversed(array.shape):
            expected_strides.append(step)
            step *= size
        ok = all(s == e or n == 1 for s, e, n in zip(strides, reversed(expected_strides), array.shape))
        if not ok:
            raise ValueError(f"{op}: {name} must be C-contiguous, got strides {tuple(strides)}")
    elif array.ndim and array.shape[-1] > 1 and strides[-1] != itemsize:
        raise ValueError(f"{op}: {name} must be unit-stride along its last axis, got strides {tuple(strides)}")


def check_same_dtype(op: str, reference_name: str, reference: Any, **others: Any) -> None:
    """Raise ``ValueError`` unless every array in ``others`` has the dtype of ``reference``."""
    want = np.dtype(reference.dtype)
    for name, array in others.items():
        if array is not None and np.dtype(array.dtype) != want:
            raise ValueError(
                f"{op}: {name} must have the dtype of {reference_name} ({dtype_name(want)}), got {dtype_name(array.dtype)}"
            )


_compiled: dict[tuple[Callable, str], Any] = {}


def compiled(pyfunc: Callable, signature: str, **options: Any) -> Any:
    """``cuda.jit(signature)(pyfunc)``, compiled once per (function, signature) and cached.

    An explicit signature halves numba's per-launch host cost against a lazily typed kernel, and
    compiling on first use keeps import fast.
    """
    key = (pyfunc, signature)
    kernel = _compiled.get(key)
    if kernel is None:
        kernel = _compiled[key] = cuda.jit(signature, **options)(pyfunc)
    return kernel


# Shared memory a kernel may declare statically. A block that needs more declares it dynamic
# (``cuda.shared.array(0, ...)``) and gives its size to :func:`launch`.
STATIC_SHARED_BYTES = 48 * 1024
_shared_allowed: dict[Any, int] = {}


def _overload(kernel: Any) -> Any:
    """The one compiled overload of ``kernel`` (compiled for one signature: :func:`compiled`)."""
    return next(iter(kernel.overloads.values()))


def _dynamic_shared_bytes(kernel: Any, nbytes: int) -> int:
    """The dynamic shared memory to launch ``kernel`` with, for a block of ``nbytes`` of shared
    memory: 0 up to :data:`STATIC_SHARED_BYTES` (declared statically), else ``nbytes``, with the
    function opted in.

    Past 48 KB the function must be opted in (``CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES``),
    which numba-cuda has no API for: this sets it on the loaded function, as numba's own
    ``set_shared_memory_carveout`` sets its attribute.
    """
    if nbytes <= STATIC_SHARED_BYTES:
        return 0
    if not SIMULATOR and _shared_allowed.get(kernel, 0) < nbytes:
        from numba.cuda.cudadrv.driver import binding, driver

        function = _overload(kernel)._codelibrary.get_cufunc()
        attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        driver.cuKernelSetAttribute(attribute, int(nbytes), function.handle, function.device.id)
        _shared_allowed[kernel] = nbytes
    return nbytes


_streams: dict[int, Any] = {}


_kept: dict[tuple, Any] = {}


def kept(like: Any, key: tuple, make: Callable[[Any], Any]) -> Any:
    """``make(xp)`` made once per ``key`` and per array module and device of ``like`` (``xp``: CuPy
    for a device array, else NumPy), then kept: constants and scratch that launches, and the CUDA
    graphs captured over them, keep pointing at. Made on first use, which the decode graphs' eager
    warm-up reaches before any capture."""
    full_key = (type(like), str(getattr(like, "device", "")), *key)
    if full_key not in _kept:
        xp = importlib.import_module("cupy" if hasattr(like, "__cuda_array_interface__") else "numpy")
        _kept[full_key] = make(xp)
    return _kept[full_key]


def launch_stream() -> Any:
    """The stream to launch on: CuPy's current stream on a GPU, 0 in the simulator."""
    if SIMULATOR:
        return 0
    import cupy

    ptr = cupy.cuda.get_current_stream().ptr
    stream = _streams.get(ptr)
    if stream is None:
        stream = _streams[ptr] = cuda.external_stream(ptr) if ptr else cuda.default_stream()
    return stream


def numba_type(dtype: Any) -> str:
    """The numba type name of a NumPy dtype, for signature strings."""
    return {"float16": "float16", "float32": "float32", "uint16": "uint16", "int32": "int32", "uint64": "uint64",
            "int64": "int64"}[
        np.dtype(dtype).name
    ]


@lru_cache(maxsize=None)
def multiprocessors() -> int:
    """The current GPU's streaming multiprocessors (a process drives one GPU: one rank per GPU)."""
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def launch(
    kernel: Any, grid: Any, block: Any, args: Sequence[Any], shared_bytes: int = 0, cluster: tuple | None = None,
) -> None:
    """Launch ``kernel`` (compiled for one signature) on :func:`launch_stream`. ``shared_bytes``: the
    block's shared memory when it may be more than :data:`STATIC_SHARED_BYTES`, which the kernel then
    declares dynamically (0, or anything up to that, launches with no dynamic shared memory).
    ``cluster``: blocks a thread block cluster spans along each axis of ``grid`` (which counts blocks,
    a multiple of it), where :func:`clusters_launch` (Hopper on); None: clusters of one block.

    A kernel that calls :func:`.intrinsics.await_previous_kernels` is launched with programmatic
    dependent launch (PDL) while :data:`PDL` is on: once every block of the kernel before it has
    exited, it is launched and its blocks run up to their call while that kernel completes (its
    writes are flushed), which hides the launch gap between the two. CUDA-graph capture records it
    as a programmatic edge. Kernels without the call (whose PTX lacks ``griddepcontrol.wait``) are
    launched plainly, so a kernel never overlaps one it did not wait for.
    """
    stream = launch_stream()
    shared = _dynamic_shared_bytes(kernel, shared_bytes)
    programmatic = PDL and _awaits_previous_kernels(kernel) and _programmatic_launch_config()
    if cluster is not None and not clusters_launch():
        raise ValueError(f"launch: thread block clusters {cluster} need a Hopper or newer GPU")
    if cluster is None and not programmatic:
        kernel[grid, block, stream, shared](*args)
        return
    from cuda.core import LaunchConfig
    from cuda.core import launch as core_launch
    from numba.cuda.cudadrv import driver

    # numba's own launch (dispatcher._Kernel.launch) with PDL or clusters added to its LaunchConfig
    overload = _overload(kernel)
    core_stream = driver._to_core_stream(stream)
    retained: list = []
    kernel_args: list = []
    for arg_type, value in zip(overload.argument_types, args):
        overload._prepare_args(arg_type, value, core_stream, retained, kernel_args)
    if cluster is not None:  # cuda.core counts the grid in clusters
        grid = tuple(blocks // span for blocks, span in zip(_three(grid), _three(cluster)))
        cluster = _three(cluster)
    config = LaunchConfig(grid=grid, cluster=cluster, block=block, shmem_size=shared,
                          **({"programmatic_stream_serialization": True} if programmatic else {}))
    core_launch(core_stream, config, overload._codelibrary.get_cufunc().kernel, *kernel_args)


def _three(dims: Any) -> tuple[int, int, int]:
    """Launch dimensions as three (an int or a shorter tuple padded with ones)."""
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return dims + (1,) * (3 - len(dims))


@lru_cache(maxsize=None)
def clusters_launch() -> bool:
    """Whether :func:`launch` can group blocks into clusters: a Hopper or newer GPU (never the simulator)."""
    return not SIMULATOR and cuda.get_current_device().compute_capability >= (9, 0)


@lru_cache(maxsize=None)
def active_clusters(kernel: Any, block: int, cluster: tuple) -> int:
    """The clusters of ``cluster`` blocks of ``block`` threads of the compiled ``kernel`` that the GPU
    runs at once (the driver's occupancy calculator: blocks an SM, and the SMs of each GPC)."""
    from cuda.core import LaunchConfig
    from numba.cuda.cudadrv import driver

    config = LaunchConfig(grid=1, cluster=_three(cluster), block=block)
    occupancy = _overload(kernel)._codelibrary.get_cufunc().kernel.occupancy
    return occupancy.max_active_clusters(config, stream=driver._to_core_stream(launch_stream()))


@lru_cache(maxsize=None)
def _programmatic_launch_config() -> bool:
    """Whether the GPU is a Hopper or newer and the installed cuda.core's LaunchConfig can ask for PDL."""
    from cuda.core import LaunchConfig

    hopper = cuda.get_current_device().compute_capability >= (9, 0)
    return hopper and "programmatic_stream_serialization" in dir(LaunchConfig)


@lru_cache(maxsize=None)
def _awaits_previous_kernels(kernel: Any) -> bool:
    """Whether the compiled ``kernel`` waits for the kernels before it (griddepcontrol.wait)."""
    return "griddepcontrol.wait" in "".join(kernel.inspect_asm().values())
