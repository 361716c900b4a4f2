"""Backends: where arrays live and which implementation runs each op.

* ``cuda``: CuPy owns memory and streams; ops are the Numba ``@cuda.jit`` kernels in ``kernels/``.
* ``cpu``: NumPy arrays; ops are ``kernels/reference.py``, the NumPy specification.
* ``sim``: NumPy arrays; ops are the same Numba kernels run by numba's CUDA simulator
  (``NUMBA_ENABLE_CUDASIM=1``, which must be set before numba is first imported). Very slow.

``get_backend()`` picks one from its argument, else ``INFINILM_NB_BACKEND``, else ``auto`` (cuda when a
GPU and CuPy are usable, else cpu).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

BACKENDS = ("cuda", "cpu", "sim")

# op name -> kernels module that launches it (the reference has them all)
OP_MODULES = {
    "embedding": "embedding",
    "rms_norm": "norm",
    "add_rms_norm": "norm",
    "rope": "rope",
    "rope_store_kv": "rope",
    "silu_mul": "activation",
    "linear": "gemm",
    "linear_silu_mul": "gemm",
    "linear_rope_store_kv": "gemm",
    "store_kv": "attention",
    "store_kv_static": "attention",
    "paged_attention": "attention",
    "static_attention": "attention",
    "sample": "sampling",
}


@dataclass
class Backend:
    """One backend: its name, array module (``xp``), op table and transfer helpers."""

    name: str
    xp: ModuleType
    ops: Any

    @property
    def on_gpu(self) -> bool:
        return self.name == "cuda"

    def asarray(self, host: Any, dtype: Any = None) -> Any:
        """Copy a host array (or anything ``np.asarray`` takes) to the backend's memory."""
        return self.xp.asarray(np.asarray(host, dtype=dtype))

    def to_host(self, array: Any) -> np.ndarray:
        """Return a NumPy copy of a backend array."""
        if self.on_gpu:
            return self.xp.asnumpy(array)
        return np.array(array)

    def synchronize(self) -> None:
        """Wait for all queued work (a no-op off the GPU)."""
        if self.on_gpu:
            self.xp.cuda.get_current_stream().synchronize()


def cuda_problem() -> str | None:
    """Why the cuda backend cannot run here (a sentence with the fix), or None if it can."""
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed: pip install 'infinilm-nb[gpu]' (cupy-cuda12x, or cupy-cuda13x for CUDA 13)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # CuPy raises its own CUDARuntimeError when no driver is present
        return f"no usable CUDA GPU: {error}"
    if count == 0:
        return "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "NUMBA_ENABLE_CUDASIM=1 is set, so numba runs its simulator instead of the GPU"
    return None


def enable_simulator() -> None:
    """Switch numba to its CUDA simulator (before numba is imported) and install our shim."""
    if "numba" in sys.modules:
        from numba import config

        if not config.ENABLE_CUDASIM:
            raise RuntimeError(
                "the sim backend needs NUMBA_ENABLE_CUDASIM=1 before numba is imported; "
                "set it in the environment or choose the backend before importing numba"
            )
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    from .kernels import simulator

    simulator.install()


class KernelOps:
    """The Numba launchers, each kernel module imported on first use of one of its ops."""

    def __getattr__(self, op: str) -> Any:
        if op not in OP_MODULES:
            raise AttributeError(f"no op named {op!r}")
        launcher = getattr(importlib.import_module(f"infinilm_nb.kernels.{OP_MODULES[op]}"), op)
        setattr(self, op, launcher)
        return launcher


def _reference_ops() -> SimpleNamespace:
    from .kernels import reference

    return SimpleNamespace(**{op: getattr(reference, op) for op in OP_MODULES})


_cache: dict[str, Backend] = {}


def resolve_name(name: str | None = None) -> str:
    """The concrete backend name for ``name`` / ``INFINILM_NB_BACKEND`` / auto."""
    name = (name or os.environ.get("INFINILM_NB_BACKEND") or "auto").lower()
    if name == "auto":
        return "cuda" if cuda_problem() is None else "cpu"
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


def get_backend(name: str | None = None) -> Backend:
    """Return the (cached) backend called ``name``; see the module docstring for the choice."""
    name = resolve_name(name)
    if name in _cache:
        return _cache[name]
    if name == "cuda":
        problem = cuda_problem()
        if problem is not None:
            raise RuntimeError(f"backend 'cuda' is unavailable: {problem}")
        import cupy

        backend = Backend("cuda", cupy, KernelOps())
    elif name == "sim":
        enable_simulator()
        backend = Backend("sim", np, KernelOps())
    else:
        backend = Backend("cpu", np, _reference_ops())
    _cache[name] = backend
    return backend
