"""Hopper's warpgroup MMA (``wgmma.mma_async``) through inline PTX: the tensor-core instruction of
cuBLAS's sm_90 GEMMs, which reads both operands from shared memory, for 4 warps at once.

The prefill GEMM's ``mma.sync`` (:mod:`.gemm_tc`) stops near 300-345 TFLOP/s on an H200, about half
of cuBLAS; ``wgmma`` is the next step (issue 8: :class:`.gemm_tc.TcConfig` ``wgmma``). It exists
on ``sm_90a`` only (not on later GPUs). numba-cuda compiles kernels for ``sm_90a`` on a Hopper
(``codegen._ensure_cc`` adds the ``a``); ``cuda.compile_ptx`` needs ``cc=(9, 0, "a")`` for it. The
building blocks::

    supported()                    # whether this process's GPU has it (a Hopper)
    desc = matrix_descriptor(address, leading_bytes, stride_bytes, swizzle)   # uint64
    desc = swizzled_k_step(tile, kk, panel_bytes)   # step kk of a 128-byte-swizzled K-major tile
    fence_proxy_async()            # this thread's shared-memory stores visible to wgmma
    hold_registers(acc, 32)        # no access to acc[0:32] moves across this point
    wgmma_fence()                  # before the first wgmma, and after touching the accumulators
    wgmma_m64n64k16(acc, 0, desc_a, desc_b, accumulate)   # acc[0:32] (+)= A[64 x 16] @ B[64 x 16]^T
                                   # (m64n128k16, m64n256k16: B of 128 / 256 rows, acc[0:64] / [0:128])
    wgmma_m64n128k16_rs(acc, 0, a0, a1, a2, a3, desc_b, accumulate)   # acc[0:64] (+)= A @ B, A from
                                   # registers, B [16 x 128] MN-major (:func:`mn_major_k_step`); also n64
    wgmma_commit()                 # the wgmma issued since the last commit form one group
    wgmma_wait(0)                  # at most 0 groups pending
    hold_registers(acc, 32)        # then acc[0:32] may be read

Operands are K-major in shared memory (A ``[m][k]``, B ``[n][k]``: a weight as it is stored).
Without swizzling a tile is made of *core matrices* of 8 rows x 16 bytes stored as 128 contiguous
bytes; ``leading_bytes`` is the distance between core matrices next to each other along K and
``stride_bytes`` along M (or N). With the 128-byte swizzle (``SWIZZLE_128B``) a tile's rows are 64
float16 (128 bytes) each, 16-byte chunk ``c`` of row ``r`` stored at chunk ``c ^ (r % 8)``, the tile
1024-byte aligned; ``stride_bytes`` is 1024 (eight rows), and the k-th 16-column step starts
``32 k`` bytes in. A tile wider than 64 columns is stored as panels of 64 columns, each such a tile
(:func:`swizzled_k_step`).

The ``_rs`` forms take A from registers instead: each warp's 16 rows as an ``mma.m16n8k16`` A
fragment (so an accumulator block of a previous product, packed to float16, is one), and B
MN-major (``[k][n]``: a V tile as the KV cache stores it). With the 128-byte swizzle such a B is
stored in panels of 64 columns (rows of 128 bytes along N, chunk ``c`` of row ``k`` at ``c ^ (k % 8)``):
``stride_bytes`` is then the distance between groups of 8 rows along K (1024) and ``leading_bytes``
between panels along N (:func:`mn_major_k_step`).

The accumulators: lane ``l`` of warp ``w`` holds ``acc[first + 4 j + i]`` = D[16 w + l // 4 + 8 (i // 2),
8 j + 2 (l % 4) + i % 2] for the N / 8 column blocks ``j`` (an mma.m16n8 fragment per block). The
compiler sees a wgmma's results as ready when it is issued; ``hold_registers`` after the wait
(and before the fence) keeps it from moving reads (and writes) of them across.

GPU only (the simulator runs no inline PTX): there every wgmma function raises, and
:func:`matrix_descriptor` alone runs.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import numpy as np
from numba import cuda, uint64

from .common import SIMULATOR, TENSOR_CORES

SWIZZLE_NONE = 0
SWIZZLE_128B = 1
SWIZZLE_64B = 2
SWIZZLE_32B = 3
SWIZZLE_ROW = 128  # bytes of a 128-byte-swizzled row: 64 float16
ACCUMULATORS = 32  # float32 registers a thread holds of an m64n64 tile
_FIELD = np.uint64(0x3FFFF)  # the 18 address bits a descriptor field encodes, in 16-byte units
_FOUR = np.uint64(4)
_LEADING = np.uint64(16)
_STRIDE = np.uint64(32)
_SWIZZLE = np.uint64(62)


@cuda.jit(device=True)
def matrix_descriptor(address, leading_bytes, stride_bytes, swizzle):
    """The 64-bit shared-memory matrix descriptor of a wgmma operand: the tile's shared ``address``
    (bits 0-13), ``leading_bytes`` (16-29) and ``stride_bytes`` (32-45), each in 16-byte units, and
    the swizzle mode (bits 62-63); base offset 0."""
    start = (uint64(address) & _FIELD) >> _FOUR
    leading = (uint64(leading_bytes) & _FIELD) >> _FOUR
    stride = (uint64(stride_bytes) & _FIELD) >> _FOUR
    return start | (leading << _LEADING) | (stride << _STRIDE) | (uint64(swizzle) << _SWIZZLE)


@cuda.jit(device=True)
def swizzled_k_step(tile, kk, panel_bytes):
    """The descriptor of 16-column step ``kk`` of a K-major float16 tile at shared address ``tile``
    stored with the 128-byte swizzle in panels of 64 columns, ``panel_bytes`` apart (a tile of one
    panel: any), each 1024-byte aligned."""
    start = tile + (kk // 4) * panel_bytes + 32 * (kk % 4)
    return matrix_descriptor(start, 16, 8 * SWIZZLE_ROW, SWIZZLE_128B)


@cuda.jit(device=True)
def mn_major_k_step(tile, kk, panel_bytes):
    """The descriptor of 16-row step ``kk`` of an MN-major float16 B (``[k][n]``) at shared address
    ``tile``, stored with the 128-byte swizzle in panels of 64 columns ``panel_bytes`` apart, each
    1024-byte aligned (for the ``_rs`` wgmma)."""
    return matrix_descriptor(tile + kk * 16 * SWIZZLE_ROW, panel_bytes, 8 * SWIZZLE_ROW, SWIZZLE_128B)


@lru_cache(maxsize=None)
def supported() -> bool:
    """Whether this process's GPU has wgmma: a Hopper (compute capability 9.0; never the simulator)."""
    return not SIMULATOR and cuda.get_current_device().compute_capability == (9, 0)


# The switch: on a Hopper the prefill GEMM and attention run on wgmma unless INFINILM_NB_WGMMA=0
# (or INFINILM_NB_TENSOR_CORES=0), which keeps them on mma.sync.
ENABLED = TENSOR_CORES and os.environ.get("INFINILM_NB_WGMMA", "1") != "0"


def enabled() -> bool:
    """Whether the prefill kernels take wgmma: the switch :data:`ENABLED` is on and :func:`supported`."""
    return ENABLED and supported()


if SIMULATOR:

    def _gpu_only(*args: Any) -> Any:
        raise NotImplementedError("wgmma runs only on a Hopper GPU")

    fence_proxy_async = wgmma_fence = wgmma_commit = wgmma_wait = hold_registers = _gpu_only
    wgmma_m64n64k16 = wgmma_m64n128k16 = wgmma_m64n256k16 = _gpu_only
    wgmma_m64n64k16_rs = wgmma_m64n128k16_rs = _gpu_only

else:
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    from .intrinsics import _asm, _statement, _wait_group

    _I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()

    fence_proxy_async = _statement(
        "fence_proxy_async", "fence.proxy.async.shared::cta;",
        "``fence.proxy.async.shared::cta``: this thread's shared-memory writes visible to wgmma.",
    )
    wgmma_fence = _statement(
        "wgmma_fence", "wgmma.fence.sync.aligned;",
        "``wgmma.fence.sync.aligned``: before the first wgmma, and after touching its registers.",
    )
    wgmma_commit = _statement(
        "wgmma_commit", "wgmma.commit_group.sync.aligned;",
        "``wgmma.commit_group.sync.aligned``: the wgmma issued since the last commit form one group.",
    )

    def _accumulators(array: Any) -> bool:
        return isinstance(array, types.Array) and array.dtype == types.float32 and array.layout == "C"

    def _words(array: Any) -> bool:
        return isinstance(array, types.Array) and array.dtype == types.uint32 and array.layout == "C"

    def _through_registers(context: Any, builder: Any, array_type: Any, array: Any, first: Any, first_type: Any,
                           count: int, text: str, inputs: list, input_constraints: str) -> None:
        """Run ``text`` with ``array[first : first + count]`` (float32 or uint32) as its tied in/out
        operands ``$0..$(count - 1)`` (inputs after), and store what it leaves back into the array."""
        element, letter = (_F32, "f") if array_type.dtype == types.float32 else (_I32, "r")
        data = context.make_array(array_type)(context, builder, value=array).data
        start = context.cast(builder, first, first_type, types.intp)
        pointers = [builder.gep(data, [builder.add(start, ir.Constant(_I64, i))]) for i in range(count)]
        values = [builder.load(p) for p in pointers]
        constraints = ",".join([f"={letter}"] * count) + ("," + input_constraints if input_constraints else "")
        constraints += "," + ",".join(str(i) for i in range(count))
        asm = _asm(ir.LiteralStructType([element] * count), [value.type for value in inputs] + [element] * count,
                   text, constraints)
        result = builder.call(asm, inputs + values)
        for i, pointer in enumerate(pointers):
            builder.store(builder.extract_value(result, i), pointer)

    def _mma_text(width: int, a_operand: str, flag: int, transpose_b: bool) -> str:
        """The PTX of one ``wgmma.mma_async`` m64n<width>k16 on the accumulators ``$0..``, A given by
        ``a_operand`` (a descriptor, or four registers), B by the descriptor just after it, scaling
        the accumulators by operand ``$flag != 0``."""
        registers = ", ".join(f"${i}" for i in range(width // 2))
        immediates = "1, 1, 1" if transpose_b else "1, 1, 0, 0"  # scale A, scale B, (transpose A,) transpose B
        return (
            f"{{ .reg .pred p; setp.ne.b32 p, ${flag}, 0; wgmma.mma_async.sync.aligned.m64n{width}k16.f32.f16.f16 "
            f"{{{registers}}}, {a_operand}, ${flag - 1}, p, {immediates}; }}"
        )

    def _typed(acc: Any, first: Any, operands: tuple) -> bool:
        return _accumulators(acc) and all(isinstance(t, types.Integer) for t in (first, *operands))

    def _issuing(count: int, text: str, casts: list, constraints: str) -> Any:
        """The codegen of a wgmma intrinsic ``(acc, first, *operands)``: ``text`` on
        ``acc[first : first + count]``, the operands cast to ``casts``."""

        def codegen(context, builder, sig, args):
            inputs = [context.cast(builder, value, given, wanted)
                      for value, given, wanted in zip(args[2:], sig.args[2:], casts)]
            _through_registers(context, builder, sig.args[0], args[0], args[1], sig.args[1], count, text, inputs,
                               constraints)
            return context.get_dummy_value()

        return codegen

    def _wgmma(width: int) -> Any:
        """The intrinsic ``wgmma_m64n<width>k16`` (see :func:`wgmma_m64n64k16`)."""
        count = width // 2  # accumulators a thread holds
        text = _mma_text(width, f"${count}", count + 2, False)
        codegen = _issuing(count, text, [types.uint64, types.uint64, types.int32], "l,l,r")

        def wgmma(typingctx, acc, first, desc_a, desc_b, accumulate):
            if not _typed(acc, first, (desc_a, desc_b, accumulate)):
                return None
            return types.void(acc, first, desc_a, desc_b, accumulate), codegen

        wgmma.__name__ = wgmma.__qualname__ = f"wgmma_m64n{width}k16"
        wgmma.__doc__ = (
            f"Type ``wgmma_m64n{width}k16(float32 local array, integer, uint64, uint64, integer)``: "
            f"``acc[first : first + {count}] = A @ B^T (+ those values when accumulate != 0)`` for the "
            f"warpgroup, A ``[64 x 16]`` and B ``[{width} x 16]`` float16 in shared memory (descriptors), "
            "float32 accumulation; asynchronous until :func:`wgmma_wait`. Every thread of the 4 warps "
            "must call it."
        )
        return intrinsic(wgmma)

    wgmma_m64n64k16 = _wgmma(64)
    wgmma_m64n128k16 = _wgmma(128)
    wgmma_m64n256k16 = _wgmma(256)

    def _wgmma_rs(width: int) -> Any:
        """The intrinsic ``wgmma_m64n<width>k16_rs`` (see :func:`wgmma_m64n128k16_rs`)."""
        count = width // 2
        text = _mma_text(width, "{" + ", ".join(f"${count + i}" for i in range(4)) + "}", count + 5, True)
        codegen = _issuing(count, text, [types.uint32] * 4 + [types.uint64, types.int32], "r,r,r,r,l,r")

        def wgmma_rs(typingctx, acc, first, a0, a1, a2, a3, desc_b, accumulate):
            if not _typed(acc, first, (a0, a1, a2, a3, desc_b, accumulate)):
                return None
            return types.void(acc, first, a0, a1, a2, a3, desc_b, accumulate), codegen

        wgmma_rs.__name__ = wgmma_rs.__qualname__ = f"wgmma_m64n{width}k16_rs"
        wgmma_rs.__doc__ = (
            f"Type ``wgmma_m64n{width}k16_rs(float32 local array, integer, 4 x uint32, uint64, integer)``: "
            f"``acc[first : first + {count}] = A @ B (+ those values when accumulate != 0)`` for the warpgroup, "
            "A ``[64 x 16]`` float16 from registers (each warp's 16 rows as an mma.m16n8k16 A fragment), "
            f"B ``[16 x {width}]`` MN-major in shared memory (descriptor); asynchronous until "
            ":func:`wgmma_wait`. Every thread of the 4 warps must call it."
        )
        return intrinsic(wgmma_rs)

    wgmma_m64n64k16_rs = _wgmma_rs(64)
    wgmma_m64n128k16_rs = _wgmma_rs(128)

    @intrinsic
    def hold_registers(typingctx, array, count):
        """Type ``hold_registers(float32 or uint32 local array, integer constant)``: an empty statement
        that takes and gives back ``array[0 : count]``, ordered with the other wgmma statements, so
        that no access to them moves across it: accumulators around a wgmma, and the packed A
        fragments of an ``_rs`` wgmma before its fence (else ptxas adds a warpgroup arrive before
        each wgmma reading them)."""
        if not ((_accumulators(array) or _words(array)) and isinstance(count, types.IntegerLiteral)):
            return None
        n = count.literal_value

        def codegen(context, builder, sig, args):
            zero = context.get_constant(types.intp, 0)
            _through_registers(context, builder, sig.args[0], args[0], zero, types.intp, n, "", [], "")
            return context.get_dummy_value()

        return types.void(array, count), codegen

    wgmma_wait = _wait_group(
        "wgmma_wait", "wgmma.wait_group.sync.aligned",
        "``wgmma.wait_group.sync.aligned pending`` (a compile-time constant): at most that many of the "
        "warpgroup's committed groups still in flight.",
    )


# the wgmma of each N built here, by N
MMA_BY_WIDTH = {64: wgmma_m64n64k16, 128: wgmma_m64n128k16, 256: wgmma_m64n256k16}
# the A-from-registers, MN-major-B wgmma of each N built here, by N
MMA_RS_BY_WIDTH = {64: wgmma_m64n64k16_rs, 128: wgmma_m64n128k16_rs}
