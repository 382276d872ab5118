"""Which registry row runs each product of a decoding step, and how the runtime calls it.

The choice is the kernel registry's (``kernels/backends.py``): its rows are tried by priority
with their own ``supports`` checks - CPU features (under the cap of ``kernels/features.py``,
so ``SPARSEMERGE_CPU_FEATURES=avx2`` plans an AVX2 machine's kernels), pattern, codec,
activation quantization, column counts. The runtime can call the batch-1 rows below from its
compiled step: the LLVM row kernels by address (``runtime/ffi.py``) on the plan their module
prepares, the numba blocked kernels (2:4, and general N:M for the other patterns of a mixed
allocation) directly. Rows it cannot call at batch 1 (gemm, reference, cuda) are passed over;
a layer no callable row handles makes the model fall back to the transformers path, with the reason.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sparsemerge.runtime.step import KIND_A8, KIND_BF, KIND_BG, KIND_BH, KIND_BQ, KIND_F32


@dataclass(frozen=True)
class DecodeKernel:
    kind: int  # runtime.step KIND_*
    prepare: Optional[Callable] = None  # layout -> plan dict (row kernels)
    functions: Optional[Callable] = None  # () -> {"int8"|"int4"|"f32": ctypes function}
    what: str = ""


def _vnni():
    from sparsemerge.kernels import cpu_vnni

    return DecodeKernel(KIND_A8, cpu_vnni.prepare, cpu_vnni.compiled_functions, "INT8 activations, 512-bit vpdpbusd")


def _avxvnni():
    from sparsemerge.kernels import cpu_avx2

    return DecodeKernel(KIND_A8, cpu_avx2.prepare_a8, lambda: cpu_avx2.compiled_functions(vnni=True),
                        "INT8 activations, 256-bit VEX vpdpbusd")


def _avx2_a8():
    from sparsemerge.kernels import cpu_avx2

    return DecodeKernel(KIND_A8, cpu_avx2.prepare_a8, cpu_avx2.compiled_functions, "INT8 activations, vpmaddubsw")


def _gather():
    from sparsemerge.kernels import cpu_gather

    return DecodeKernel(KIND_F32, cpu_gather.prepare, cpu_gather.compiled_functions, "vpermi2ps input gather")


def _avx2_f32():
    from sparsemerge.kernels import cpu_avx2

    return DecodeKernel(KIND_F32, cpu_avx2.prepare_f32, cpu_avx2.compiled_functions, "vpermilps input gather")


def _neon_a8():
    from sparsemerge.kernels import cpu_neon

    return DecodeKernel(KIND_A8, cpu_neon.prepare_a8, cpu_neon.compiled_functions, "INT8 activations, NEON sdot")


def _neon_f32():
    from sparsemerge.kernels import cpu_neon

    return DecodeKernel(KIND_F32, cpu_neon.prepare_f32, cpu_neon.compiled_functions, "NEON tbl input gather")


# registry row -> how the compiled step runs it (numba-gemv24 is resolved per codec below).
# The NEON rows share the x86 rows' C signatures; on AArch64 they are untested here (no
# ARM machine: their kernels are tested under qemu in tests/kernels/test_kernels_neon.py).
DECODE_ROWS: dict[str, Callable[[], DecodeKernel]] = {
    "avx512-vnni-a8": _vnni,
    "avxvnni-a8": _avxvnni,
    "avx2-a8": _avx2_a8,
    "avx512-gather-f32": _gather,
    "avx2-f32": _avx2_f32,
    "neon-dotprod-a8": _neon_a8,
    "neon-f32": _neon_f32,
    "numba-gemv24": lambda: DecodeKernel(-1, what="numba blocked kernel, any CPU"),
    "numba-general": lambda: DecodeKernel(KIND_BG, what="numba general N:M kernel (x gathered by stored position), any CPU"),
}


HALF_OR_F32 = (torch.float32, torch.float16, torch.bfloat16)


class _Request:
    """What a registry row's ``supports`` reads of a layer."""

    def __init__(self, layout, act_quant: str) -> None:
        self.layout = layout
        self.act_quant = act_quant


def address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def decode_kernel(name: str, layout) -> DecodeKernel:
    kernel = DECODE_ROWS[name]()
    if name == "numba-gemv24":
        if layout.codec in ("int8", "int4"):
            kind = KIND_BQ
        else:
            kind = KIND_BF if layout.values.dtype == torch.float32 else KIND_BH
        return DecodeKernel(kind, what=kernel.what)
    return kernel


def choose(layout, act_quant: str) -> tuple[Optional[str], int, str]:
    """``(row name, runtime kind, why)`` for one packed layer at batch 1 on this CPU (under
    the feature cap); name None when no row the runtime can call fits (why says so)."""
    from sparsemerge.kernels.backends import rows
    from sparsemerge.kernels.dispatch import forced_kernel

    x = torch.empty(1, layout.cols)
    req = _Request(layout, act_quant)
    forced = forced_kernel()
    skipped = []
    for row in rows():
        if row.device == "cuda":
            continue
        if forced and forced not in ("cpu", row.name):
            continue
        reason = row.supports(req, x)
        if reason is None and row.name not in DECODE_ROWS:
            reason = "not a batch-1 kernel of the decode runtime"
        if reason is None and layout.codec == "none" and layout.values.dtype not in HALF_OR_F32:
            reason = f"{layout.values.dtype} values: the runtime reads float32, float16 and bfloat16"
        if reason is None:
            kernel = decode_kernel(row.name, layout)
            why = kernel.what
            passed = [(n, r) for n, r in skipped if n in DECODE_ROWS]
            if passed:
                why += "; passed over " + "; ".join(f"{n} ({r})" for n, r in passed)
            return row.name, kernel.kind, why
        skipped.append((row.name, reason))
    detail = "; ".join(f"{n}: {r}" for n, r in skipped)
    return None, -1, f"no batch-1 decode kernel for this {layout.n}:{layout.m} {layout.codec} layer ({detail})"


def cpu_summary() -> str:
    """The CPU, its SIMD features the kernels care about, and the cap if one is set."""
    from sparsemerge.kernels import features as F

    try:
        import llvmlite.binding as llvm

        name = llvm.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - a description only
        name = "unknown CPU"
    have = [f for f in ("avx2", "fma", "avx512f", "avx512vbmi", "avx512vnni", "avxvnni", "neon", "dotprod")
            if f in F.host_features()]
    cap = F.current_cap()
    return f"{name} ({' '.join(have) or 'no SIMD features found'})" + (f", kernels capped to {cap}" if cap else "")
