"""16-byte global loads and stores for kernels: ``load_f16x8`` / ``load_f32x4`` / ``load_bf16x8`` and
``store_*`` likewise; ``bf16_to_f32`` / ``f32_to_bf16`` for single bfloat16 values, and ``as_f32`` for
an element of any of the three activation dtypes.

Numba never vectorises plain indexing, so a kernel that streams weights issues 2- or 4-byte loads
and leaves most of the memory bandwidth unused. These intrinsics emit one LLVM ``<4 x i32>`` load
with ``align 16`` (``LDG.E.128`` in SASS) and return its lanes as a tuple::

    w = load_f16x8(weight, row * K + k)   # UniTuple(float16, 8): weight.flat[row*K + k : row*K + k + 8]
    v = load_f32x4(x, i)                  # UniTuple(float32, 4)
    v = load_f32x4_l2(x, i)               # the same from L2 only (ld.global.cg): data other blocks of
                                          # the running kernel wrote; load_f32_l2: one float32

Addressing is ``(array, flat element index)`` into a C-contiguous array of any rank. The stores
mirror the loads; they take a tuple of 8 (4) numbers of any float type, cast to the array's dtype::

    store_f16x8(out, i, (y0, y1, y2, y3, y4, y5, y6, y7))   # out.flat[i : i + 8] = y (one STG.E.128)

Alignment precondition (the caller's job, nothing checks it on the device): the byte address of
element ``index`` must be a multiple of 16. That is, the array's data pointer is 16-byte aligned
(see :func:`aligned16`) and ``index`` is a multiple of 8 (float16) or 4 (float32). A misaligned
address faults the kernel ("misaligned address").

In numba's CUDA simulator inline LLVM does not run; there the same names are plain device functions
that index the flattened array.

The second section holds the data movement of the tensor-core prefill kernels (shared-memory
addresses, ldmatrix, cp.async; those are GPU only) and f16x2 packing and unpacking; the later ones
programmatic dependent launch, thread block clusters (a barrier and each other's shared memory) and
the last block of a group to arrive.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda

from .common import SIMULATOR

# Elements in one 16-byte vector, by dtype: the K granularity a kernel needs to use these loads
# (uint16: bfloat16 bit patterns).
VECTOR_WIDTH = {np.dtype(np.float16): 8, np.dtype(np.float32): 4, np.dtype(np.uint16): 8}


def aligned16(*arrays: Any) -> bool:
    """True when every array's data pointer (device or host) is a multiple of 16 bytes."""
    for array in arrays:
        interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
        if interface["data"][0] % 16:
            return False
    return True


if SIMULATOR:

    def _simulated_load(count: int, convert: Any) -> Any:
        """The simulator's ``(array, index) -> tuple`` of ``convert(array.flat[index + j])``."""

        @cuda.jit(device=True)
        def load(array, index):
            flat = array.reshape(-1)
            return tuple(convert(flat[index + j]) for j in range(count))

        return load

    def _simulated_store(count: int, convert: Any) -> Any:
        """The simulator's ``(array, index, values)``: ``array.flat[index + j] = convert(values[j])``."""

        @cuda.jit(device=True)
        def store(array, index, values):
            flat = array.reshape(-1)
            for j in range(count):
                flat[index + j] = convert(values[j])

        return store

    @cuda.jit(device=True)
    def bf16_to_f32(bits):
        """The float32 value of bfloat16 bit pattern ``bits`` (simulator: a NumPy view)."""
        return (np.uint32(bits) << np.uint32(16)).view(np.float32)

    @cuda.jit(device=True)
    def f32_to_bf16(value):
        """``value`` rounded to the nearest even bfloat16, as its uint16 bit pattern (NaN stays a NaN)."""
        x = np.float32(value)
        if x != x:
            return np.uint16(0x7FC0)
        bits = x.view(np.uint32)
        return np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

    @cuda.jit(device=True)
    def as_f32(value):
        """An element as float32: a uint16 is a bfloat16 bit pattern, a float is converted."""
        if isinstance(value, np.uint16):
            return bf16_to_f32(value)
        return np.float32(value)

    def _same(value):
        return value

    load_f16x8 = _simulated_load(8, _same)
    load_f32x4 = _simulated_load(4, _same)
    load_f32x4_l2 = _simulated_load(4, _same)
    load_f32_l2 = _simulated_load(1, _same)
    load_f16x8_f32 = _simulated_load(8, np.float32)
    load_bf16x8 = _simulated_load(8, bf16_to_f32)
    store_f16x8 = _simulated_store(8, _same)
    store_f32x4 = _simulated_store(4, _same)
    store_bf16x8 = _simulated_store(8, f32_to_bf16)

else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic

    _I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()
    _SIXTEEN = ir.Constant(_I32, 16)

    # bfloat16: uint16 bit patterns in memory, float32 in registers. Widening puts the pattern in
    # the high half of a float32; narrowing rounds to nearest even (NaN becomes the canonical NaN).

    def _widen(builder: Any, bits: Any) -> Any:
        """The float32 of a bfloat16 pattern in the low half of the i32 ``bits`` (high half zero)."""
        return builder.bitcast(builder.shl(bits, _SIXTEEN), _F32)

    def _narrow(builder: Any, value: Any) -> Any:
        """The bfloat16 pattern of float32 ``value``, rounded to nearest even, in the low half of an i32."""
        bits = builder.bitcast(value, _I32)
        odd = builder.and_(builder.lshr(bits, _SIXTEEN), ir.Constant(_I32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(_I32, 0x7FFF)), odd), _SIXTEEN)
        is_nan = builder.fcmp_unordered("uno", value, value)
        return builder.select(is_nan, ir.Constant(_I32, 0x7FC0), rounded)

    # How each 16-byte vector's 32-bit words become values, and values become a word's bits. The
    # halves are cut with shifts, not by bitcasting the whole vector to ``<8 x i16>``: LLVM folds that
    # bitcast into the load and NVVM 12.9 then splits it into two 8-byte loads. float16 is an ``i16``
    # in numba's data model.

    def _halves(builder: Any, word: Any) -> list:
        """The two 16-bit halves of ``word``, low first, as ``i16``."""
        return [builder.trunc(word, _I16), builder.trunc(builder.lshr(word, _SIXTEEN), _I16)]

    def _unpack_f16(context: Any, builder: Any, word: Any) -> list:
        return _halves(builder, word)

    def _unpack_f32(context: Any, builder: Any, word: Any) -> list:
        return [builder.bitcast(word, _F32)]

    def _unpack_f16_widened(context: Any, builder: Any, word: Any) -> list:
        return [builder.fpext(builder.bitcast(half, ir.HalfType()), _F32) for half in _halves(builder, word)]

    def _unpack_bf16(context: Any, builder: Any, word: Any) -> list:
        # the high half is already where a float32 keeps it: mask instead of shifting twice
        return [_widen(builder, word), builder.bitcast(builder.and_(word, ir.Constant(_I32, 0xFFFF0000)), _F32)]

    def _bits_f16(context: Any, builder: Any, value: Any, value_type: Any) -> Any:
        half = context.cast(builder, value, value_type, types.float16)
        return builder.zext(builder.bitcast(half, _I16), _I32)

    def _bits_f32(context: Any, builder: Any, value: Any, value_type: Any) -> Any:
        return builder.bitcast(context.cast(builder, value, value_type, types.float32), _I32)

    def _bits_bf16(context: Any, builder: Any, value: Any, value_type: Any) -> Any:
        return _narrow(builder, context.cast(builder, value, value_type, types.float32))

    def _matches(array: Any, element: Any, index: Any) -> bool:
        return (
            isinstance(array, types.Array)
            and array.dtype == element
            and array.layout == "C"
            and isinstance(index, types.Integer)
        )

    def _words_pointer(context: Any, builder: Any, array_type: Any, array: Any, index_type: Any, index: Any) -> Any:
        """The ``<4 x i32>*`` of element ``index`` of ``array``."""
        data = context.make_array(array_type)(context, builder, value=array).data
        offset = context.cast(builder, index, index_type, types.intp)
        return builder.bitcast(builder.gep(data, [offset]), ir.VectorType(_I32, 4).as_pointer())

    def _vector_load(name: str, element: Any, result: Any, count: int, unpack: Any) -> Any:
        """An intrinsic ``(C-contiguous array of element, index) -> UniTuple(result, count)``: one
        aligned 16-byte load, each word unpacked into ``count // 4`` values by ``unpack``."""

        def load(typingctx, array, index):
            if not _matches(array, element, index):
                return None

            def codegen(context, builder, sig, args):
                words = builder.load(_words_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                                     align=16)
                values = []
                for w in range(4):
                    values += unpack(context, builder, builder.extract_element(words, ir.Constant(_I32, w)))
                return cgutils.pack_array(builder, values)

            return types.UniTuple(result, count)(array, index), codegen

        load.__name__ = name
        return intrinsic(load)

    def _vector_store(name: str, element: Any, count: int, bits: Any) -> Any:
        """An intrinsic ``(C-contiguous array of element, index, UniTuple(float, count)) -> None``: one
        aligned 16-byte store, each value's bits (``bits``: zero-extended to an i32) packed low first.

        The lanes are packed into a ``<4 x i32>`` word by word, as the loads unpack them, so that
        NVVM keeps one ``st.global.v4`` rather than splitting an ``<8 x i16>`` store.
        """
        per_word = count // 4

        def store(typingctx, array, index, values):
            if not (
                _matches(array, element, index)
                and isinstance(values, types.UniTuple)
                and values.count == count
                and isinstance(values.dtype, types.Float)
            ):
                return None

            def codegen(context, builder, sig, args):
                lanes = [bits(context, builder, builder.extract_value(args[2], i), sig.args[2].dtype) for i in range(count)]
                words = ir.Constant(ir.VectorType(_I32, 4), ir.Undefined)
                for w in range(4):
                    word = lanes[w * per_word]
                    if per_word == 2:
                        word = builder.or_(word, builder.shl(lanes[w * per_word + 1], _SIXTEEN))
                    words = builder.insert_element(words, word, ir.Constant(_I32, w))
                builder.store(words, _words_pointer(context, builder, sig.args[0], args[0], sig.args[1], args[1]),
                              align=16)
                return context.get_dummy_value()

            return types.void(array, index, values), codegen

        store.__name__ = name
        return intrinsic(store)

    load_f16x8 = _vector_load("load_f16x8", types.float16, types.float16, 8, _unpack_f16)
    load_f32x4 = _vector_load("load_f32x4", types.float32, types.float32, 4, _unpack_f32)

    def _l2_load(name: str, count: int) -> Any:
        """An intrinsic ``(C-contiguous float32 array, index) -> UniTuple(float32, count)`` (1 or 4, the
        latter 16-byte aligned): ``ld.global.cg``, cached in L2 only, so it sees what other blocks of
        the running kernel wrote (after their fence) even where this SM's L1 holds the line from before."""
        vector = ".v4" if count == 4 else ""
        outputs = "{" + ", ".join(f"${i}" for i in range(count)) + "}" if count == 4 else "$0"

        def load(typingctx, array, index):
            if not _matches(array, types.float32, index):
                return None
            result = types.UniTuple(types.float32, count)

            def codegen(context, builder, sig, args):
                data = context.make_array(sig.args[0])(context, builder, value=args[0]).data
                offset = context.cast(builder, args[1], sig.args[1], types.intp)
                pointer = builder.gep(data, [offset])
                returned = ir.LiteralStructType([_F32] * count) if count > 1 else _F32
                asm = ir.InlineAsm(  # side effects: kept after the fence that makes the data visible
                    ir.FunctionType(returned, [pointer.type]), f"ld.global.cg{vector}.f32 {outputs}, [${count}];",
                    ",".join(["=f"] * count + ["l"]), side_effect=True,
                )
                values = builder.call(asm, [pointer])
                lanes = [builder.extract_value(values, i) for i in range(count)] if count > 1 else [values]
                return context.make_tuple(builder, result, lanes)

            return result(array, index), codegen

        load.__name__ = name
        return intrinsic(load)

    load_f32x4_l2 = _l2_load("load_f32x4_l2", 4)
    load_f32_l2 = _l2_load("load_f32_l2", 1)
    # float16 widened to float32 in the load itself: a kernel that keeps many loaded values before
    # using them (decode attention) then holds one float32 each instead of a 16-bit value and its
    # later conversion, fewer registers live at once
    load_f16x8_f32 = _vector_load("load_f16x8_f32", types.float16, types.float32, 8, _unpack_f16_widened)
    load_bf16x8 = _vector_load("load_bf16x8", types.uint16, types.float32, 8, _unpack_bf16)
    store_f16x8 = _vector_store("store_f16x8", types.float16, 8, _bits_f16)
    store_f32x4 = _vector_store("store_f32x4", types.float32, 4, _bits_f32)
    store_bf16x8 = _vector_store("store_bf16x8", types.uint16, 8, _bits_bf16)

    @intrinsic
    def bf16_to_f32(typingctx, bits):
        """Type ``bf16_to_f32(integer bfloat16 bit pattern) -> float32``."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            return _widen(builder, context.cast(builder, args[0], sig.args[0], types.uint32))

        return types.float32(bits), codegen

    @intrinsic
    def f32_to_bf16(typingctx, value):
        """Type ``f32_to_bf16(float) -> uint16``: rounded to nearest even."""
        if not isinstance(value, types.Float):
            return None

        def codegen(context, builder, sig, args):
            return builder.trunc(_bits_bf16(context, builder, args[0], sig.args[0]), _I16)

        return types.uint16(value), codegen

    @intrinsic
    def as_f32(typingctx, value):
        """Type ``as_f32(uint16 bfloat16 bit pattern or float) -> float32``: one element of an array of
        any activation dtype as float32, so that one kernel body serves all three."""
        if not (value == types.uint16 or isinstance(value, types.Float)):
            return None

        def codegen(context, builder, sig, args):
            if sig.args[0] == types.uint16:
                return _widen(builder, builder.zext(args[0], _I32))
            return context.cast(builder, args[0], sig.args[0], types.float32)

        return types.float32(value), codegen


# ----------------------------------------------------------------------- tensor-core data movement
#
# Shared-memory addresses, ldmatrix, cp.async and f16x2 packing for the tensor-core prefill kernels
# (gemm_tc.py, attention_prefill.py; pack_f16x2 also attention_mma.py); the mma itself is
# :func:`.mma.mma_16816`. GPU only but for pack_f16x2: in the simulator the others raise, and nothing
# reachable there calls them.
#
#     base = shared_address(tile, 0)            # uint32: the shared-space byte address of tile.flat[0]
#     a = ldmatrix_x4(base + offset)            # UniTuple(uint32, 4); _trans variants transpose
#     cp_async_16(base + offset, x, i, 16)      # 16 bytes x.flat[i : i + 8] -> shared, asynchronously
#     cp_async_commit(); cp_async_wait_group(1) # close a group; wait until at most 1 group is pending
#     w = pack_f16x2(lo, hi)                    # two float32 -> one f16x2 word, lo in the low half
#
# ldmatrix (m8n8, b16): lane ``8 j + r`` gives the address of row r of matrix j (16 contiguous bytes,
# 16-byte aligned; for x1 / x2 only lanes 0-7 / 0-15 are read, the others must still execute). Word
# j of lane l holds elements ``(l // 4, 2 (l % 4))`` and ``(l // 4, 2 (l % 4) + 1)`` of matrix j, the
# first in the low half; with .trans, elements ``(2 (l % 4), l // 4)`` and ``(2 (l % 4) + 1, l // 4)``.
# That is exactly an mma.m16n8k16 fragment (see .mma): A row-major and B stored [n][k] ("col") load
# without .trans, B stored [k][n] loads with .trans.
#
# The asm statements that touch memory are volatile with a memory clobber, so that neither LLVM nor
# NVVM moves them across barriers or each other, or merges two reads of one address in a loop.

if SIMULATOR:

    def _gpu_only(*args: Any) -> Any:
        raise NotImplementedError("tensor-core intrinsics (ldmatrix, cp.async) run only on a GPU")

    shared_address = ldmatrix_x1 = ldmatrix_x2 = ldmatrix_x4 = _gpu_only
    ldmatrix_x1_trans = ldmatrix_x2_trans = ldmatrix_x4_trans = _gpu_only
    cp_async_16 = cp_async_commit = cp_async_wait_group = _gpu_only

    @cuda.jit(device=True)
    def pack_f16x2(lo, hi):
        """Both rounded to float16 in one word, ``lo`` in the low half (simulator: NumPy)."""
        return np.array([lo, hi], np.float16).view(np.uint32)[0]

    @cuda.jit(device=True)
    def unpack_f16x2(word):
        """The two float16 of a word as float32, the low half first (simulator: NumPy)."""
        lo, hi = np.array([word], np.uint32).view(np.float16).astype(np.float32)
        return lo, hi

else:
    _VOID = ir.VoidType()

    def _asm(return_type: Any, operand_types: list, text: str, constraints: str, volatile: bool = True) -> Any:
        """An inline PTX statement; ``volatile`` ones also clobber memory."""
        if volatile:
            constraints = constraints + ("," if constraints else "") + "~{memory}"
        return ir.InlineAsm(ir.FunctionType(return_type, operand_types), text, constraints, side_effect=volatile)

    def _u32(context: Any, builder: Any, value: Any, value_type: Any) -> Any:
        return context.cast(builder, value, value_type, types.uint32)

    def _shared_u32(builder: Any, pointer: Any) -> Any:
        """The 32-bit shared-state-space address of a generic pointer into shared memory."""
        generic = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        shared = builder.addrspacecast(generic, ir.PointerType(ir.IntType(8), addrspace=3))
        return builder.trunc(builder.ptrtoint(shared, ir.IntType(64)), _I32)

    @intrinsic
    def shared_address(typingctx, array, index):
        """Type ``shared_address(shared array, integer) -> uint32``: the byte address of
        ``array.flat[index]`` in the shared state space (what ldmatrix and cp.async take)."""
        if not (isinstance(array, types.Array) and array.layout == "C" and isinstance(index, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            array_type, index_type = sig.args
            data = context.make_array(array_type)(context, builder, value=args[0]).data
            offset = context.cast(builder, args[1], index_type, types.intp)
            return _shared_u32(builder, builder.gep(data, [offset]))

        return types.uint32(array, index), codegen

    def _ldmatrix(count: int, trans: bool) -> Any:
        """``ldmatrix.sync.aligned.m8n8.x<count>[.trans].shared.b16`` as ``(address) -> UniTuple(uint32, count)``."""
        registers = ", ".join(f"${i}" for i in range(count))
        text = f"ldmatrix.sync.aligned.m8n8.x{count}{'.trans' if trans else ''}.shared.b16 {{{registers}}}, [${count}];"
        result_type = _I32 if count == 1 else ir.LiteralStructType([_I32] * count)

        def load(typingctx, address):
            """Type ``(integer shared address) -> UniTuple(uint32, count)``."""
            if not isinstance(address, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                asm = _asm(result_type, [_I32], text, ",".join(["=r"] * count + ["r"]))
                result = builder.call(asm, [_u32(context, builder, args[0], sig.args[0])])
                words = [result] if count == 1 else [builder.extract_value(result, i) for i in range(count)]
                return cgutils.pack_array(builder, words)

            return types.UniTuple(types.uint32, count)(address), codegen

        load.__name__ = f"ldmatrix_x{count}{'_trans' if trans else ''}"
        return intrinsic(load)

    ldmatrix_x1, ldmatrix_x2, ldmatrix_x4 = (_ldmatrix(n, False) for n in (1, 2, 4))
    ldmatrix_x1_trans, ldmatrix_x2_trans, ldmatrix_x4_trans = (_ldmatrix(n, True) for n in (1, 2, 4))

    @intrinsic
    def cp_async_16(typingctx, address, array, index, src_bytes):
        """Type ``cp_async_16(integer shared address, C-contiguous array, integer, integer)``.

        ``cp.async.cg.shared.global``: copy 16 bytes from ``array.flat[index]`` (16-byte aligned) to
        the shared address, bypassing L1; only the first ``src_bytes`` are read and the rest are
        zero-filled, so ``src_bytes = 0`` writes 16 zero bytes (the source address must still be valid).
        """
        if not (
            isinstance(address, types.Integer)
            and isinstance(array, types.Array)
            and array.layout == "C"
            and isinstance(index, types.Integer)
            and isinstance(src_bytes, types.Integer)
        ):
            return None

        def codegen(context, builder, sig, args):
            address_type, array_type, index_type, bytes_type = sig.args
            data = context.make_array(array_type)(context, builder, value=args[1]).data
            offset = context.cast(builder, args[2], index_type, types.intp)
            source = builder.gep(data, [offset])
            asm = _asm(_VOID, [_I32, source.type, _I32], "cp.async.cg.shared.global [$0], [$1], 16, $2;", "r,l,r")
            builder.call(
                asm,
                [
                    _u32(context, builder, args[0], address_type),
                    source,
                    _u32(context, builder, args[3], bytes_type),
                ],
            )
            return context.get_dummy_value()

        return types.void(address, array, index, src_bytes), codegen

    def _statement(name: str, text: str, doc: str, hopper_only: bool = False) -> Any:
        """The intrinsic ``name() -> None``: one volatile PTX statement that clobbers memory (with
        ``hopper_only``, no instruction when built for a GPU before sm_90: :func:`_on_hopper`)."""

        def build(typingctx):
            def codegen(context, builder, sig, args):
                if hopper_only:
                    with _on_hopper(builder):
                        builder.call(_asm(_VOID, [], text, ""), [])
                else:
                    builder.call(_asm(_VOID, [], text, ""), [])
                return context.get_dummy_value()

            return types.void(), codegen

        build.__name__, build.__doc__ = name, doc
        return intrinsic(build)

    def _wait_group(name: str, instruction: str, doc: str) -> Any:
        """The intrinsic ``name(pending)``: ``instruction pending;`` for a compile-time constant ``pending``."""

        def build(typingctx, pending):
            if not isinstance(pending, types.IntegerLiteral):
                return None
            text = f"{instruction} {pending.literal_value};"

            def codegen(context, builder, sig, args):
                builder.call(_asm(_VOID, [], text, ""), [])
                return context.get_dummy_value()

            return types.void(pending), codegen

        build.__name__, build.__doc__ = name, doc
        return intrinsic(build)

    cp_async_commit = _statement(
        "cp_async_commit", "cp.async.commit_group;",
        "``cp.async.commit_group``: the cp.async issued since the last commit form one group.",
    )
    cp_async_wait_group = _wait_group(
        "cp_async_wait_group", "cp.async.wait_group",
        "``cp.async.wait_group n``: wait until at most ``pending`` (a compile-time constant) of this "
        "thread's committed groups are still in flight. Other threads' copies need a barrier after.",
    )

    @intrinsic
    def pack_f16x2(typingctx, lo, hi):
        """Type ``pack_f16x2(float32, float32) -> uint32``: both rounded to float16, ``lo`` in the low half."""
        if not (lo == types.float32 and hi == types.float32):
            return None

        def codegen(context, builder, sig, args):
            asm = _asm(
                _I32,
                [ir.FloatType(), ir.FloatType()],
                "{ .reg .f16 lo, hi; cvt.rn.f16.f32 lo, $1; cvt.rn.f16.f32 hi, $2; mov.b32 $0, {lo, hi}; }",
                "=r,f,f",
                volatile=False,
            )
            return builder.call(asm, list(args))

        return types.uint32(lo, hi), codegen

    @intrinsic
    def unpack_f16x2(typingctx, word):
        """Type ``unpack_f16x2(uint32) -> UniTuple(float32, 2)``: the word's two float16, the low half
        first, widened (two ``cvt.f32.f16``)."""
        if word != types.uint32:
            return None
        result = types.UniTuple(types.float32, 2)

        def codegen(context, builder, sig, args):
            return context.make_tuple(builder, result, _unpack_f16_widened(context, builder, args[0]))

        return result(word), codegen


# ---------------------------------------------------------------- programmatic dependent launch
#
# A kernel that :func:`.common.launch` starts with programmatic dependent launch (PDL, Hopper on)
# may be resident while the kernel before it in the stream completes, so it must not touch what
# earlier kernels write (nor write what they read) before it calls::
#
#     await_previous_kernels()     # earlier kernels done, their writes visible
#
# Without a call to let_next_kernel_launch() (griddepcontrol.launch_dependents) the next kernel
# launches as the blocks of this one have all exited; with it, once every block has called it
# (common.LAUNCH_NEXT_EARLY says which kernels do). Built for a GPU before Hopper both are no
# instruction (launches there are never programmatic); in the simulator they are no-ops.

if SIMULATOR:

    @cuda.jit(device=True)
    def await_previous_kernels():
        """No-op in the simulator, whose launches run one after another."""

    @cuda.jit(device=True)
    def let_next_kernel_launch():
        """No-op in the simulator."""

else:

    def _hopper(builder: Any) -> Any:
        """Whether the PTX is built for sm_90 or newer, as an i1 that NVVM folds to a constant: it
        replaces ``__nvvm_reflect("__CUDA_ARCH")`` by the target's 100 * major + 10 * minor."""
        module = builder.module
        reflect = cgutils.get_or_insert_function(module, ir.FunctionType(_I32, [ir.IntType(8).as_pointer()]),
                                                 "__nvvm_reflect")
        name = module.globals.get("__cuda_arch_name")
        if name is None:
            name = cgutils.global_constant(module, "__cuda_arch_name", cgutils.make_bytearray(b"__CUDA_ARCH\0"))
        arch = builder.call(reflect, [builder.bitcast(name, ir.IntType(8).as_pointer())])
        return builder.icmp_signed(">=", arch, ir.Constant(_I32, 900))

    def _on_hopper(builder: Any) -> Any:
        """A branch taken only when the PTX is built for sm_90 or newer (:func:`_hopper`)."""
        return builder.if_then(_hopper(builder))

    await_previous_kernels = _statement(
        "await_previous_kernels", "griddepcontrol.wait;",
        "``griddepcontrol.wait``: wait until the kernels this one was launched after have finished and their "
        "memory is visible (returns at once when the launch was not programmatic).",
        hopper_only=True,
    )
    let_next_kernel_launch = _statement(
        "let_next_kernel_launch", "griddepcontrol.launch_dependents;",
        "``griddepcontrol.launch_dependents``: the next kernel in the stream, when it is launched "
        "programmatically, may launch once every block of this one has called this, rather than once they "
        "have exited (it still waits for this kernel in its :func:`await_previous_kernels`).",
        hopper_only=True,
    )


# ---------------------------------------------------------------- thread block clusters
#
# On Hopper a launch may group its blocks into clusters (``cluster`` of :func:`.common.launch`),
# which the hardware runs at the same time on one GPC: their threads can meet at one barrier and
# read each other's shared memory. Every grid is made of clusters, of one block where the launch
# asks for none (and always before Hopper, and in the simulator), so a kernel written with these
# also runs in a plain launch::
#
#     cluster_blocks()                      # the blocks of this block's cluster
#     cluster_sync()                        # every thread of every block of the cluster meets here
#     load_shared_cluster(array, i, rank)   # array.flat[i] in the shared memory of the block of that rank
#
# A block's shared memory is gone once it exits, so the cluster meets at a cluster_sync after its
# last reads of other blocks' memory.

if SIMULATOR:

    @cuda.jit(device=True)
    def cluster_blocks():
        """Blocks in a cluster: one in the simulator."""
        return 1

    @cuda.jit(device=True)
    def cluster_sync():
        """A block barrier: the simulator's clusters are one block."""
        cuda.syncthreads()

    @cuda.jit(device=True)
    def load_shared_cluster(array, index, rank):
        """``array.flat[index]`` of the block itself (rank 0, the simulator's only one)."""
        return array.reshape(-1)[index]

else:

    @intrinsic
    def cluster_blocks(typingctx):
        """Type ``cluster_blocks() -> int32``: ``%cluster_nctarank``, the blocks in this block's cluster
        (1 before Hopper)."""

        def codegen(context, builder, sig, args):
            blocks = cgutils.alloca_once_value(builder, ir.Constant(_I32, 1))
            with _on_hopper(builder):
                builder.store(builder.call(_asm(_I32, [], "mov.u32 $0, %cluster_nctarank;", "=r", volatile=False), []),
                              blocks)
            return builder.load(blocks)

        return types.int32(), codegen

    @intrinsic
    def cluster_sync(typingctx):
        """Type ``cluster_sync() -> None``: ``barrier.cluster.arrive.release`` then ``.wait.acquire``;
        the shared and global writes of every thread of the cluster before it are seen by every thread
        after it. Before Hopper a block barrier (``bar.sync 0``), the cluster being the block."""

        def codegen(context, builder, sig, args):
            with builder.if_else(_hopper(builder)) as (hopper, older):
                with hopper:
                    text = "barrier.cluster.arrive.release.aligned; barrier.cluster.wait.acquire.aligned;"
                    builder.call(_asm(_VOID, [], text, ""), [])
                with older:
                    builder.call(_asm(_VOID, [], "bar.sync 0;", ""), [])
            return context.get_dummy_value()

        return types.void(), codegen

    _CLUSTER_LOADS = {types.float32: ("f32", "=f", ir.FloatType()), types.int64: ("s64", "=l", ir.IntType(64))}

    @intrinsic
    def load_shared_cluster(typingctx, array, index, rank):
        """Type ``load_shared_cluster(shared float32 or int64 array, integer, integer) -> element``:
        ``array.flat[index]`` in the shared memory of the block of ``rank`` in this block's cluster
        (``mapa`` then ``ld.shared::cluster``; before Hopper, of the block itself)."""
        if not (
            isinstance(array, types.Array)
            and array.layout == "C"
            and array.dtype in _CLUSTER_LOADS
            and isinstance(index, types.Integer)
            and isinstance(rank, types.Integer)
        ):
            return None
        suffix, constraint, element = _CLUSTER_LOADS[array.dtype]

        def codegen(context, builder, sig, args):
            array_type, index_type, rank_type = sig.args
            data = context.make_array(array_type)(context, builder, value=args[0]).data
            pointer = builder.gep(data, [context.cast(builder, args[1], index_type, types.intp)])
            value = cgutils.alloca_once(builder, element)
            with builder.if_else(_hopper(builder)) as (hopper, older):
                with hopper:
                    text = (f"{{ .reg .b32 remote; mapa.shared::cluster.u32 remote, $1, $2; "
                            f"ld.shared::cluster.{suffix} $0, [remote]; }}")
                    asm = _asm(element, [_I32, _I32], text, f"{constraint},r,r")
                    rank_u32 = _u32(context, builder, args[2], rank_type)
                    builder.store(builder.call(asm, [_shared_u32(builder, pointer), rank_u32]), value)
                with older:
                    builder.store(builder.load(pointer), value)
            return builder.load(value)

        return array.dtype(array, index, rank), codegen


# ---------------------------------------------------------------- the last block of a group
#
# Blocks that each leave a share of a result in global memory (the split-K GEMM's sums, the split
# attention's partials) count themselves in; the block that counts last combines the shares:
#
#     if arrived_last(counts, index, blocks):   # every thread of the block calls it
#         ... read the other blocks' shares from L2 (load_f32_l2), combine, write ...
#         counts[index] = 0                     # by one thread: ready for the next launch


@cuda.jit(device=True)
def arrived_last(counts, index, blocks):
    """Whether this block is the last of ``blocks`` to count itself in at ``counts[index]`` (int32).

    The barrier and thread 0's fence publish the whole block's global writes before its count
    (fences are cumulative), and its fence after the count, with the barrier after it, orders what
    the block reads next after the other blocks' writes. Every thread of the block must call it."""
    last = cuda.shared.array(1, np.int32)
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        cuda.threadfence()
        last[0] = cuda.atomic.add(counts, index, 1) == blocks - 1
        cuda.threadfence()
    cuda.syncthreads()
    return last[0] != 0
