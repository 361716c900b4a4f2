"""16-byte global loads for kernels: ``load_f16x8`` and ``load_f32x4``.

Numba never vectorises plain indexing, so a kernel that streams weights issues 2- or 4-byte loads
and leaves most of the memory bandwidth unused. These intrinsics emit one LLVM ``<4 x i32>`` load
with ``align 16`` (``LDG.E.128`` in SASS) and return its lanes as a tuple::

    w = load_f16x8(weight, row * K + k)   # UniTuple(float16, 8): weight.flat[row*K + k : row*K + k + 8]
    v = load_f32x4(x, i)                  # UniTuple(float32, 4)

Addressing is ``(array, flat element index)`` into a C-contiguous array of any rank.

Alignment precondition (the caller's job, nothing checks it on the device): the byte address of
element ``index`` must be a multiple of 16. That is, the array's data pointer is 16-byte aligned
(see :func:`aligned16`) and ``index`` is a multiple of 8 (float16) or 4 (float32). A misaligned
address faults the kernel ("misaligned address").

In numba's CUDA simulator inline LLVM does not run; there the same names are plain device functions
that index the flattened array.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from .common import SIMULATOR

# Elements in one 16-byte vector, by dtype: the K granularity a kernel needs to use these loads.
VECTOR_WIDTH = {np.dtype(np.float16): 8, np.dtype(np.float32): 4}


def aligned16(*arrays: Any) -> bool:
    """True when every array's data pointer (device or host) is a multiple of 16 bytes."""
    for array in arrays:
        interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
        if interface["data"][0] % 16:
            return False
    return True


if SIMULATOR:

    @cuda.jit(device=True)
    def load_f16x8(array, index):
        """``array.flat[index : index + 8]`` as a tuple (simulator fallback: plain indexing)."""
        flat = array.reshape(-1)
        return (
            flat[index],
            flat[index + 1],
            flat[index + 2],
            flat[index + 3],
            flat[index + 4],
            flat[index + 5],
            flat[index + 6],
            flat[index + 7],
        )

    @cuda.jit(device=True)
    def load_f32x4(array, index):
        """``array.flat[index : index + 4]`` as a tuple (simulator fallback: plain indexing)."""
        flat = array.reshape(-1)
        return (flat[index], flat[index + 1], flat[index + 2], flat[index + 3])

else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    _I16, _I32 = ir.IntType(16), ir.IntType(32)

    def _word_lanes(builder: Any, word: Any, element_type: Any) -> list:
        """The elements packed in one 32-bit word: one float32, or two float16 (low half first).

        float16 is an ``i16`` in numba's data model. The halves are cut with shifts, not by
        bitcasting the whole vector to ``<8 x i16>``: LLVM folds that bitcast into the load and NVVM
        12.9 then splits it into two 8-byte loads.
        """
        if element_type == _I16:
            return [builder.trunc(word, _I16), builder.trunc(builder.lshr(word, ir.Constant(_I32, 16)), _I16)]
        return [builder.bitcast(word, element_type)]

    def _vector_load(element: Any, count: int) -> Any:
        """An intrinsic ``(array, index) -> UniTuple(element, count)`` doing one aligned 16-byte load."""

        def load(typingctx, array, index):
            """Type ``load(C-contiguous array of element, integer)``; anything else does not match."""
            if not (
                isinstance(array, types.Array)
                and array.dtype == element
                and array.layout == "C"
                and isinstance(index, types.Integer)
            ):
                return None

            def codegen(context, builder, sig, args):
                array_type, index_type = sig.args
                array_value, index_value = args
                data = context.make_array(array_type)(context, builder, value=array_value).data
                offset = context.cast(builder, index_value, index_type, types.intp)
                words_ptr = builder.bitcast(builder.gep(data, [offset]), ir.VectorType(_I32, 4).as_pointer())
                words = builder.load(words_ptr, align=16)
                element_type = context.get_value_type(element)
                values = []
                for w in range(4):
                    values += _word_lanes(builder, builder.extract_element(words, ir.Constant(_I32, w)), element_type)
                return cgutils.pack_array(builder, values)

            return types.UniTuple(element, count)(array, index), codegen

        load.__name__ = f"load_{element}x{count}"
        return intrinsic(load)

    load_f16x8 = _vector_load(types.float16, 8)
    load_f32x4 = _vector_load(types.float32, 4)
