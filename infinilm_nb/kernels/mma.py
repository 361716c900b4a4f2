"""Tensor-core intrinsics for the float16 decode GEMM: raw 16-byte loads and ``mma.sync`` m16n8k16.

Numba has no tensor-core API; these emit the PTX through ``llvmlite`` inline assembly::

    w = load_words_stream(weight, i)   # UniTuple(uint32, 4): weight.flat[i : i + 8] as 4 f16x2 words,
                                       # ld.global.nc.L1::no_allocate.L2::256B: read once, so L1 stays
                                       # for x; L2 fetches whole 256-byte runs of the row
    v = load_words(x, i)               # the same through L1 (x is re-read by every warp)
    d = mma_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)   # UniTuple(float32, 4)
    mma_accumulate(acc, i, a0, a1, a2, a3, b0, b1)          # the same into acc[i : i + 4] in place

``mma_16816`` is ``mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32`` (``HMMA.16816.F32`` in SASS):
``D[16 x 8] = A[16 x 16] @ B[16 x 8] + C`` over one warp, float32 accumulation. With ``g = lane // 4``
and ``t = lane % 4``, the words a lane holds (each two float16, the lower index in the low half) are

* ``a0``: A[g, 2t:2t+2]   ``a1``: A[g+8, 2t:2t+2]   ``a2``: A[g, 2t+8:2t+10]   ``a3``: A[g+8, 2t+8:2t+10]
* ``b0``: B[2t:2t+2, g]   ``b1``: B[2t+8:2t+10, g]
* ``c0, c1``: C[g, 2t], C[g, 2t+1]   ``c2, c3``: C[g+8, 2t], C[g+8, 2t+1]   (D likewise)

Loads take ``(array, flat element index)`` into a C-contiguous float16 array; the byte address must be
a multiple of 16 (see :func:`.intrinsics.aligned16`), nothing checks it on the device.

In numba's CUDA simulator inline assembly does not run: there the loads view the array's bytes as
words, and ``mma_16816`` gathers the fragments of its warp through the simulator's shuffles (so the
whole block must reach every call, as for shuffles) and computes the product in NumPy.
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from .common import SIMULATOR
from .vector import inline_device

FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    import numpy as np

    from .intrinsics import unpack_f16x2

    @cuda.jit(device=True)
    def load_words(array, index):
        """16 bytes from ``array.flat[index]`` as four uint32 words (simulator: a view of the bytes)."""
        flat = array.reshape(-1)
        words = flat[index : index + 16 // flat.itemsize].view(np.uint32)
        return (words[0], words[1], words[2], words[3])

    load_words_stream = load_words

    @cuda.jit(device=True)
    def mma_16816(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """``D = A @ B + C`` for one m16n8k16 tile of the warp (simulator fallback, layout above)."""
        lane = cuda.threadIdx.x % 32
        g, t = lane // 4, lane % 4
        a_row = np.zeros((2, 16), np.float32)  # A rows g and g + 8
        b_col = np.zeros((16, 2), np.float32)  # B columns 2t and 2t + 1
        for j in range(4):
            words = cuda.shfl_sync(FULL_MASK, (a0, a1, a2, a3), 4 * g + j)
            a_row[0, 2 * j : 2 * j + 2] = unpack_f16x2(words[0])
            a_row[1, 2 * j : 2 * j + 2] = unpack_f16x2(words[1])
            a_row[0, 2 * j + 8 : 2 * j + 10] = unpack_f16x2(words[2])
            a_row[1, 2 * j + 8 : 2 * j + 10] = unpack_f16x2(words[3])
        for col in range(2):
            for j in range(4):
                words = cuda.shfl_sync(FULL_MASK, (b0, b1), 4 * (2 * t + col) + j)
                b_col[2 * j : 2 * j + 2, col] = unpack_f16x2(words[0])
                b_col[2 * j + 8 : 2 * j + 10, col] = unpack_f16x2(words[1])
        d = a_row @ b_col
        return (
            np.float32(c0 + d[0, 0]),
            np.float32(c1 + d[0, 1]),
            np.float32(c2 + d[1, 0]),
            np.float32(c3 + d[1, 1]),
        )

else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    _I32, _F32 = ir.IntType(32), ir.FloatType()
    _WORDS = ir.LiteralStructType([_I32] * 4)

    def _address(context: Any, builder: Any, array_type: Any, index_type: Any, array: Any, index: Any) -> Any:
        """The generic address of ``array.flat[index]``."""
        data = context.make_array(array_type)(context, builder, value=array).data
        offset = context.cast(builder, index, index_type, types.intp)
        return builder.gep(data, [offset])

    def _typed(array: Any, index: Any) -> bool:
        return (
            isinstance(array, types.Array)
            and array.dtype == types.float16
            and array.layout == "C"
            and isinstance(index, types.Integer)
        )

    @intrinsic
    def load_words(typingctx, array, index):
        """Type ``load_words(C-contiguous float16 array, integer) -> UniTuple(uint32, 4)``: one
        ``align 16`` ``<4 x i32>`` load (``ld.global.v4.u32``, cached in L1)."""
        if not _typed(array, index):
            return None

        def codegen(context, builder, sig, args):
            pointer = _address(context, builder, *sig.args, *args)
            vector = builder.load(builder.bitcast(pointer, ir.VectorType(_I32, 4).as_pointer()), align=16)
            words = [builder.extract_element(vector, ir.Constant(_I32, w)) for w in range(4)]
            return cgutils.pack_array(builder, words)

        return types.UniTuple(types.uint32, 4)(array, index), codegen

    @intrinsic
    def load_words_stream(typingctx, array, index):
        """Type ``load_words_stream(C-contiguous float16 array, integer) -> UniTuple(uint32, 4)``:
        ``ld.global.nc.L1::no_allocate.L2::256B.v4.u32``. The prefetch hint matters: a warp's load
        touches 64 bytes of each of 8 rows, and fetching 256-byte runs (which the next steps read)
        measured 1.1-1.4x faster on an H200."""
        if not _typed(array, index):
            return None

        def codegen(context, builder, sig, args):
            pointer = _address(context, builder, *sig.args, *args)
            asm = ir.InlineAsm(
                ir.FunctionType(_WORDS, [pointer.type]),
                "ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {$0, $1, $2, $3}, [$4];",
                "=r,=r,=r,=r,l",
            )
            result = builder.call(asm, [pointer])
            return cgutils.pack_array(builder, [builder.extract_value(result, w) for w in range(4)])

        return types.UniTuple(types.uint32, 4)(array, index), codegen

    @intrinsic
    def mma_16816(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        """Type ``mma_16816(6 x uint32, 4 x float32) -> UniTuple(float32, 4)`` (layout: module doc)."""
        words, accumulators = (a0, a1, a2, a3, b0, b1), (c0, c1, c2, c3)
        if not all(isinstance(w, types.Integer) and w.bitwidth == 32 for w in words):
            return None
        if not all(c == types.float32 for c in accumulators):
            return None

        def codegen(context, builder, sig, args):
            operands = [context.cast(builder, v, t, types.uint32) for v, t in zip(args[:6], sig.args[:6])]
            asm = ir.InlineAsm(
                ir.FunctionType(ir.LiteralStructType([_F32] * 4), [_I32] * 6 + [_F32] * 4),
                "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f",
            )
            result = builder.call(asm, operands + list(args[6:]))
            return cgutils.pack_array(builder, [builder.extract_value(result, i) for i in range(4)])

        return types.UniTuple(types.float32, 4)(*words, *accumulators), codegen


@inline_device
def mma_accumulate(acc, i, a0, a1, a2, a3, b0, b1):
    """``acc[i : i + 4] += A @ B`` for one m16n8k16 tile: :func:`mma_16816` with accumulators
    ``acc[i], .., acc[i + 3]`` (a local array), written back in place."""
    d = mma_16816(a0, a1, a2, a3, b0, b1, acc[i], acc[i + 1], acc[i + 2], acc[i + 3])
    for q in range(4):
        acc[i + q] = d[q]
