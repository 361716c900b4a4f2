"""Helpers for the tests of the 16-byte paths: which vector width a launcher picked, and inputs
placed on or off a 16-byte boundary."""

from __future__ import annotations

from typing import Any

import numpy as np

from infinilm_nb.kernels.intrinsics import aligned16


def record_widths(monkeypatch: Any, module: Any) -> list[int]:
    """Spy on ``module.vector_width``: the widths its launchers choose, in call order."""
    widths: list[int] = []
    choose = module.vector_width

    def spy(*args: Any, **kwargs: Any) -> int:
        widths.append(choose(*args, **kwargs))
        return widths[-1]

    monkeypatch.setattr(module, "vector_width", spy)
    return widths


def placed(kb: Any, host: np.ndarray, aligned: bool) -> Any:
    """A device copy of ``host`` (C-contiguous) whose data pointer is 16-byte aligned, or one element past."""
    buffer = kb.asarray(np.zeros(host.size + 16, host.dtype))
    start = next(o for o in range(16) if aligned16(buffer[o:])) + (0 if aligned else 1)
    view = buffer[start : start + host.size].reshape(host.shape)
    view[...] = kb.asarray(host)
    return view
