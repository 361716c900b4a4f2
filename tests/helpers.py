"""Helpers shared by the tests: random inputs, poisoned outputs, error measures, sizes."""

from __future__ import annotations

import numpy as np

from infinilm_nb.kernels import reference
from tests.conftest import ON_GPU

# Relative error bounds (../shared/DESIGN.md): float32 < 1e-5, float16 operands with float32 accumulation < 2e-3.
# bfloat16 (uint16 bit patterns, kernels.reference.BF16) keeps 8 mantissa bits to float16's 11
BF16 = np.dtype(np.uint16)
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float16): 2e-3, BF16: 1.6e-2}


def tolerance(dtype) -> float:
    return TOLERANCE[np.dtype(dtype)]


def random(rng: np.random.Generator, shape, dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    """Standard-normal values (never zeros) times ``scale``, in ``dtype`` (bfloat16: its bits)."""
    values = rng.standard_normal(shape) * scale
    return reference.cast(values.astype(np.float32), BF16) if np.dtype(dtype) == BF16 else values.astype(dtype)


def nans(shape, dtype) -> np.ndarray:
    """A host array of NaN (bfloat16: its NaN bit pattern; integers: -7777)."""
    if np.dtype(dtype) == BF16:
        return np.full(shape, 0x7FC0, dtype=np.uint16)
    return np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7777, dtype=dtype)


def poisoned(kb, shape, dtype):
    """A device array of :func:`nans`, so that any element a kernel skips shows."""
    return kb.asarray(nans(shape, dtype))


def as_float(array) -> np.ndarray:
    """A host array's values in float64; bfloat16 (uint16) bit patterns widened."""
    array = np.asarray(array)
    return (reference.to_f32(array) if array.dtype == BF16 else array).astype(np.float64)


def rel_err(got, want) -> float:
    """``||got - want|| / ||want||`` in float64 (bfloat16 bits read as values); NaN anywhere gives inf."""
    got = as_float(got)
    want = as_float(want)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def pick(sim, gpu):
    """``gpu`` on a GPU machine, else ``sim`` (the simulator needs tiny shapes)."""
    return gpu if ON_GPU else sim
