"""The batch-1 kernels the decode runtime can call, in order of preference, and the choice
for one packed layer (name, ``runtime.step`` kind, why).

The row kernels are LLVM functions (``kernels/cpu_vnni.py``, ``kernels/cpu_gather.py``): the
compiled step calls them by address (``runtime/ffi.py``). The numba kernels over the
row-blocked layout run any 2:4 layer on any x86-64 or ARM CPU, so every supported layer has
a kernel; what changes from CPU to CPU is how fast it is.
"""
from __future__ import annotations

import ctypes
from typing import Optional

from sparsemerge.runtime.step import KIND_A8, KIND_BF, KIND_BQ, KIND_F32


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def a8_functions() -> tuple[dict[str, int], Optional[str], str]:
    """``({codec: address}, reason or None, kernel name)`` of the best INT8-activation 2:4 kernel."""
    from sparsemerge.kernels import cpu_vnni

    fns, reason = cpu_vnni.raw_functions()
    if fns is not None:
        return {c: _address(f) for c, f in fns.items()}, None, "avx512-vnni-a8"
    return {}, reason, "avx512-vnni-a8"


def f32_function() -> tuple[Optional[int], Optional[str], str]:
    from sparsemerge.kernels import cpu_gather

    fn, reason = cpu_gather.raw_function()
    return (None if fn is None else _address(fn)), reason, "avx512-gather-f32"


def cpu_summary() -> str:
    """The CPU and the SIMD features the kernels care about, for plans and reports."""
    try:
        import llvmlite.binding as llvm

        feats = llvm.get_host_cpu_features()
        have = [f for f in ("avx2", "fma", "avx512f", "avx512vbmi", "avx512vnni", "avxvnni", "neon", "dotprod")
                if feats.get(f, False)]
        return f"{llvm.get_host_cpu_name()} ({' '.join(have) or 'no SIMD features found'})"
    except Exception:  # noqa: BLE001 - a description only
        return "unknown CPU"


def choose(layout, act_quant: str) -> tuple[Optional[str], int, str]:
    """The decode kernel for one packed layer: ``(name, kind, why)``; name None if none fits."""
    from sparsemerge.kernels import cpu_gather, cpu_vnni

    if not layout.is_24:
        return None, -1, (f"{layout.n}:{layout.m} layers have no batch-1 decode kernel yet (2:4 only); "
                          "the transformers path runs them")
    if layout.codec in ("int8", "int4"):
        if act_quant == "int8":
            reason = cpu_vnni.unavailable_reason(layout)
            if reason is None:
                return "avx512-vnni-a8", KIND_A8, "INT8 activations, vpdpbusd row kernel"
            skipped = f"avx512-vnni-a8 skipped: {reason}"
        else:
            skipped = "A8 kernels skipped: float activations (act_quant none)"
        return "numba-blocked", KIND_BQ, f"{skipped}; numba blocked kernel"
    if layout.values.dtype.is_floating_point and str(layout.values.dtype) == "torch.float32":
        reason = cpu_gather.unavailable_reason(layout)
        if reason is None:
            return "avx512-gather-f32", KIND_F32, "vpermi2ps gather row kernel"
        return "numba-blocked", KIND_BF, f"avx512-gather-f32 skipped: {reason}; numba blocked kernel"
    return None, -1, f"{layout.values.dtype} values have no decode kernel (float32, INT8 and INT4 do)"
