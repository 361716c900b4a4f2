"""Width-generic element access for the bandwidth-bound kernels (norm, rope, SiLU-mul, store_kv, embedding).

A kernel is written once against ``load(array, index)`` / ``store(array, index, values)`` moving
``vec`` consecutive elements as a tuple, and built twice: ``vec`` = 8 (float16) or 4 (float32) uses
the 16-byte intrinsics of :mod:`.intrinsics`; ``vec`` = 1 uses plain indexing, for rows whose length
or pointer is not 16-byte aligned. :func:`vector_width` picks between them on the host. A bfloat16
build (uint16 bit patterns) loads float32 values and rounds what it stores, so the kernel's
arithmetic is the same; :func:`.intrinsics.as_f32` / :func:`to_stored` do it for single elements.

Kernels see flat 1-D arrays (:func:`flat_view`): a strided view (q and k inside a fused QKV buffer)
is addressed as ``first element + token * stride0 + head * stride1 + d``, with element strides passed
as arguments, so the same load serves contiguous arrays and views.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from numba import cuda

from .common import BFLOAT16, SIMULATOR
from .intrinsics import (
    VECTOR_WIDTH, aligned16, bf16_to_f32, f32_to_bf16, load_bf16x8, load_f16x8, load_f16x8_f32, load_f32x4,
    store_bf16x8, store_f16x8, store_f32x4,
)


def inline_device(pyfunc: Callable) -> Any:
    """``cuda.jit(device=True)``, forced inline by NVVM on the GPU, so that the local arrays a
    kernel passes to it stay in registers (the simulator's jit takes no ``forceinline``)."""
    return cuda.jit(device=True, **({} if SIMULATOR else {"forceinline": True}))(pyfunc)


@inline_device
def _load1(array, index):
    """``(array[index],)``: the plain-load counterpart of the 16-byte loads."""
    return (array[index],)


@inline_device
def _store1(array, index, values):
    """``array[index] = values[0]``: the plain-store counterpart of the 16-byte stores."""
    array[index] = values[0]


@inline_device
def _load1_bf16(array, index):
    """``(array[index],)`` of bfloat16 bits, widened to float32."""
    return (bf16_to_f32(array[index]),)


@inline_device
def _store1_bf16(array, index, values):
    """``array[index] = values[0]`` rounded to bfloat16 bits."""
    array[index] = f32_to_bf16(values[0])


@inline_device
def _as_stored(value):
    """A float32 for a float16 or float32 array: the store converts it."""
    return value


@inline_device
def _pack1(buffer, offset):
    return (buffer[offset],)


@inline_device
def _pack4(buffer, offset):
    return (buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3])


@inline_device
def _pack8(buffer, offset):
    return (
        buffer[offset],
        buffer[offset + 1],
        buffer[offset + 2],
        buffer[offset + 3],
        buffer[offset + 4],
        buffer[offset + 5],
        buffer[offset + 6],
        buffer[offset + 7],
    )


MAX_GRID_Y = 65535


def row_grid(rows: int, columns: int, threads: int) -> tuple[tuple[int, int], int]:
    """(grid, block) for a kernel with one thread per column of a row, rows on the grid's y axis
    (which holds 65535: kernels loop ``row += gridDim.y``), so that no thread divides its index."""
    threads = min(threads, max(32, -(-columns // 32) * 32))
    return (-(-columns // threads), min(rows, MAX_GRID_Y)), threads


_LOADS = {1: _load1, 4: load_f32x4, 8: load_f16x8}
_STORES = {1: _store1, 4: store_f32x4, 8: store_f16x8}
_BF16_LOADS = {1: _load1_bf16, 8: load_bf16x8}
_BF16_STORES = {1: _store1_bf16, 8: store_bf16x8}
_PACKS = {1: _pack1, 4: _pack4, 8: _pack8}


def loader(vec: int, bf16: bool = False) -> Callable:
    """The device function ``(array, index) -> tuple`` of ``vec`` elements (8: float16, 4: float32;
    ``bf16``: bfloat16 bits, 8 or 1, widened to float32)."""
    return _BF16_LOADS[vec] if bf16 else _LOADS[vec]


def widening_loader(vec: int, bf16: bool = False) -> Callable:
    """:func:`loader`, but the 16-byte float16 load gives float32 values (see
    :func:`.intrinsics.load_f16x8_f32`): for kernels that hold many loaded values in registers."""
    return load_f16x8_f32 if vec == 8 and not bf16 else loader(vec, bf16)


def to_stored(bf16: bool = False) -> Callable:
    """The device function ``(float32) -> value to assign`` to one element of an array (``bf16``:
    rounded bits; else the value itself, which the assignment converts)."""
    return f32_to_bf16 if bf16 else _as_stored


def is_bf16(dtype: Any) -> bool:
    """Whether ``dtype`` is bfloat16 (its uint16 bit patterns)."""
    return np.dtype(dtype) == BFLOAT16


def storer(vec: int, bf16: bool = False) -> Callable:
    """The device function ``(array, index, tuple)`` storing ``vec`` elements (``bf16``: float
    values rounded to bfloat16 bits)."""
    return _BF16_STORES[vec] if bf16 else _STORES[vec]


def packer(vec: int) -> Callable:
    """The device function ``(local array, offset) -> tuple`` of ``vec`` values, to feed a store."""
    return _PACKS[vec]


def vector_width(dtype: Any, arrays: tuple = (), multiples: tuple = ()) -> int:
    """16-byte width of ``dtype`` (8 or 4) if every array is 16-byte aligned and every number in
    ``multiples`` (row lengths, element strides, offsets) is a multiple of it; else 1."""
    vec = VECTOR_WIDTH[np.dtype(dtype)]
    if all(int(m) % vec == 0 for m in multiples) and aligned16(*arrays):
        return vec
    return 1


def element_strides(array: Any) -> tuple[int, ...]:
    """``array.strides`` in elements."""
    itemsize = np.dtype(array.dtype).itemsize
    return tuple(int(s) // itemsize for s in array.strides)


def flat_view(op: str, name: str, array: Any) -> Any:
    """A 1-D unit-stride view of the memory from ``array``'s first element to its last (no copy).

    Raises ``ValueError`` for negative strides, which would address memory before the first element.
    """
    strides = element_strides(array)
    if any(s < 0 for s in strides):
        raise ValueError(f"{op}: {name} must have non-negative strides, got {tuple(array.strides)}")
    span = 1 + sum((n - 1) * s for n, s in zip(array.shape, strides)) if array.size else 0
    if isinstance(array, np.ndarray):
        return np.lib.stride_tricks.as_strided(array, shape=(span,), strides=(array.itemsize,))
    import cupy

    array = cupy.asarray(array)  # no copy: CuPy arrays pass through, others by their CUDA interface
    return cupy.ndarray((span,), array.dtype, memptr=array.data)
