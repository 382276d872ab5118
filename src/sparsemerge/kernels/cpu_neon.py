"""2:4 float32 / INT8 / INT4 at batch 1 for AArch64: NEON with the dot-product extension.

The same idea as the x86 kernels (``cpu_gather.py``, ``cpu_vnni.py``, ``cpu_avx2.py``): never
expand the weights to their columns; gather the inputs the kept weights need from their
2-bit in-group positions (``tbl`` on bytes), then multiply-add against the kept weights read
straight from memory. Same C ABI and plan keys as the x86 modules, so the numba row runners
of ``cpu_gather``/``cpu_vnni`` call them unchanged. Targets ARMv8.2-A + dotprod (Cortex-A55,
A76 and later, Apple M1+, Graviton 2+, the Raspberry Pi 5): ``+neon,+dotprod``, ``generic``
scheduling.

**float32** (``gemv24_f32_neon(vals, meta, x, out, r0, r1, units, quads, block_units)``; the
plan of ``cpu_gather.prepare`` with the slots in column order: units of 32 input columns,
16 kept weights and one 32-bit metadata word each - field j (bits 2j..2j+1) the in-group
position of kept weight j - rows in interleaved quads, columns in blocks of 2048 inputs).
A unit's 32 inputs are eight q registers (one 2:4 group each). Per row and unit:

* ``dup`` the metadata word, ``ushl .4s`` by ``(2, 0, -2, -4)`` and ``and 0x0c``: byte
  ``4L + k`` holds ``4 * p`` of field ``4k + L`` (every field once, already times 4);
* per 4 kept weights i (groups 2i, 2i+1): ``tbl`` (one register) copies each weight's
  ``4p`` into the 4 bytes of its float lane (:data:`F32_SELECT`), ``orr`` adds the byte
  offsets ``b + 16 * (group - 2i)`` (:data:`F32_OFFSET`), ``tbl`` (two registers: the 8
  inputs of the two groups) gathers the 4 floats, ``fmla`` with the 4 weights from memory.

**INT8 / INT4 weights with INT8 activations** (``gemv24_{int8,int4}_neon(stream, wscale,
corr, xu, xs, out, r0, r1, npairs, tail, nscale, xb_per_q)``; activations from
``cpu_vnni._quantize``: per 256 inputs, ``xu = q + 128``, ``xs`` per block). NEON has no
unsigned x signed dot product before i8mm, so the kernel first turns ``xu`` back into ``q``
(``eor 0x80``, once per call into a stack buffer of ``cols`` bytes) and then uses ``sdot``
(signed x signed, 4 products into each int32 lane, exact): ``corr`` is 0 in this plan. A row
is one byte stream of 64-column chunks: 8 metadata bytes, then the codes in column order
(INT8: 32 bytes; INT4: 16 bytes, byte i = ``c_i & 15 | (c_{16+i} & 15) << 4``, two's
complement nibbles). Per chunk, for each half of 16 kept weights (32 inputs, one 32-bit
metadata word with the field of kept weight j at bit ``8 * (j % 4) + 2 * (j // 4)``,
:data:`A8_FIELD`):

* ``dup`` + ``ushl .4s`` by ``(0, -2, -4, -6)``: byte j holds field j in its low 2 bits;
  ``sli #2`` of ``j // 2`` (the group) makes the ``tbl`` index ``4 * group + p`` in one
  instruction (the junk above bit 1 is shifted over);
* ``tbl`` (two registers: the half's 32 activations) gathers the 16 activations;
* INT8: ``sdot`` with the 16 codes from memory. INT4: ``shl #4`` (low nibbles) and
  ``and 0xf0`` (high nibbles) give ``16 c`` as signed bytes; ``sdot`` sums ``16 c q``
  and the block sum is shifted right by 4 (exact) before the scales.

Each block's int32 sum plus ``corr`` times ``wscale * xs_b`` is added in float (``fmla``).

**Speed: an estimate, not a measurement** (no ARM machine here). Counts from the emitted
assembly (:func:`loop_instruction_counts`: the inner loop bodies, LLVM for ``generic``
AArch64); the model is a Cortex-A76-class core at 2.4 GHz (Raspberry Pi 5, many phones): two
128-bit NEON pipes, ``tbl`` (one or two table registers), ``sdot``, ``fmla`` and logic on
either, shifts (``ushl``, ``sli``, ``shl``) on one of them; two load pipes; and a single core
streaming ~8-12 GB/s from LPDDR4X (assumed, not measured). A dense float32 GEMV is memory
bound at 256 bytes per 64 columns of a row.

* float32, per row and unit (64 bytes of weights + 4 metadata bytes): 18 NEON ops (8 ``tbl``,
  4 ``orr``, 4 ``fmla``, 1 ``ushl``, 1 ``and``) and 5 loads (weights, metadata, and a quarter
  of the quad's 8 x registers): ~9 cycles, ~18 GB/s - memory bound, so up to 256 / 136 =
  ~1.9x the dense float32 GEMV.
* INT8, per 64-column chunk (32 code bytes + 8 metadata bytes): 8 NEON ops (2 ``ushl``,
  2 ``sli``, 2 ``tbl``, 2 ``sdot``; 4 of them shifts) and 6 loads: ~4 cycles, ~24 GB/s -
  memory bound: up to 256 / 40 = ~6x the dense float32 GEMV.
* INT4, per 64-column chunk (16 code bytes + 8 metadata bytes): 10 NEON ops (the INT8 ones
  plus ``shl``, ``and``; 5 shifts) and 5 loads: ~5 cycles, ~11.5 GB/s - at about one core's
  bandwidth, so bound by both: ~10x the dense float32 GEMV (256 / 24 bytes would be 10.7x).

A core that issues the two-register ``tbl`` or ``sdot`` on one pipe only (e.g. the in-order
Cortex-A55) takes about twice the cycles; the float32 and INT4 kernels then run below the
memory bandwidth. :func:`loop_instruction_counts` recomputes the counts from the assembly.

On an AArch64 host the kernels are compiled by :mod:`sparsemerge.kernels.llvm_jit` and run by
the numba row runners (untested here: this machine is x86-64; the arithmetic is tested under
qemu-aarch64, ``tests/kernels/test_kernels_neon.py``).
"""
from __future__ import annotations

import ctypes
import functools
import platform
import re
from typing import Optional

import numpy as np
import torch

from sparsemerge.kernels import cpu_gather, cpu_vnni
from sparsemerge.kernels.layout import BlockedNM, positions_of, unblock
from sparsemerge.kernels.llvm_jit import a8_block_end, f32_row_kernel, merge_declarations

UNIT = cpu_gather.UNIT  # f32: input columns per metadata word (16 kept weights)
BLOCK_UNITS = cpu_gather.BLOCK_UNITS  # f32: units per column block (2048 inputs)
CHUNK = 64  # a8: input columns per chunk (32 kept weights, 8 metadata bytes)
XBLOCK = cpu_vnni.XBLOCK  # a8: inputs per activation scale
TRIPLE = "aarch64-unknown-linux-gnu"
TARGET_CPU = "generic"
TARGET_FEATURES = "+neon,+dotprod"
REQUIRED_FEATURES = ("neon",)  # LLVM feature names of the float32 kernel
DOTPROD_FEATURES = ("neon", "dotprod")  # of the INT8-activation kernels
F32_NAME = "gemv24_f32_neon"
A8_NAMES = {"int8": "gemv24_int8_neon", "int4": "gemv24_int4_neon"}


def _vec(values, ty: str) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# ---------------------------------------------------------------- float32 constants
F32_SHIFTS = (2, 0, -2, -4)  # ushl .4s: lane L = word >> (2L - 2), bits 2-3 of byte k = field 4k + L
# tbl index of output byte (lane t, byte b) of weights 4i..4i+3: the byte 4t + i that holds 4 * field (4i + t)
F32_SELECT = [[4 * (j // 4) + i for j in range(16)] for i in range(4)]
F32_OFFSET = [j % 4 + 16 * (j // 8) for j in range(16)]  # byte b of the float, + 16 for the second group


# ---------------------------------------------------------------- a8 constants
A8_SHIFTS = (0, -2, -4, -6)  # ushl .4s: lane L = word >> 2L
# bit of the 32-bit word that holds the field of kept weight j (0..15 of the half): byte j = 4L + k
A8_FIELD = np.array([8 * (j % 4) + 2 * (j // 4) for j in range(16)])
A8_GROUP = [j // 2 for j in range(16)]  # sli #2 of this: the tbl index 4 * group + p


# ---------------------------------------------------------------- float32 kernel
_F32_ROW_STEP = """
  %mo{k} = add i64 %mbase, {k}
  %mp{k} = getelementptr i32, ptr %meta, i64 %mo{k}
  %m{k} = load i32, ptr %mp{k}, align 4
  %m1{k} = insertelement <4 x i32> poison, i32 %m{k}, i32 0
  %mv{k} = shufflevector <4 x i32> %m1{k}, <4 x i32> poison, <4 x i32> zeroinitializer
  %ms{k} = call <4 x i32> @llvm.aarch64.neon.ushl.v4i32(<4 x i32> %mv{k}, <4 x i32> SHIFTS)
  %mb{k} = bitcast <4 x i32> %ms{k} to <16 x i8>
  %mc{k} = and <16 x i8> %mb{k}, TWELVE
  %wo{k} = mul i64 %mo{k}, 16
  %wp{k} = getelementptr float, ptr %vals, i64 %wo{k}
"""
_F32_QUARTER = """
  %s{k}{i} = call <16 x i8> @llvm.aarch64.neon.tbl1.v16i8(<16 x i8> %mc{k}, <16 x i8> SELECT{i})
  %ix{k}{i} = or <16 x i8> %s{k}{i}, OFFSET
  %g{k}{i} = call <16 x i8> @llvm.aarch64.neon.tbl2.v16i8(<16 x i8> %xb{2i}, <16 x i8> %xb{2i1}, <16 x i8> %ix{k}{i})
  %gf{k}{i} = bitcast <16 x i8> %g{k}{i} to <4 x float>
  %wq{k}{i} = getelementptr float, ptr %wp{k}, i64 {4i}
  %w{k}{i} = load <4 x float>, ptr %wq{k}{i}, align 4
  %a{k}{i1} = call <4 x float> @llvm.fma.v4f32(<4 x float> %gf{k}{i}, <4 x float> %w{k}{i}, <4 x float> %a{k}{i})
"""
_F32_ROW_END = """
  %tot{k} = call reassoc float @llvm.vector.reduce.fadd.v4f32(float 0.0, <4 x float> %a{k}0)
  %ro{k} = add i64 %r, {k}
  %op{k} = getelementptr float, ptr %out, i64 %ro{k}
  %old{k} = load float, ptr %op{k}
  %prev{k} = select i1 %first, float 0.0, float %old{k}
  %new{k} = fadd float %prev{k}, %tot{k}
  store float %new{k}, ptr %op{k}
"""
_F32_PHI = """
  %a{k}0 = phi <4 x float> [ zeroinitializer, %quadbody ], [ %a{k}4, %unitbody ]
"""
_F32_X = """
  %xp{j} = getelementptr float, ptr %xu0, i64 {4j}
  %xf{j} = load <4 x float>, ptr %xp{j}, align 4
  %xb{j} = bitcast <4 x float> %xf{j} to <16 x i8>
"""

_F32_IR = """
declare <4 x i32> @llvm.aarch64.neon.ushl.v4i32(<4 x i32>, <4 x i32>)
declare <16 x i8> @llvm.aarch64.neon.tbl1.v16i8(<16 x i8>, <16 x i8>)
declare <16 x i8> @llvm.aarch64.neon.tbl2.v16i8(<16 x i8>, <16 x i8>, <16 x i8>)
declare <4 x float> @llvm.fma.v4f32(<4 x float>, <4 x float>, <4 x float>)
declare float @llvm.vector.reduce.fadd.v4f32(float, <4 x float>)

"""


def _f32_ir() -> str:
    xloads = "  %xu0 = getelementptr float, ptr %x, i64 %xo\n" + "".join(
        _F32_X.replace("{4j}", str(4 * j)).replace("{j}", str(j)) for j in range(8))
    rows = []
    for k in range(4):
        step = _F32_ROW_STEP
        for i in range(4):
            step += (_F32_QUARTER.replace("{2i1}", str(2 * i + 1)).replace("{2i}", str(2 * i))
                     .replace("{4i}", str(4 * i)).replace("{i1}", str(i + 1)).replace("{i}", str(i)))
        rows.append(step.replace("{k}", str(k)))
    # the shared loop nest (llvm_jit.F32_ROW_KERNEL, cpu_gather.py's layout, slots in column order)
    ir = _F32_IR + f32_row_kernel("gemv24_f32_neon", "".join(_F32_PHI.replace("{k}", str(k)) for k in range(4)),
                                  xloads, "".join(rows), "".join(_F32_ROW_END.replace("{k}", str(k)) for k in range(4)))
    for i in range(4):
        ir = ir.replace(f"SELECT{i}", _vec(F32_SELECT[i], "i8"))
    return (ir.replace("SHIFTS", _vec(F32_SHIFTS, "i32")).replace("TWELVE", _vec([12] * 16, "i8"))
            .replace("OFFSET", _vec(F32_OFFSET, "i8")))


# ---------------------------------------------------------------- INT8 / INT4 kernels
# one half (16 kept weights, 32 inputs) of chunk %k: index, gather, dot
_A8_HALF = """
  %mp{h} = getelementptr i8, ptr %cp, i64 {4h}
  %m{h} = load i32, ptr %mp{h}, align 1
  %m1{h} = insertelement <4 x i32> poison, i32 %m{h}, i32 0
  %mv{h} = shufflevector <4 x i32> %m1{h}, <4 x i32> poison, <4 x i32> zeroinitializer
  %ms{h} = call <4 x i32> @llvm.aarch64.neon.ushl.v4i32(<4 x i32> %mv{h}, <4 x i32> SHIFTS)
  %mb{h} = bitcast <4 x i32> %ms{h} to <16 x i8>
  %ix{h} = call <16 x i8> @llvm.aarch64.neon.vsli.v16i8(<16 x i8> %mb{h}, <16 x i8> GROUPS, i32 2)
  %xp{h} = getelementptr i8, ptr %xk, i64 {32h}
  %xq{h} = getelementptr i8, ptr %xp{h}, i64 16
  %xa{h} = load <16 x i8>, ptr %xp{h}, align 1
  %xb{h} = load <16 x i8>, ptr %xq{h}, align 1
  %sel{h} = call <16 x i8> @llvm.aarch64.neon.tbl2.v16i8(<16 x i8> %xa{h}, <16 x i8> %xb{h}, <16 x i8> %ix{h})
  %accn{h} = call <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32> %acc{h}, <16 x i8> %sel{h}, <16 x i8> %w{h})
"""
_A8_INT8_W = """
  %wp0 = getelementptr i8, ptr %cp, i64 8
  %wp1 = getelementptr i8, ptr %cp, i64 24
  %w0 = load <16 x i8>, ptr %wp0, align 1
  %w1 = load <16 x i8>, ptr %wp1, align 1
"""
_A8_INT4_W = """
  %wp = getelementptr i8, ptr %cp, i64 8
  %wn = load <16 x i8>, ptr %wp, align 1
  %w0 = shl <16 x i8> %wn, FOUR
  %w1 = and <16 x i8> %wn, HIGH
"""

_A8_IR = """
declare <4 x i32> @llvm.aarch64.neon.ushl.v4i32(<4 x i32>, <4 x i32>)
declare <16 x i8> @llvm.aarch64.neon.vsli.v16i8(<16 x i8>, <16 x i8>, i32)
declare <16 x i8> @llvm.aarch64.neon.tbl2.v16i8(<16 x i8>, <16 x i8>, <16 x i8>)
declare <4 x i32> @llvm.aarch64.neon.sdot.v4i32.v16i8(<4 x i32>, <16 x i8>, <16 x i8>)
declare <4 x float> @llvm.fma.v4f32(<4 x float>, <4 x float>, <4 x float>)
declare float @llvm.vector.reduce.fadd.v4f32(float, <4 x float>)

; out[r] = sum_b wscale[r, b / xb_per_q] * xs[b] * (corr[r, b] + sum over block b of q * c)
; row r: 2 * npairs + tail chunks of CHUNK_BYTES bytes (8 metadata bytes, then the codes);
; q = xu ^ 0x80 is made once per call in a stack buffer of 64 bytes per chunk
define void @NAME(ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out,
                  i64 %r0, i64 %r1, i64 %npairs, i64 %tail, i64 %nscale, i64 %xb_per_q) {
entry:
  %n2 = shl i64 %npairs, 1
  %nch = add i64 %n2, %tail
  %nch3 = add i64 %nch, 3
  %nxb = lshr i64 %nch3, 2
  %rstride = mul i64 %nch, CHUNK_BYTES
  %nvec = shl i64 %nch, 2
  %qbytes = shl i64 %nch, 6
  %qbuf = alloca i8, i64 %qbytes, align 16
  br label %convloop
convloop:
  %ci = phi i64 [ 0, %entry ], [ %cinext, %convbody ]
  %cdone = icmp uge i64 %ci, %nvec
  br i1 %cdone, label %rowloop, label %convbody
convbody:
  %co = shl i64 %ci, 4
  %cup = getelementptr i8, ptr %xu, i64 %co
  %cqp = getelementptr i8, ptr %qbuf, i64 %co
  %cu = load <16 x i8>, ptr %cup, align 1
  %cq = xor <16 x i8> %cu, SIGNBIT
  store <16 x i8> %cq, ptr %cqp, align 16
  %cinext = add i64 %ci, 1
  br label %convloop
rowloop:
  %r = phi i64 [ %r0, %convloop ], [ %rnext, %rowend ]
  %rdone = icmp uge i64 %r, %r1
  br i1 %rdone, label %exit, label %rowbody
rowbody:
  %rowo = mul i64 %r, %rstride
  %rowp = getelementptr i8, ptr %stream, i64 %rowo
  %cro = mul i64 %r, %nxb
  %crow = getelementptr i32, ptr %corr, i64 %cro
  %sro = mul i64 %r, %nscale
  %srow = getelementptr float, ptr %wscale, i64 %sro
  br label %xbloop
xbloop:
  %xb = phi i64 [ 0, %rowbody ], [ %xbnext, %xbend ]
  %accf = phi <4 x float> [ zeroinitializer, %rowbody ], [ %accf2, %xbend ]
  %q = phi i64 [ 0, %rowbody ], [ %qnext, %xbend ]
  %qc = phi i64 [ 0, %rowbody ], [ %qcnext, %xbend ]
  %xbdone = icmp uge i64 %xb, %nxb
  br i1 %xbdone, label %rowend, label %xbbody
xbbody:
  %k0 = shl i64 %xb, 2
  %kend0 = add i64 %k0, 4
  %kshort = icmp ult i64 %nch, %kend0
  %kend = select i1 %kshort, i64 %nch, i64 %kend0
  br label %chunkloop
chunkloop:
  %k = phi i64 [ %k0, %xbbody ], [ %knext, %chunkbody ]
  %acc0 = phi <4 x i32> [ zeroinitializer, %xbbody ], [ %accn0, %chunkbody ]
  %acc1 = phi <4 x i32> [ zeroinitializer, %xbbody ], [ %accn1, %chunkbody ]
  %kdone = icmp uge i64 %k, %kend
  br i1 %kdone, label %xbend, label %chunkbody
chunkbody:
  %ko = mul i64 %k, CHUNK_BYTES
  %cp = getelementptr i8, ptr %rowp, i64 %ko
  %xo = shl i64 %k, 6
  %xk = getelementptr i8, ptr %qbuf, i64 %xo
WEIGHTS
HALVES
  %knext = add i64 %k, 1
  br label %chunkloop
xbend:
  %accs = add <4 x i32> %acc0, %acc1
WIDEN
  %cp2 = getelementptr i32, ptr %crow, i64 %xb
  %cv = load i32, ptr %cp2, align 4
  %cvv = insertelement <4 x i32> zeroinitializer, i32 %cv, i32 0
  %acci = add <4 x i32> %acc32, %cvv
A8_BLOCK_END
"""


def chunk_bytes(codec: str) -> int:
    return 8 + (32 if codec == "int8" else 16)


def _a8_ir(name: str, codec: str) -> str:
    halves = "".join(_A8_HALF.replace("{4h}", str(4 * h)).replace("{32h}", str(32 * h)).replace("{h}", str(h))
                     for h in range(2))
    # INT4: the codes are 16 c; every term of the sum is a multiple of 16, so the shift is exact
    widen = ("  %acc32 = add <4 x i32> %accs, zeroinitializer" if codec == "int8"
             else "  %acc32 = ashr <4 x i32> %accs, <i32 4, i32 4, i32 4, i32 4>")
    ir = (_A8_IR.replace("NAME", name).replace("WEIGHTS", _A8_INT8_W if codec == "int8" else _A8_INT4_W)
          .replace("HALVES", halves).replace("WIDEN", widen).replace("CHUNK_BYTES", str(chunk_bytes(codec))))
    for key, value in (("SHIFTS", _vec(A8_SHIFTS, "i32")), ("GROUPS", _vec(A8_GROUP, "i8")),
                       ("SIGNBIT", _vec([-128] * 16, "i8")), ("FOUR", _vec([4] * 16, "i8")),
                       ("HIGH", _vec([-16] * 16, "i8"))):
        ir = ir.replace(key, value)
    return ir.replace("A8_BLOCK_END", a8_block_end(4))


def module_ir() -> str:
    """The LLVM IR of the three kernels (one module; repeated declarations merged)."""
    return merge_declarations("\n".join([_f32_ir()] + [_a8_ir(A8_NAMES[c], c) for c in ("int8", "int4")]))


# ---------------------------------------------------------------- cross compilation (any host)
def aarch64_unavailable_reason() -> Optional[str]:
    """None when this llvmlite can generate AArch64 code; else why not."""
    try:
        import llvmlite.binding as llvm

        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()
        llvm.Target.from_triple(TRIPLE)
        return None
    except Exception as exc:  # noqa: BLE001 - any failure: no AArch64 backend here
        return f"llvmlite has no AArch64 target: {exc}"


def _target_machine():
    import llvmlite.binding as llvm

    reason = aarch64_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    return llvm.Target.from_triple(TRIPLE).create_target_machine(
        cpu=TARGET_CPU, features=TARGET_FEATURES, opt=3, reloc="pic")


def _module():
    import llvmlite.binding as llvm

    module = llvm.parse_assembly(module_ir())
    module.triple = TRIPLE
    module.verify()
    return module


def emit_object() -> bytes:
    """An AArch64 ELF object file (for linking into a harness) defining ``gemv24_f32_neon``,
    ``gemv24_int8_neon`` and ``gemv24_int4_neon``."""
    return _target_machine().emit_object(_module())


def emit_assembly() -> str:
    """The AArch64 assembly of the three kernels."""
    return _target_machine().emit_assembly(_module())


def loop_instruction_counts(asm: Optional[str] = None) -> dict:
    """``{kernel: {mnemonic: count}}`` of the innermost loop holding a ``tbl`` (the lines from a
    label to the backward branch to it) of each kernel: the inner loop the estimate in the
    module docstring counts. For the float32 kernel that is one unit of a quad (4 rows x 64
    bytes of weights); for INT8/INT4 one 64-column chunk (32 / 16 bytes of codes)."""
    asm = asm or emit_assembly()
    out = {}
    for name in [F32_NAME, *A8_NAMES.values()]:
        body = asm.split(f"\n{name}:", 1)[1].split(".Lfunc_end", 1)[0]
        lines = [ln.strip() for ln in body.splitlines()]
        labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.?L\w+:$", ln)}
        best = None
        for i, ln in enumerate(lines):
            m = re.match(r"^b(?:\.\w+)?\s+(\.?L\w+)$", ln) or re.match(r"^(?:cbn?z|tbn?z)\s+.*,\s*(\.?L\w+)$", ln)
            if m and m.group(1) in labels and labels[m.group(1)] < i:
                span = lines[labels[m.group(1)] + 1: i + 1]
                if any(s.startswith("tbl") for s in span) and (best is None or len(span) < len(best)):
                    best = span
        counts: dict = {}
        for ln in best or []:
            if not ln or ln.endswith(":") or ln.startswith((".", "//", ";")):
                continue
            op = ln.split()[0]
            counts[op] = counts.get(op, 0) + 1
        out[name] = counts
    return out


# ---------------------------------------------------------------- native use (AArch64 hosts)
F32_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 4), *([ctypes.c_int64] * 5))
A8_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 6), *([ctypes.c_int64] * 6))


def cpu_features_missing(dotprod: bool = False) -> list[str]:
    """What the host lacks for these kernels (on x86: everything)."""
    from sparsemerge.kernels.llvm_jit import features_missing

    return features_missing(DOTPROD_FEATURES if dotprod else REQUIRED_FEATURES)


@functools.lru_cache(maxsize=None)
def _compiled_fns() -> tuple[Optional[dict], Optional[str]]:
    """({"f32" | "int8" | "int4": ctypes function}, None) or (None, reason); AArch64 only.
    (The dotprod kernels need the host's dotprod; ``a8_unavailable_reason`` checks it.)"""
    if platform.machine().lower() not in ("aarch64", "arm64"):
        return None, f"not an AArch64 host ({platform.machine()})"
    try:
        from sparsemerge.kernels.llvm_jit import compile_functions

        sigs = {F32_NAME: F32_PROTO, **{n: A8_PROTO for n in A8_NAMES.values()}}
        fns = compile_functions(module_ir(), sigs, cpu=TARGET_CPU, features=TARGET_FEATURES)
        return {"f32": fns[F32_NAME], **{c: fns[n] for c, n in A8_NAMES.items()}}, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the NEON kernels: {exc}"


def compiled_functions() -> dict:
    """``{"f32": fn, "int8": fn, "int4": fn}``: the raw ctypes functions with the ABI of the
    x86 modules (see the module docstring) on :func:`prepare_f32` / :func:`prepare_a8`'s plans.
    AArch64 hosts only; raises RuntimeError elsewhere."""
    fns, reason = _compiled_fns()
    if fns is None:
        raise RuntimeError(reason)
    return fns


@functools.lru_cache(maxsize=None)
def _runners() -> dict:
    fns = compiled_functions()
    out = {c: cpu_vnni._row_runner(fns[c]) for c in ("int8", "int4")}
    out["f32"] = cpu_gather._row_runner(fns["f32"])
    return out


def f32_unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when the float32 kernel can run ``layer`` at batch 1 on this host; else why not."""
    if not layer.is_24:
        return f"{layer.n}:{layer.m} is not 2:4"
    if layer.codec != "none" or layer.values.dtype != torch.float32:
        return "values are not float32"
    if layer.cols % UNIT:
        return f"input features {layer.cols} are not a multiple of {UNIT}"
    return _compiled_fns()[1]


def a8_unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when the INT8-activation kernel can run ``layer`` at batch 1 on this host."""
    reason = cpu_vnni.layout_reason(layer) or _compiled_fns()[1]
    if reason is None and cpu_features_missing(True):
        reason = f"the CPU lacks {', '.join(cpu_features_missing(True))}"
    return reason


# ---------------------------------------------------------------- plans (any host)
def prepare_f32(layer: BlockedNM) -> dict:
    """``cpu_gather.prepare``'s plan ("vals", "meta", "units", "nbytes") with the slots in
    column order; cached in ``layer.extra["neon_f32_plan"]``."""
    return cpu_gather.prepare(layer, None, "neon_f32_plan")


def prepare_a8(layer: BlockedNM) -> dict:
    """The INT8/INT4 plan, cached in ``layer.extra["neon_a8_plan"]``: "stream" (rows, chunks *
    (8 + 32 | 16)) bytes - per 64-column chunk two 32-bit metadata words (kept weights 0-15,
    16-31; :data:`A8_FIELD`) and the codes in column order (INT4: byte i = ``c_i & 15 |
    (c_{16+i} & 15) << 4``); "scale" (rows, nscale) float32; "corr" (rows, blocks of 256)
    int32, 0 (the kernel's dot is over q itself); "npairs" = cols // 128 and "tail" =
    (cols % 128) // 64; "nscale"; "xb_per_q" (256-input blocks per scale group); "nbytes"."""
    plan = layer.extra.get("neon_a8_plan")
    if plan is not None:
        return plan
    reason = cpu_vnni.layout_reason(layer)
    if reason:
        raise ValueError(f"the NEON INT8-activation kernels cannot run this layer: {reason}")
    rows, cols = layer.rows, layer.cols
    nch = cols // CHUNK
    pos = positions_of(layer).cpu().numpy().reshape(rows, nch, 2, 16).astype(np.uint32)
    meta = np.zeros((rows, nch, 2), np.uint32)
    for j in range(16):
        meta |= pos[..., j] << np.uint32(A8_FIELD[j])
    v = unblock(layer.values, rows).cpu().to(torch.int16)
    if layer.codec == "int4":  # layout: two unsigned codes per byte, low nibble first, zero point 8
        v = torch.stack([v & 15, (v & 255) >> 4], -1).reshape(rows, -1) - 8
    c = v.reshape(rows, nch, 32).numpy()  # signed codes, column order
    if layer.codec == "int8":
        w = c.astype(np.int8).view(np.uint8)
    else:
        n = (c & 15).astype(np.uint8)
        w = n[:, :, :16] | (n[:, :, 16:] << 4)
    stream = np.concatenate([meta.view(np.uint8).reshape(rows, nch, 8), w], 2).reshape(rows, -1)
    nxb = -(-cols // XBLOCK)
    scale = unblock(layer.scale, rows).cpu().float().contiguous().numpy()
    xb_per_q = nxb if layer.group_size is None else (4 * layer.groups_per_scale) // XBLOCK
    plan = {
        "stream": np.ascontiguousarray(stream),
        "scale": np.ascontiguousarray(scale),
        "corr": np.zeros((rows, nxb), np.int32),
        "npairs": cols // 128,
        "tail": (cols % 128) // CHUNK,
        "nscale": scale.shape[1],
        "xb_per_q": max(1, xb_per_q),
    }
    plan["nbytes"] = sum(plan[k].nbytes for k in ("stream", "scale", "corr"))
    layer.extra["neon_a8_plan"] = plan
    return plan


# ---------------------------------------------------------------- runners (AArch64 hosts; untested here)
def f32_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x (1, cols)`` float32 -> ``(1, rows)`` with the numba row runner of ``cpu_gather``."""
    cached = layer.extra.get("neon_f32_runner")
    if cached is None:
        cached = layer.extra["neon_f32_runner"] = (_runners()["f32"], prepare_f32(layer))
    run, plan = cached
    rows = layer.rows
    return torch.from_numpy(run(plan["vals"], plan["meta"], x.numpy(), rows, plan["units"],
                                threads if rows >= 128 * threads else 1))


def a8_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> Optional[torch.Tensor]:
    """``x (1, cols)`` float32 -> ``(1, rows)`` with INT8 activations (``cpu_vnni``'s row
    runner); None when ``x`` holds NaN or infinity (the caller takes a float row)."""
    cached = layer.extra.get("neon_a8_runner")
    if cached is None:
        plan = prepare_a8(layer)
        args = (plan["stream"], plan["scale"], plan["corr"], layer.rows, plan["npairs"], plan["tail"],
                plan["nscale"], plan["xb_per_q"])
        cached = layer.extra["neon_a8_runner"] = (_runners()[layer.codec], args)
    run, args = cached
    out = run(*args[:3], x.numpy(), *args[3:], threads if layer.rows >= 128 * threads else 1)
    return torch.from_numpy(out) if out.size else None
