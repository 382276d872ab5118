"""Calls of the LLVM-compiled row kernels (``kernels/cpu_vnni.py``, ``cpu_gather.py``, the
AVX2 ones) from numba, with the function address as an ordinary int64 argument.

numba can call a ctypes function pointer only when it is a compile-time constant, which
makes every caller uncacheable (the decode step would be recompiled in every process). These
intrinsics turn an address into a call instead (``inttoptr`` + ``call``), so the compiled
decode step is cached on disk and one step serves every kernel of the same C signature.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_I8P = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)


def _codegen(n_ptrs: int, n_ints: int):
    def codegen(context, builder, signature, llargs):
        fnty = ir.FunctionType(ir.VoidType(), [_I8P] * n_ptrs + [_I64] * n_ints)
        fn = builder.inttoptr(llargs[0], fnty.as_pointer())
        ptrs = [builder.inttoptr(a, _I8P) for a in llargs[1: 1 + n_ptrs]]
        ints = [builder.sext(a, _I64) if a.type.width < 64 else a for a in llargs[1 + n_ptrs:]]
        builder.call(fn, ptrs + ints)
        return context.get_dummy_value()

    return codegen


@intrinsic
def call_a8(typingctx, addr, stream, wscale, corr, xu, xs, out, r0, r1, npairs, tail, nscale, xb_per_q):
    """``void gemv24_{int8,int4}_a8(stream, wscale, corr, xu, xs, out, r0, r1, npairs, tail,
    nscale, xb_per_q)`` at ``addr`` (pointers as ``arr.ctypes.data``)."""
    sig = types.void(types.int64, *([types.uintp] * 6), *([types.int64] * 6))
    return sig, _codegen(6, 6)


@intrinsic
def call_f32(typingctx, addr, vals, meta, x, out, r0, r1, units, quads, block_units):
    """``void gemv24_f32_gather(vals, meta, x, out, r0, r1, units, quads, block_units)`` at ``addr``."""
    sig = types.void(types.int64, *([types.uintp] * 4), *([types.int64] * 5))
    return sig, _codegen(4, 5)
