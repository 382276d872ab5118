"""Compile hand-written LLVM IR for this CPU with llvmlite (numba's own LLVM; no C toolchain).

The batch-1 kernels that need instructions numba cannot express (``vpermi2b``/``vpermi2ps``,
``vpmultishiftqb``, ``vpdpbusd``, ``vgf2p8affineqb``) are written as LLVM IR text and compiled
here once per process; numba functions call them through ctypes function pointers (numba
releases no GIL for those calls, they are plain C calls).
"""
from __future__ import annotations

import ctypes
from typing import Iterable

_ENGINES: list = []  # keep the machine code alive for the life of the process


def features_missing(required: Iterable[str]) -> list[str]:
    """The names in ``required`` (LLVM feature names, e.g. ``avx512vnni``) this CPU lacks."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return [f for f in required if not features.get(f, False)]


def merge_declarations(ir: str) -> str:
    """``ir`` with each repeated ``declare`` line kept once (kernels are concatenated
    templates that each declare the intrinsics they call)."""
    seen, lines = set(), []
    for line in ir.splitlines():
        if line.startswith("declare"):
            if line in seen:
                continue
            seen.add(line)
        lines.append(line)
    return "\n".join(lines)


def compile_functions(ir: str, signatures: dict[str, ctypes._CFuncPtr], cpu: "str | None" = None,
                      features: "str | None" = None) -> dict:
    """Compile the module ``ir`` (repeated ``declare`` lines are merged) at -O3 and return
    ``{name: ctypes function}`` for each ``name -> CFUNCTYPE`` in ``signatures``. By default
    for the host CPU; ``cpu``/``features`` (LLVM names, e.g. ``"x86-64-v3"``, ``"+avxvnni"``)
    target a lesser one, so that the AVX2 kernels stay AVX2 code on an AVX-512 machine."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = llvm.parse_assembly(merge_declarations(ir))
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(
        cpu=cpu or llvm.get_host_cpu_name(),
        features=llvm.get_host_cpu_features().flatten() if features is None and cpu is None else (features or ""), opt=3
    )
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    _ENGINES.append(engine)
    return {name: proto(engine.get_function_address(name)) for name, proto in signatures.items()}


# The loop nest every float32 row kernel shares (cpu_gather, cpu_avx2, cpu_neon): columns in
# blocks of %bunits units of 32 inputs (the last block may be shorter), rows in quads. Block c,
# quad q, unit u of the block, row k of the quad: metadata word
#   meta[c * bunits * 4 * nquads + (q * cu + u) * 4 + k]   (cu = units in block c)
# and its 16 weights at vals[16 * that index]: one weight stream per block, and the block's
# inputs (bunits * 32 floats) stay in L1 while every quad streams past them. out[r] = the sum
# over blocks, for rows r0..r1-1 (multiples of 4). A kernel supplies its accumulator PHIS, the
# unit's input loads XLOADS (from %xo = 32 * unit), the four ROWS steps (metadata at %mbase)
# and the ENDS (reduce, add to out unless %first).
F32_ROW_KERNEL = """
define void @NAME(ptr %vals, ptr %meta, ptr %x, ptr %out, i64 %r0, i64 %r1, i64 %units,
                  i64 %nquads, i64 %bunits) {
entry:
  %blockwords = mul i64 %bunits, %nquads
  %blockwords4 = mul i64 %blockwords, 4
  br label %blockloop
blockloop:
  %c0 = phi i64 [ 0, %entry ], [ %c0next, %blockend ]
  %cdone = icmp uge i64 %c0, %units
  br i1 %cdone, label %exit, label %blockbody
blockbody:
  %first = icmp eq i64 %c0, 0
  %left = sub i64 %units, %c0
  %short = icmp ult i64 %left, %bunits
  %cu = select i1 %short, i64 %left, i64 %bunits
  %cidx = udiv i64 %c0, %bunits
  %cbase = mul i64 %cidx, %blockwords4
  br label %quadloop
quadloop:
  %r = phi i64 [ %r0, %blockbody ], [ %rnext, %quadend ]
  %rdone = icmp uge i64 %r, %r1
  br i1 %rdone, label %blockend, label %quadbody
quadbody:
  %q = lshr i64 %r, 2
  %qu = mul i64 %q, %cu
  br label %unitloop
unitloop:
  %u = phi i64 [ 0, %quadbody ], [ %unext, %unitbody ]
PHIS
  %udone = icmp uge i64 %u, %cu
  br i1 %udone, label %quadend, label %unitbody
unitbody:
  %ug = add i64 %c0, %u
  %xo = mul i64 %ug, 32
XLOADS
  %qui = add i64 %qu, %u
  %mlocal = mul i64 %qui, 4
  %mbase = add i64 %cbase, %mlocal
ROWS
  %unext = add i64 %u, 1
  br label %unitloop
quadend:
ENDS
  %rnext = add i64 %r, 4
  br label %quadloop
blockend:
  %c0next = add i64 %c0, %bunits
  br label %blockloop
exit:
  ret void
}
"""


def f32_row_kernel(name: str, phis: str, xloads: str, rows: str, ends: str) -> str:
    """The IR of a float32 row kernel named ``name`` from its four ISA-specific parts (the
    placeholders of :data:`F32_ROW_KERNEL`)."""
    return (F32_ROW_KERNEL.replace("NAME", name).replace("PHIS", phis.strip("\n"))
            .replace("XLOADS", xloads.strip("\n")).replace("ROWS", rows.strip("\n")).replace("ENDS", ends.strip("\n")))


def a8_block_end(lanes: int) -> str:
    """The end of an INT8-activation row kernel's activation block (cpu_vnni, cpu_avx2,
    cpu_neon), shared by all of them: ``acc += float(%acci) * (wscale[r, q] * xs[b])`` on
    ``lanes``-wide vectors, the step to the next block (and scale group every %xb_per_q
    blocks), and at the row's end the horizontal sum stored to out[r]. The kernels reach it
    with the integer block sum in %acci."""
    v, vi = f"<{lanes} x float>", f"<{lanes} x i32>"
    return f"""  %wsp = getelementptr float, ptr %srow, i64 %q
  %ws = load float, ptr %wsp
  %xsp = getelementptr float, ptr %xs, i64 %xb
  %xsv = load float, ptr %xsp
  %s = fmul float %ws, %xsv
  %sv0 = insertelement {v} poison, float %s, i32 0
  %sv = shufflevector {v} %sv0, {v} poison, {vi} zeroinitializer
  %accfl = sitofp {vi} %acci to {v}
  %accf2 = call {v} @llvm.fma.v{lanes}f32({v} %accfl, {v} %sv, {v} %accf)
  %xbnext = add i64 %xb, 1
  %qc1 = add i64 %qc, 1
  %qwrap = icmp uge i64 %qc1, %xb_per_q
  %qinc = add i64 %q, 1
  %qnext = select i1 %qwrap, i64 %qinc, i64 %q
  %qcnext = select i1 %qwrap, i64 0, i64 %qc1
  br label %xbloop
rowend:
  %tot = call reassoc float @llvm.vector.reduce.fadd.v{lanes}f32(float 0.0, {v} %accf)
  %op = getelementptr float, ptr %out, i64 %r
  store float %tot, ptr %op
  %rnext = add i64 %r, 1
  br label %rowloop
exit:
  ret void
}}
"""
