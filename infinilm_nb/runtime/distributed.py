"""Ranks and collectives: one process per GPU under ``mpirun``, NCCL (through CuPy) on GPUs, MPI on CPUs.

Launched without MPI the process is rank 0 of 1 and mpi4py is never imported. Under ``mpirun`` /
``mpiexec`` every rank builds the same :class:`CommunicationGroup`; on ``cuda`` rank 0 makes the NCCL
unique id and broadcasts it with mpi4py, and every collective is an NCCL call on CuPy's current
stream (so a decode CUDA graph captures it). A rank that raises takes every rank down (MPI abort)
instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from ..kernels import reference

# Launchers set one of these in every rank's environment: OpenMPI, MPICH/Hydra, PMIx, Slurm.
_WORLD_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    """True when this process was started by an MPI launcher with more than one rank."""
    return any(int(os.environ.get(var, "1") or 1) > 1 for var in _WORLD_SIZE_VARS)


# Open MPI refuses root and more ranks than cores unless told; MPICH ignores these.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "NCCL_NVLS_ENABLE": "0",
}


def find_mpiexec() -> str | None:
    """The ``mpiexec`` on PATH, else the one beside this Python (the ``mpich`` wheel puts it there)."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return shutil.which("mpiexec") or (beside if os.access(beside, os.X_OK) else None)


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands: its rank, the world size, its rank on this host, and its GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: int = 0

    @property
    def is_driver(self) -> bool:
        """Rank 0 tokenizes, schedules, samples and prints; the others follow its broadcasts."""
        return self.rank == 0

    @classmethod
    def detect(cls) -> "RankInfo":
        """Read the rank layout from MPI (without importing mpi4py when not launched by MPI)."""
        if not launched_by_mpi():
            return cls()
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        local = world.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank = local.Get_rank()
        local.Free()
        device = local_rank
        try:
            import cupy

            device = local_rank % max(cupy.cuda.runtime.getDeviceCount(), 1)
        except Exception:
            pass  # no GPU: the device index is unused
        return cls(world.Get_rank(), world.Get_size(), local_rank, device)


def bind_device(info: RankInfo) -> None:
    """Make this rank's GPU (``info.device``) current for CuPy and numba, before anything is allocated
    or launched on it (numba launches on its current context, CuPy allocates on its current device)."""
    import cupy
    from numba import cuda

    cupy.cuda.Device(info.device).use()
    cuda.select_device(info.device)


ABORT_GRACE_S = 0.5


def abort_job(rank: int, error: BaseException) -> NoReturn:
    """Print ``error``'s traceback, prefixed with the rank, and abort every rank of the MPI job."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    sys.stderr.write(f"[rank {rank}] {text}")
    sys.stderr.flush()
    from mpi4py import MPI

    # The launcher forwards each rank's output asynchronously and drops what is in flight when it
    # tears the job down: give it a moment to pass the message on before the abort.
    time.sleep(ABORT_GRACE_S)
    MPI.COMM_WORLD.Abort(1)
    raise SystemExit(1)  # not reached: Abort ends the process


def install_abort_on_error(info: RankInfo) -> None:
    """Make an uncaught exception on any rank print its traceback and abort the whole MPI job.

    Without this a failing rank exits while the others wait forever in their next collective.
    """
    if info.world_size == 1:
        return
    sys.excepthook = lambda kind, value, tb: abort_job(info.rank, value.with_traceback(tb))


# uint16 arrays are bfloat16 bit patterns (the runtime's bfloat16)
_NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "uint16": "NCCL_BFLOAT16", "int32": "NCCL_INT32",
               "int64": "NCCL_INT64"}


class CommunicationGroup:
    """all_reduce / all_gather / broadcast over every rank, on the backend's arrays.

    ``backend.name == "cuda"``: NCCL through ``cupy.cuda.nccl`` on CuPy's current stream. Otherwise
    mpi4py on host arrays. With one rank every call is a no-op (or a copy), so the runtime calls them
    unconditionally.
    """

    def __init__(self, info: RankInfo, backend: Any):
        self.info = info
        self.backend = backend
        self._mpi = None
        self._nccl = None
        self._closed = False
        if info.world_size == 1:
            return
        from mpi4py import MPI

        self._mpi = MPI.COMM_WORLD
        if backend.on_gpu:
            from cupy.cuda import nccl

            uid = nccl.get_unique_id() if info.rank == 0 else None
            uid = self._mpi.bcast(uid, root=0)
            self._nccl = nccl.NcclCommunicator(info.world_size, uid, info.rank)

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def _on_nccl(self) -> bool:
        """True when collectives go through NCCL (a GPU group); an error once it is closed."""
        if self._closed:
            raise RuntimeError("CommunicationGroup: the NCCL communicator was closed")
        return self._nccl is not None

    def _nccl_args(self, array: Any) -> tuple[int, int]:
        from cupy.cuda import nccl

        name = np.dtype(array.dtype).name
        if name not in _NCCL_TYPES:
            raise ValueError(f"all_reduce: dtype {name} has no NCCL type (supported: {', '.join(_NCCL_TYPES)})")
        return getattr(nccl, _NCCL_TYPES[name]), self.backend.xp.cuda.get_current_stream().ptr

    def all_reduce(self, array: Any) -> Any:
        """Sum ``array`` over ranks, in place; returns it."""
        if self.world_size == 1:
            return array
        if self._on_nccl():
            from cupy.cuda import nccl

            dtype, stream = self._nccl_args(array)
            self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, dtype, nccl.NCCL_SUM, stream)
            return array
        from mpi4py import MPI

        if array.dtype in (np.float16, reference.BF16):  # MPI has no 16-bit float types: reduce in float32
            wide = reference.to_f32(array)
            self._mpi.Allreduce(MPI.IN_PLACE, wide, op=MPI.SUM)
            array[...] = reference.cast(wide, array.dtype)
        else:
            self._mpi.Allreduce(MPI.IN_PLACE, array, op=MPI.SUM)
        return array

    def all_gather(self, array: Any, out: Any) -> Any:
        """Gather every rank's ``array`` into ``out`` of shape ``(world_size, *array.shape)``."""
        if tuple(out.shape) != (self.world_size, *array.shape):
            raise ValueError(
                f"all_gather: out must have shape {(self.world_size, *array.shape)}, got {tuple(out.shape)}"
            )
        if self.world_size == 1:
            out[0] = array
            return out
        if self._on_nccl():
            dtype, stream = self._nccl_args(array)
            self._nccl.allGather(array.data.ptr, out.data.ptr, array.size, dtype, stream)
            return out
        self._mpi.Allgather(np.ascontiguousarray(array), out)
        return out

    def broadcast(self, array: Any, root: int = 0) -> Any:
        """Copy ``root``'s ``array`` into every rank's ``array``, in place."""
        if self.world_size == 1:
            return array
        if self._on_nccl():
            dtype, stream = self._nccl_args(array)
            self._nccl.bcast(array.data.ptr, array.size, dtype, root, stream)
            return array
        self._mpi.Bcast(array, root=root)
        return array

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Send a picklable host object from ``root`` to every rank (the step plan, sampled tokens)."""
        if self.world_size == 1:
            return obj
        return self._mpi.bcast(obj, root=root)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable host ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        return self._mpi.allgather(obj)

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self._mpi is not None:
            self._mpi.Barrier()

    def close(self) -> None:
        """Free the NCCL communicator; every rank calls this at the same point of its program.

        NCCL finalizes a communicator together with its peers. Left to the garbage collector, a
        process holding two communicators may free them in another order than its peer, and both
        wait for each other forever at exit (seen on 2 H200s). Collectives after ``close`` on a GPU
        are errors.
        """
        if self._nccl is not None:
            self._nccl.destroy()
            self._nccl = None
            self._closed = True
