"""RoPE scaling of a GGUF file, as the ``rope_scaling`` entry of an HF ``config.json``.

GGUF states linear and YaRN scaling as metadata. Llama-3 scaling is not stated: llama.cpp's converter
stores its result instead, a ``rope_freqs.weight`` tensor of per-frequency divisors. Llama-3 scaling
leaves short wavelengths alone, divides long ones by ``factor`` and blends linearly in
``original_context / wavelength`` between; the blend line fixes the frequencies, so the parameters are
read back from it and checked by recomputing every divisor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

# Llama 3.x's pretraining context; only the scale of the recovered low/high factors depends on it.
_LLAMA3_ORIGINAL_CONTEXT = 8192


def llama3_rope_divisors(
    theta: float, head_dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
    original_context: int,
) -> np.ndarray:
    """The ``head_dim // 2`` divisors Llama-3 rope scaling applies to the inverse frequencies."""
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = np.clip(smooth, 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def _shortest(value: float, digits: int = 6) -> float:
    return float(f"{value:.{digits}g}")


def _llama3_from_divisors(divisors: np.ndarray, theta: float, head_dim: int, original_context: int) -> dict | None:
    divisors = divisors.astype(np.float64)
    factor = float(divisors.max())
    if factor == 1.0:
        return None
    # smooth = 0 for divided frequencies, 1 for untouched ones; the blend is linear in x between
    smooth = (1.0 / divisors - 1.0 / factor) / (1.0 - 1.0 / factor)
    wavelength = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    x = original_context / wavelength
    blended = (smooth > 1e-4) & (smooth < 1.0 - 1e-4)
    if divisors.shape != (head_dim // 2,) or blended.sum() < 2:
        raise ValueError(
            f"rope_freqs.weight (shape {divisors.shape}) does not describe Llama-3 rope scaling: "
            f"expected {head_dim // 2} divisors with at least two blended frequencies"
        )
    slope, intercept = np.polyfit(x[blended], smooth[blended], 1)
    low = _shortest(-intercept / slope)
    params = {
        "rope_type": "llama3",
        "factor": _shortest(factor),
        "low_freq_factor": low,
        "high_freq_factor": _shortest(low + 1.0 / slope),
        "original_max_position_embeddings": original_context,
    }
    want = llama3_rope_divisors(
        theta, head_dim, params["factor"], params["low_freq_factor"], params["high_freq_factor"], original_context
    )
    if not np.allclose(want, divisors, rtol=1e-4, atol=0):
        raise ValueError("rope_freqs.weight does not follow Llama-3 rope scaling (divisors differ when recomputed)")
    return params


def rope_scaling(
    get: Callable[[str], Any], arch: str, theta: float, head_dim: int, rope_freqs: np.ndarray | None
) -> dict | None:
    """HF ``rope_scaling`` for a GGUF file, or None when it has none.

    ``get(key)`` returns a metadata value or None; ``rope_freqs`` is the dequantized
    ``rope_freqs.weight`` tensor when the file has one. An unknown scaling type is a ValueError.
    """
    kind = get(f"{arch}.rope.scaling.type")
    original = get(f"{arch}.rope.scaling.original_context_length")
    if rope_freqs is not None:
        return _llama3_from_divisors(rope_freqs, theta, head_dim, int(original or _LLAMA3_ORIGINAL_CONTEXT))
    if kind in (None, "none"):
        return None
    factor = _shortest(float(get(f"{arch}.rope.scaling.factor") or 1.0))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        params = {"rope_type": "yarn", "factor": factor}
        if original:
            params["original_max_position_embeddings"] = int(original)
        for name in ("beta_fast", "beta_slow"):
            value = get(f"{arch}.rope.scaling.yarn_{name}")
            if value is not None:
                params[name] = _shortest(float(value))
        return params
    raise ValueError(f"unsupported rope scaling type {kind!r} (supported: none, linear, yarn, Llama-3 rope_freqs)")
