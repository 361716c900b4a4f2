"""A safetensors writer that holds one tensor in memory at a time.

``safetensors.numpy.save_file`` needs every tensor at once, which for a converted 8B model is
16 GB of RAM. The format is simple enough to stream: an 8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte range, then the raw bytes in that order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

_DTYPE_NAMES = {np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: its name, final shape and dtype, and a function producing its values."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def write_safetensors(path: str | os.PathLike, specs: Sequence[TensorSpec], progress: bool = True) -> None:
    """Write ``specs`` to ``path`` in order, calling each ``load`` only when its bytes are due.

    The file appears under its name only once complete. Raises ValueError when a ``load`` returns
    another shape or dtype than its spec announced, or when a dtype has no safetensors name.
    """
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        if np.dtype(spec.dtype) not in _DTYPE_NAMES:
            raise ValueError(f"{spec.name}: dtype {np.dtype(spec.dtype)} cannot be written (F16, F32)")
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[np.dtype(spec.dtype)],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned

    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for spec in tqdm(specs, desc=f"writing {path.name}", unit="tensor", disable=not progress):
            array = spec.load()
            if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"{spec.name}: expected shape {spec.shape} {np.dtype(spec.dtype)}, "
                    f"got {array.shape} {array.dtype}"
                )
            f.write(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).data)
    os.replace(partial, path)
