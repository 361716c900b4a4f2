"""Make numba's CUDA simulator good enough to run our kernels unchanged.

The simulator runs one Python thread per CUDA thread. Three gaps matter to us:

* it has no warp intrinsics; :func:`install` adds ``shfl_sync``, ``shfl_up/down/xor_sync`` and
  ``syncwarp``, built on the block barrier, so they are valid only when the whole block reaches
  them together (every kernel here keeps that rule);
* it copies every NumPy argument in and back out, which breaks strided views (q and k inside a
  fused QKV buffer) and aliased arguments (out is residual); :func:`install` makes it pass the
  caller's arrays through instead, as device memory behaves.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

WARP = 32
_installed = False
_original_shared_array = None


def _exchange(value, source_lane):
    """Publish this thread's value to its warp and read the value of lane ``source_lane(lane)``.

    Two boards used alternately need one barrier per shuffle: a thread can only write a board again
    two shuffles later, after every thread has passed the barrier between, so all have read it.
    """
    thread = threading.current_thread()
    boards = thread._manager.__dict__.setdefault("_warp_boards", ({}, {}))
    turn = thread.__dict__.get("_shuffle_turn", 0)
    thread._shuffle_turn = turn ^ 1
    board = boards[turn]
    board[thread.thread_id] = value
    thread.syncthreads()
    lane = thread.thread_id % WARP
    source = source_lane(lane)
    key = thread.thread_id - lane + source
    if 0 <= source < WARP and key in board:
        return board[key]
    return value


_shared_lock = threading.Lock()


def _shared_array(self, shape, dtype, alignment=None):
    """``FakeCUDAShared.array`` with its check-then-allocate under a lock; same key (caller's file and line)."""
    if shape == 0 or alignment is not None:  # dynamic shared memory: one buffer made at launch
        return _original_shared_array(self, shape, dtype, alignment)
    from numba import types
    from numba.np import numpy_support

    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    frame = sys._getframe(1)
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _shared_lock:
        array = self._allocations.get(caller)
        if array is None:
            array = self._allocations[caller] = np.empty(shape, dtype)
    return array


def install() -> None:
    """Patch the simulator in place; call after ``NUMBA_ENABLE_CUDASIM=1`` took effect. Idempotent."""
    global _installed, _original_shared_array
    if _installed:
        return
    from numba import config

    if not config.ENABLE_CUDASIM:
        raise RuntimeError("the CUDA simulator shim needs NUMBA_ENABLE_CUDASIM=1 before numba is imported")
    from numba.cuda.simulator import kernel, kernelapi
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    module = kernelapi.FakeCUDAModule
    module.shfl_sync = lambda self, mask, value, src: _exchange(value, lambda lane: src % WARP)
    module.shfl_up_sync = lambda self, mask, value, delta: _exchange(value, lambda lane: lane - delta)
    module.shfl_down_sync = lambda self, mask, value, delta: _exchange(value, lambda lane: lane + delta)
    module.shfl_xor_sync = lambda self, mask, value, lanes: _exchange(value, lambda lane: lane ^ lanes)
    module.syncwarp = lambda self, mask=0xFFFFFFFF: threading.current_thread().syncthreads()

    class PassThrough:
        """Hands the kernel the caller's array itself (no copy in, no copy back)."""

        def __init__(self, value):
            self.value = value

        def to_device(self, retr, stream=0):
            return FakeCUDAArray(self.value)

    kernel.InOut = PassThrough
    _original_shared_array = kernelapi.FakeCUDAShared.array
    kernelapi.FakeCUDAShared.array = _shared_array
    # Simulated threads meet at every barrier; a short GIL switch interval makes that ~4x faster.
    sys.setswitchinterval(5e-4)
    _installed = True
