"""Helpers shared by the tests: random inputs, poisoned outputs, error measures, sizes."""

from __future__ import annotations

import numpy as np

from tests.conftest import ON_GPU

# Relative error bounds (../shared/DESIGN.md): float32 < 1e-5, float16 operands with float32 accumulation < 2e-3.
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3}


def tolerance(dtype) -> float:
    return TOLERANCE[np.dtype(dtype)]


def random(rng: np.random.Generator, shape, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    """Standard-normal values (never zeros) times ``scale``, in ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def poisoned(kb, shape, dtype):
    """A device array of NaN (or -7777 for integers), so that any element a kernel skips shows."""
    fill = np.nan if np.dtype(dtype).kind == "f" else -7777
    return kb.asarray(np.full(shape, fill, dtype=dtype))


def rel_err(got, want) -> float:
    """``||got - want|| / ||want||`` in float64; NaN anywhere gives inf."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def pick(sim, gpu):
    """``gpu`` on a GPU machine, else ``sim`` (the simulator needs tiny shapes)."""
    return gpu if ON_GPU else sim
