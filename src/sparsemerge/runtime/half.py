"""float16 values stored as their bits (uint16) in compiled code: the KV cache's float16 form.

numba has no float16 type on the CPU, so these intrinsics emit LLVM's own ``half`` conversions
(``fpext`` / ``fptrunc``, round to nearest even): inside a loop LLVM vectorizes them to one
``vcvtph2ps`` / ``vcvtps2ph`` per 8 or 16 values on x86-64 with F16C (every AVX2 CPU) and to
``fcvtl``/``fcvtn`` on AArch64. :func:`supported` says whether this CPU has them; elsewhere
the engine keeps a float32 cache (LLVM would call a conversion routine numba does not link).

``to_f32(x)`` reads a cache element as float32 whatever the cache's dtype, ``from_f32(cache, v)``
converts a float32 value to the cache's dtype: one compiled function serves both caches.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def supported() -> bool:
    """Whether this CPU converts float16 in hardware (x86-64 F16C, or AArch64)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().get("f16c", False))


@intrinsic
def half_bits_to_f32(typingctx, bits):
    """float16 bits (uint16) -> float32, exactly (every float16 is a float32)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_half_bits(typingctx, x):
    """float32 -> float16 bits (uint16), round to nearest even; beyond 65504 -> infinity."""
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


def to_f32(x):
    """A cache element as float32 (plain Python; compiled code uses the overload below)."""
    import numpy as np

    if isinstance(x, np.uint16):
        return np.array(x, np.uint16).view(np.float16).astype(np.float32)[()]
    return np.float32(x)


def from_f32(cache, v):
    """float32 ``v`` in ``cache``'s dtype (plain Python; compiled code uses the overload below)."""
    import numpy as np

    if cache.dtype == np.uint16:
        with np.errstate(over="ignore"):  # beyond 65504 rounds to inf, as the hardware conversion does
            return np.array(v, np.float32).astype(np.float16).view(np.uint16)[()]
    return np.float32(v)


@overload(to_f32, inline="always")
def _to_f32(x):
    if x == types.uint16:
        return lambda x: half_bits_to_f32(x)
    if x == types.float32:
        return lambda x: x
    return None


@overload(from_f32, inline="always")
def _from_f32(cache, v):
    if isinstance(cache, types.Array) and cache.dtype == types.uint16:
        return lambda cache, v: f32_to_half_bits(v)
    if isinstance(cache, types.Array) and cache.dtype == types.float32:
        return lambda cache, v: v
    return None
