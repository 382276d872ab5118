"""2:4 float32 / INT8 / INT4 at batch 1 with AVX2 + FMA (Haswell, Zen 1-3; no AVX-512).

The same idea as the AVX-512 kernels (``cpu_gather.py``, ``cpu_vnni.py``): never expand the
weights to their columns, gather the inputs the kept weights need from their 2-bit in-group
positions, then multiply-add against the kept weights read straight from memory. AVX2 has no
two-register permutes and no ``vpmultishiftqb``, so the gathers are in-lane:

**float32** (``gemv24_f32_avx2``; the layout of ``cpu_gather.prepare`` - units of 32 input
columns, 16 kept weights and one 32-bit metadata word each, rows in interleaved quads, columns
in blocks of 2048 inputs so x stays in L1 - with the slots reordered). A unit's 32 inputs are
four ymm registers ``xA..xD`` of 8 (two groups of 4 each, one per 128-bit lane). The
metadata word is broadcast and shifted right by ``2j`` per dword (``vpsrlvd``); ``vpermilps``
reads only the low 2 bits of each dword, so that is already the in-lane index. Kept-weight
slot order in a ymm: ``[gA0 gA1 gC0 gC1 | gB0 gB1 gD0 gD1]`` for the groups A, B (``xA``'s two
lanes) and C, D (``xB``'s): ``vpermilps(xA)`` fills slots 0,1,4,5, ``vpermilps(xB)`` slots
2,3,6,7, one ``vblendps`` joins them and one ``vfmadd231ps`` takes the 8 weights from memory.
Per 64 bytes of weights: 1 broadcast, 2 shifts, 4 permutes, 2 blends, 2 FMAs; one accumulator
per row, four independent ones per quad (eight spilled two of them to the stack: AVX2 has 16
ymm registers, and the four x registers stay live across the quad).

**INT8 / INT4 with INT8 activations** (``gemv24_{int8,int4}_avx2``; the C signature and plan
keys of ``cpu_vnni.py``, and the same activations: ``cpu_vnni._quantize``, per 256 inputs,
``xu = q + 128``, ``xs`` per block). A row is one byte stream of 64-column chunks, each 8
metadata bytes then the weights (32 INT8 bytes, or 16 INT4 bytes: byte i = code of slot i |
code of slot 16+i << 4, stored as ``c + 8``). Per chunk:

* index: ``vpbroadcastq`` of the 64 metadata bits, ``vpsrlvd`` by ``(0,0,2,2,4,4,6,6)`` puts
  slot j's field (:data:`A8_FIELD`) in the low 2 bits of byte j; ``and 3``, ``or`` the group's
  offset in its 16-byte lane (4 * group) - the ``vpshufb`` index;
* two ``vpshufb`` over the chunk's 64 activation bytes (two ymm, four 16-byte lanes) and one
  ``vpblendd`` give the 32 activations of the 32 kept weights (:data:`A8_ORDER`);
* INT8: ``vpmaddubsw`` multiplies unsigned by signed bytes and saturates int16 pair sums
  (255 * 127 * 2 > 32767), so - as llama.cpp's AVX2 path - it takes ``|c|`` (unsigned) times
  ``sign(c) * q`` (``vpsignb``, q = xu ^ 0x80): pairs <= 2 * 127 * 127 = 32258, exact; then
  ``vpmaddwd`` by ones to int32. ``corr`` is 0 (the dot is over q itself);
* INT4: codes ``c`` in [-8, 7] (``vpsrlvq`` + and + sub from the nibbles): ``vpmaddubsw(xu, c)``
  pairs <= 2 * 255 * 8 = 4080, so four chunks (a 256-input block) add in int16 (<= 16320) and
  one ``vpmaddwd`` per block widens them; ``sum c * xu = sum c * q + 128 * sum c``, and
  ``corr = -128 * sum c`` per block (as in ``cpu_vnni.py``) starts the block's sum.

Each block's int32 sum times ``wscale * xs_b`` is added in float (FMA). With AVX-VNNI (the
VEX ``vpdpbusd``, Alder Lake / Zen 5) the ``*_avxvnni`` variants replace ``vpmaddubsw`` +
``vpmaddwd`` + ``vpaddd`` by one instruction, on the same plan.

The modules are compiled for ``x86-64-v3`` (``+avxvnni`` for the variant), not the host, so
they are AVX2 code on an AVX-512 machine too - which is how the tests run them everywhere.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import numpy as np
import torch

from sparsemerge.kernels import cpu_gather, cpu_vnni
from sparsemerge.kernels.layout import BlockedNM, positions_of, unblock
from sparsemerge.kernels.llvm_jit import a8_block_end, compile_functions, f32_row_kernel, features_missing

UNIT = cpu_gather.UNIT  # f32: input columns per metadata word (16 kept weights)
BLOCK_UNITS = cpu_gather.BLOCK_UNITS  # f32: units per column block (2048 inputs in L1)
CHUNK = 64  # a8: input columns per chunk (32 kept weights)
XBLOCK = cpu_vnni.XBLOCK  # a8: inputs per activation scale
REQUIRED_FEATURES = ("avx2", "fma")  # LLVM feature names (x86-64-v3 also has f16c, bmi2)
VNNI_FEATURES = REQUIRED_FEATURES + ("avxvnni",)
TARGET_CPU = "x86-64-v3"
# a8: software prefetch this many bytes ahead of the chunk being read (0: none). On a Zen 3
# the hardware prefetcher alone left the kernel at DRAM latency (compute and the loads did not
# overlap); benchmarks/bench_prefetch.py measures the distances.
A8_PREFETCH_BYTES = 4096
# per vnni (the AVX-VNNI variants): 4096 too, measured on a Zen 5 (SmolLM2 2:4 decoding 1.23-1.31x
# INT4 g128, 1.05-1.14x INT8 against none, BENCHMARKS.md)
A8_PREFETCH_DEFAULT = {False: A8_PREFETCH_BYTES, True: A8_PREFETCH_BYTES}
F32_PREFETCH_BYTES = 0  # the float32 kernel's (weights and metadata streams)


def _vec(values, ty: str) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# ---------------------------------------------------------------- slot orders
def _f32_order() -> np.ndarray:
    """Kept weight (0..15, column order within the unit) held by each of the 16 slots."""
    order = []
    for j in range(16):
        half, k = divmod(j, 8)
        lane, i = divmod(k, 4)
        group = 4 * half + lane + 2 * (i // 2)
        order.append(2 * group + i % 2)
    return np.array(order)


F32_ORDER = _f32_order()


def _a8_order() -> np.ndarray:
    """Kept weight (0..31, column order within the chunk) whose activation lands in byte j of
    the blended ``vpshufb`` result: lane L = j // 16, 8-byte half h; bytes 0-7 of a lane come
    from the first 32 inputs of the chunk (lane L: inputs 16L..16L+15), bytes 8-15 from the
    second 32 (inputs 32+16L..)."""
    order = []
    for j in range(32):
        lane, jl = divmod(j, 16)
        half, s8 = divmod(jl, 8)
        group = 4 * (lane + 2 * half) + s8 // 2
        order.append(2 * group + s8 % 2)
    return np.array(order)


A8_ORDER = _a8_order()
_A8_SHIFTS = [0, 0, 2, 2, 4, 4, 6, 6]  # vpsrlvd per dword
# bit offset in the 64 metadata bits of slot j's 2-bit field: dword k = j // 4 reads the low
# (k even) or high (k odd) 32 bits shifted by _A8_SHIFTS[k]; byte j % 4 of it starts 8 bits up
A8_FIELD = np.array([32 * ((j // 4) % 2) + 8 * (j % 4) + _A8_SHIFTS[j // 4] for j in range(32)])
_A8_BASE = _vec([4 * ((j % 8) // 2) for j in range(32)], "i8")  # the group's first input in its lane

# ---------------------------------------------------------------- float32 kernel
_F32_ROW_STEP = """
  %mo{k} = add i64 %mbase, {k}
  %mp{k} = getelementptr i32, ptr %meta, i64 %mo{k}
  %m{k} = load i32, ptr %mp{k}, align 4
  %m1{k} = insertelement <8 x i32> poison, i32 %m{k}, i32 0
  %mv{k} = shufflevector <8 x i32> %m1{k}, <8 x i32> poison, <8 x i32> zeroinitializer
  %i0{k} = lshr <8 x i32> %mv{k}, SHIFT0
  %i1{k} = lshr <8 x i32> %mv{k}, SHIFT1
  %pa0{k} = call <8 x float> @llvm.x86.avx.vpermilvar.ps.256(<8 x float> %xa, <8 x i32> %i0{k})
  %pb0{k} = call <8 x float> @llvm.x86.avx.vpermilvar.ps.256(<8 x float> %xb, <8 x i32> %i0{k})
  %pa1{k} = call <8 x float> @llvm.x86.avx.vpermilvar.ps.256(<8 x float> %xc, <8 x i32> %i1{k})
  %pb1{k} = call <8 x float> @llvm.x86.avx.vpermilvar.ps.256(<8 x float> %xd, <8 x i32> %i1{k})
  %s0{k} = shufflevector <8 x float> %pa0{k}, <8 x float> %pb0{k}, <8 x i32> BLEND
  %s1{k} = shufflevector <8 x float> %pa1{k}, <8 x float> %pb1{k}, <8 x i32> BLEND
  %wo{k} = mul i64 %mo{k}, 16
  %wp{k} = getelementptr float, ptr %vals, i64 %wo{k}
  %wq{k} = getelementptr float, ptr %wp{k}, i64 8
  %w0{k} = load <8 x float>, ptr %wp{k}, align 4
  %w1{k} = load <8 x float>, ptr %wq{k}, align 4
  %an{k} = call <8 x float> @llvm.fma.v8f32(<8 x float> %s0{k}, <8 x float> %w0{k}, <8 x float> %a{k})
  %bn{k} = call <8 x float> @llvm.fma.v8f32(<8 x float> %s1{k}, <8 x float> %w1{k}, <8 x float> %an{k})
"""
# DISTANCE bytes ahead in the weight stream (each row step reads one 64-byte line of it) and
# the same time ahead in the metadata stream (4 bytes per 64 of weights)
_F32_PREFETCH = """
  %pf{k} = getelementptr i8, ptr %wp{k}, i64 DISTANCE
  call void @llvm.prefetch.p0(ptr %pf{k}, i32 0, i32 3, i32 1)
"""
_F32_META_PREFETCH = """
  %pfm = getelementptr i8, ptr %mp0, i64 MDISTANCE
  call void @llvm.prefetch.p0(ptr %pfm, i32 0, i32 3, i32 1)
"""
_F32_ROW_END = """
  %tot{k} = call reassoc float @llvm.vector.reduce.fadd.v8f32(float 0.0, <8 x float> %a{k})
  %ro{k} = add i64 %r, {k}
  %op{k} = getelementptr float, ptr %out, i64 %ro{k}
  %old{k} = load float, ptr %op{k}
  %prev{k} = select i1 %first, float 0.0, float %old{k}
  %new{k} = fadd float %prev{k}, %tot{k}
  store float %new{k}, ptr %op{k}
"""
_F32_PHI = """
  %a{k} = phi <8 x float> [ zeroinitializer, %quadbody ], [ %bn{k}, %unitbody ]
"""

_F32_IR = """
declare <8 x float> @llvm.x86.avx.vpermilvar.ps.256(<8 x float>, <8 x i32>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)

"""
# the unit's 32 inputs as four 8-float vectors (the in-lane vpermilps tables); the layout
# is cpu_gather.py's with the slots in F32_ORDER
_F32_XLOADS = """
  %xap = getelementptr float, ptr %x, i64 %xo
  %xbp = getelementptr float, ptr %xap, i64 8
  %xcp = getelementptr float, ptr %xap, i64 16
  %xdp = getelementptr float, ptr %xap, i64 24
  %xa = load <8 x float>, ptr %xap, align 4
  %xb = load <8 x float>, ptr %xbp, align 4
  %xc = load <8 x float>, ptr %xcp, align 4
  %xd = load <8 x float>, ptr %xdp, align 4
"""


def _f32_ir(prefetch: int = 0) -> str:
    def each(t: str) -> str:
        return "".join(t.replace("{k}", str(k)) for k in range(4))

    steps = each(_F32_ROW_STEP)
    if prefetch > 0:
        steps += each(_F32_PREFETCH.replace("DISTANCE", str(prefetch)))
        steps += _F32_META_PREFETCH.replace("MDISTANCE", str(max(64, prefetch // 16)))
    ir = _F32_IR + f32_row_kernel("gemv24_f32_avx2", each(_F32_PHI), _F32_XLOADS, steps, each(_F32_ROW_END))
    return (ir.replace("SHIFT0", _vec([2 * j for j in range(8)], "i32"))
            .replace("SHIFT1", _vec([2 * j for j in range(8, 16)], "i32"))
            .replace("BLEND", _vec([0, 1, 10, 11, 4, 5, 14, 15], "i32")))


# ---------------------------------------------------------------- INT8 / INT4 kernels
_A8_INDEX = """
  %cp = getelementptr i8, ptr %rowp, i64 %ko
  %m64 = load i64, ptr %cp, align 1
  %mv0 = insertelement <4 x i64> poison, i64 %m64, i32 0
  %mv = shufflevector <4 x i64> %mv0, <4 x i64> poison, <4 x i32> zeroinitializer
  %md = bitcast <4 x i64> %mv to <8 x i32>
  %ms = lshr <8 x i32> %md, A8SHIFTS
  %mb = bitcast <8 x i32> %ms to <32 x i8>
  %ma = and <32 x i8> %mb, THREE
  %ix = or <32 x i8> %ma, BASE
  %xo = mul i64 %k, 64
  %xap = getelementptr i8, ptr %xu, i64 %xo
  %xbp = getelementptr i8, ptr %xap, i64 32
  %xlo = load <32 x i8>, ptr %xap, align 1
  %xhi = load <32 x i8>, ptr %xbp, align 1
  %sa = call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> %xlo, <32 x i8> %ix)
  %sb = call <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8> %xhi, <32 x i8> %ix)
  %sad = bitcast <32 x i8> %sa to <8 x i32>
  %sbd = bitcast <32 x i8> %sb to <8 x i32>
  %seld = shufflevector <8 x i32> %sad, <8 x i32> %sbd, <8 x i32> BLEND
  %sel = bitcast <8 x i32> %seld to <32 x i8>
  %wp = getelementptr i8, ptr %cp, i64 8
PREFETCH
"""
# a read prefetch (rw 0) to all cache levels (locality 3) of data (cache type 1); harmless past
# the stream's end (a prefetch never faults). The row streams are contiguous, so the chunks
# ahead are this row's or the next row's.
_A8_PREFETCH = """
  %pfp = getelementptr i8, ptr %cp, i64 DISTANCE
  call void @llvm.prefetch.p0(ptr %pfp, i32 0, i32 3, i32 1)
"""
# INT8, AVX2: |c| * (sign(c) q), exact in int16 pairs; widened per chunk
_A8_INT8 = """
  %w = load <32 x i8>, ptr %wp, align 1
  %q8 = xor <32 x i8> %sel, SIGNBIT
  %qs = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %q8, <32 x i8> %w)
  %wa = call <32 x i8> @llvm.abs.v32i8(<32 x i8> %w, i1 false)
  %p16 = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %wa, <32 x i8> %qs)
  %p32 = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %p16, <16 x i16> ONES16)
  %accn = add <8 x i32> %acc, %p32
"""
_A8_INT8_VNNI = """
  %w = load <32 x i8>, ptr %wp, align 1
  %q8 = xor <32 x i8> %sel, SIGNBIT
  %qs = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %q8, <32 x i8> %w)
  %wa = call <32 x i8> @llvm.abs.v32i8(<32 x i8> %w, i1 false)
  %accn = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %acc, <32 x i8> %wa, <32 x i8> %qs)
"""
_A8_INT4_CODES = """
  %w16 = load <16 x i8>, ptr %wp, align 1
  %w2 = shufflevector <16 x i8> %w16, <16 x i8> poison, <32 x i32> BCAST16
  %wq = bitcast <32 x i8> %w2 to <4 x i64>
  %wsh = lshr <4 x i64> %wq, <i64 0, i64 0, i64 4, i64 4>
  %wn = bitcast <4 x i64> %wsh to <32 x i8>
  %wl = and <32 x i8> %wn, FIFTEEN
  %w = sub <32 x i8> %wl, EIGHT
"""
# INT4, AVX2: xu * c, pairs <= 4080: a block's four chunks add in int16
_A8_INT4 = _A8_INT4_CODES + """
  %p16 = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %sel, <32 x i8> %w)
  %accn = add <16 x i16> %acc, %p16
"""
_A8_INT4_VNNI = _A8_INT4_CODES + """
  %accn = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %acc, <32 x i8> %sel, <32 x i8> %w)
"""

_A8_IR = """
declare <32 x i8> @llvm.x86.avx2.pshuf.b(<32 x i8>, <32 x i8>)
declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)
declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)
declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
declare <8 x float> @llvm.fma.v8f32(<8 x float>, <8 x float>, <8 x float>)
declare float @llvm.vector.reduce.fadd.v8f32(float, <8 x float>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
DECLARE_VNNI

; out[r] = sum_b wscale[r, b / xb_per_q] * xs[b] * (corr[r, b] + sum over block b of the dot)
; row r: 2 * npairs + tail chunks of CHUNK_BYTES bytes (8 metadata bytes, then the weights)
define void @NAME(ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out,
                  i64 %r0, i64 %r1, i64 %npairs, i64 %tail, i64 %nscale, i64 %xb_per_q) {
entry:
  %n2 = shl i64 %npairs, 1
  %nch = add i64 %n2, %tail
  %nch3 = add i64 %nch, 3
  %nxb = lshr i64 %nch3, 2
  %rstride = mul i64 %nch, CHUNK_BYTES
  br label %rowloop
rowloop:
  %r = phi i64 [ %r0, %entry ], [ %rnext, %rowend ]
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
  %accf = phi <8 x float> [ zeroinitializer, %rowbody ], [ %accf2, %xbend ]
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
  %acc = phi ACCTY [ zeroinitializer, %xbbody ], [ %accn, %chunkbody ]
  %kdone = icmp uge i64 %k, %kend
  br i1 %kdone, label %xbend, label %chunkbody
chunkbody:
  %ko = mul i64 %k, CHUNK_BYTES
INDEX
DOT
  %knext = add i64 %k, 1
  br label %chunkloop
xbend:
WIDEN
  %cp2 = getelementptr i32, ptr %crow, i64 %xb
  %cv = load i32, ptr %cp2, align 4
  %cvv = insertelement <8 x i32> zeroinitializer, i32 %cv, i32 0
  %acci = add <8 x i32> %acc32, %cvv
A8_BLOCK_END
"""


def chunk_bytes(codec: str) -> int:
    return 8 + (32 if codec == "int8" else 16)


def _a8_ir(name: str, codec: str, vnni: bool, prefetch: int) -> str:
    if codec == "int8":
        dot, accty, widen = (_A8_INT8_VNNI if vnni else _A8_INT8), "<8 x i32>", "  %acc32 = add <8 x i32> %acc, zeroinitializer"
    elif vnni:
        dot, accty, widen = _A8_INT4_VNNI, "<8 x i32>", "  %acc32 = add <8 x i32> %acc, zeroinitializer"
    else:
        dot, accty = _A8_INT4, "<16 x i16>"
        widen = "  %acc32 = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %acc, <16 x i16> ONES16)"
    index = _A8_INDEX.replace("PREFETCH", _A8_PREFETCH.replace("DISTANCE", str(int(prefetch))) if prefetch > 0 else "")
    ir = (_A8_IR.replace("NAME", name).replace("INDEX", index).replace("DOT", dot).replace("WIDEN", widen)
          .replace("ACCTY", accty).replace("CHUNK_BYTES", str(chunk_bytes(codec)))
          .replace("DECLARE_VNNI", "declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)"
                   if vnni else ""))
    for key, value in (("A8SHIFTS", _vec(_A8_SHIFTS, "i32")), ("THREE", _vec([3] * 32, "i8")), ("BASE", _A8_BASE),
                       ("BLEND", _vec([0, 1, 10, 11, 4, 5, 14, 15], "i32")), ("SIGNBIT", _vec([-128] * 32, "i8")),
                       ("ONES16", _vec([1] * 16, "i16")), ("BCAST16", _vec([i % 16 for i in range(32)], "i32")),
                       ("FIFTEEN", _vec([15] * 32, "i8")), ("EIGHT", _vec([8] * 32, "i8"))):
        ir = ir.replace(key, value)
    return ir.replace("A8_BLOCK_END", a8_block_end(8))


# ---------------------------------------------------------------- compilation
F32_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 4), *([ctypes.c_int64] * 5))
A8_PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 6), *([ctypes.c_int64] * 6))


def cpu_features_missing(vnni: bool = False) -> list[str]:
    """What the host lacks for these kernels (the registry also applies the feature cap)."""
    return features_missing(VNNI_FEATURES if vnni else REQUIRED_FEATURES)


def _compiled_fns(vnni: bool = False, prefetch: Optional[int] = None,
                  f32_prefetch: Optional[int] = None) -> tuple[Optional[dict], Optional[str]]:
    """({name: ctypes function}, None) or (None, reason). Compiled once per process and
    prefetch distances (None: the defaults; the benchmark compiles several)."""
    return _compile(bool(vnni), A8_PREFETCH_DEFAULT[bool(vnni)] if prefetch is None else int(prefetch),
                    F32_PREFETCH_BYTES if f32_prefetch is None else int(f32_prefetch))


@functools.lru_cache(maxsize=None)
def _compile(vnni: bool, prefetch: int, f32_prefetch: int) -> tuple[Optional[dict], Optional[str]]:
    try:
        missing = cpu_features_missing(vnni)
        if missing:
            return None, f"the CPU lacks {', '.join(missing)}"
        suffix = "avxvnni" if vnni else "avx2"
        ir = "\n".join(_a8_ir(f"gemv24_{c}_{suffix}", c, vnni, prefetch) for c in ("int8", "int4"))
        sigs = {f"gemv24_{c}_{suffix}": A8_PROTO for c in ("int8", "int4")}
        if not vnni:
            ir += "\n" + _f32_ir(f32_prefetch)
            sigs["gemv24_f32_avx2"] = F32_PROTO
        fns = compile_functions(ir, sigs, cpu=TARGET_CPU, features="+avxvnni" if vnni else "")
        out = {c: fns[f"gemv24_{c}_{suffix}"] for c in ("int8", "int4")}
        if not vnni:
            out["f32"] = fns["gemv24_f32_avx2"]
        return out, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the AVX2 kernels: {exc}"


def compiled_functions(vnni: bool = False, prefetch: Optional[int] = None, f32_prefetch: Optional[int] = None) -> dict:
    """The raw ctypes functions, for callers that close over them in their own numba code:
    ``{"int8": fn, "int4": fn}`` with ``cpu_vnni``'s signature ``fn(stream, wscale, corr, xu,
    xs, out, r0, r1, npairs, tail, nscale, xb_per_q)`` on :func:`prepare_a8`'s plan, and (not
    ``vnni``) ``"f32": fn`` with ``cpu_gather``'s ``fn(vals, meta, x, out, r0, r1, units,
    quads, block_units)`` on :func:`prepare_f32`'s plan (``r0``, ``r1`` multiples of 4).
    ``vnni=True``: the AVX-VNNI variants; ``prefetch``: the INT8/INT4 kernels' prefetch
    distance in bytes (0: none; None: :data:`A8_PREFETCH_DEFAULT`), ``f32_prefetch`` the float32
    kernel's (None: :data:`F32_PREFETCH_BYTES`). Raises RuntimeError when unavailable."""
    fns, reason = _compiled_fns(vnni, prefetch, f32_prefetch)
    if fns is None:
        raise RuntimeError(reason)
    return fns


@functools.lru_cache(maxsize=None)
def _runners(vnni: bool = False) -> dict:
    fns = compiled_functions(vnni)
    out = {c: cpu_vnni._row_runner(fns[c]) for c in ("int8", "int4")}
    if "f32" in fns:
        out["f32"] = cpu_gather._row_runner(fns["f32"])
    return out


# ---------------------------------------------------------------- reasons
def f32_unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when the float32 kernel can run ``layer`` at batch 1; else why not."""
    if not layer.is_24:
        return f"{layer.n}:{layer.m} is not 2:4"
    if layer.codec != "none" or layer.values.dtype != torch.float32:
        return "values are not float32"
    if layer.cols % UNIT:
        return f"input features {layer.cols} are not a multiple of {UNIT}"
    return _compiled_fns(False)[1]


def a8_unavailable_reason(layer: BlockedNM, vnni: bool = False) -> Optional[str]:
    """None when the INT8-activation kernel can run ``layer`` at batch 1; else why not."""
    return cpu_vnni.layout_reason(layer) or _compiled_fns(vnni)[1]


# ---------------------------------------------------------------- plans
def prepare_f32(layer: BlockedNM) -> dict:
    """``cpu_gather.prepare``'s plan ("vals", "meta", "units", "nbytes") with the slots in
    :data:`F32_ORDER`; cached in ``layer.extra["avx2_f32_plan"]``."""
    return cpu_gather.prepare(layer, F32_ORDER, "avx2_f32_plan")


def prepare_a8(layer: BlockedNM) -> dict:
    """The INT8/INT4 plan, cached in ``layer.extra["avx2_a8_plan"]``: "stream" (rows, chunks *
    (8 + 32 | 16)) bytes - per 64-column chunk the 64 metadata bits (:data:`A8_FIELD`) and the
    codes in :data:`A8_ORDER` (INT4: two per byte, ``c + 8``); "scale" (rows, nscale) float32;
    "corr" (rows, blocks of 256) int32 (INT8: 0; INT4: ``-128 * sum c``); "npairs" = cols // 128
    and "tail" = (cols % 128) // 64 (chunks = 2 npairs + tail); "nscale"; "xb_per_q" (256-input
    blocks per scale group); "nbytes"."""
    plan = layer.extra.get("avx2_a8_plan")
    if plan is not None:
        return plan
    rows, cols = layer.rows, layer.cols
    nch = cols // CHUNK
    pos = positions_of(layer).cpu().numpy().reshape(rows, nch, 32)[:, :, A8_ORDER].astype(np.uint64)
    meta = np.zeros((rows, nch), np.uint64)
    for j in range(32):
        meta |= pos[:, :, j] << np.uint64(A8_FIELD[j])
    v = unblock(layer.values, rows).cpu().to(torch.int16)
    if layer.codec == "int4":  # two codes per byte, low nibble first; zero point 8
        v = torch.stack([v & 15, (v & 255) >> 4], -1).reshape(rows, -1) - 8
    c = v.reshape(rows, cols // 2).numpy()  # signed codes, column order
    cw = c.reshape(rows, nch, 32)[:, :, A8_ORDER]
    if layer.codec == "int8":
        w = cw.astype(np.int8).view(np.uint8)
    else:
        n = (cw + 8).astype(np.uint8)
        w = n[:, :, :16] | (n[:, :, 16:] << 4)
    stream = np.concatenate([meta.view(np.uint8).reshape(rows, nch, 8), w], 2).reshape(rows, -1)
    nxb = -(-cols // XBLOCK)
    if layer.codec == "int8":
        corr = np.zeros((rows, nxb), np.int32)
    else:
        sums = np.zeros((rows, nxb * 128), np.int64)
        sums[:, : cols // 2] = c
        corr = (-128 * sums.reshape(rows, nxb, 128).sum(2)).astype(np.int32)
    scale = unblock(layer.scale, rows).cpu().float().contiguous().numpy()
    xb_per_q = nxb if layer.group_size is None else (4 * layer.groups_per_scale) // XBLOCK
    plan = {
        "stream": np.ascontiguousarray(stream),
        "scale": np.ascontiguousarray(scale),
        "corr": np.ascontiguousarray(corr),
        "npairs": cols // 128,
        "tail": (cols % 128) // CHUNK,
        "nscale": scale.shape[1],
        "xb_per_q": max(1, xb_per_q),
    }
    plan["nbytes"] = sum(plan[k].nbytes for k in ("stream", "scale", "corr"))
    layer.extra["avx2_a8_plan"] = plan
    return plan


# ---------------------------------------------------------------- runners
def runner_for(layer: BlockedNM) -> tuple:
    """float32: ``(run, plan)`` as ``cpu_gather.runner_for``: ``run(plan["vals"], plan["meta"],
    x (1, cols), rows, plan["units"], tasks)`` returns ``out (1, rows)``."""
    return _runners(False)["f32"], prepare_f32(layer)


def a8_runner_for(layer: BlockedNM, vnni: bool = False) -> tuple:
    """INT8/INT4: ``(run, args)`` as ``cpu_vnni.runner_for``: ``run(*args[:3], x, *args[3:],
    tasks)`` returns ``out (1, rows)``, an empty array when ``x`` is not finite."""
    plan = prepare_a8(layer)
    args = (plan["stream"], plan["scale"], plan["corr"], layer.rows, plan["npairs"], plan["tail"],
            plan["nscale"], plan["xb_per_q"])
    return _runners(vnni)[layer.codec], args


def f32_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x (1, cols)`` float32 -> ``(1, rows)``."""
    cached = layer.extra.get("avx2_f32_runner")
    if cached is None:
        cached = layer.extra["avx2_f32_runner"] = runner_for(layer)
    run, plan = cached
    rows = layer.rows
    return torch.from_numpy(run(plan["vals"], plan["meta"], x.numpy(), rows, plan["units"],
                                threads if rows >= 128 * threads else 1))


def a8_matmul(layer: BlockedNM, x: torch.Tensor, threads: int, vnni: bool = False) -> Optional[torch.Tensor]:
    """``x (1, cols)`` float32 -> ``(1, rows)`` with INT8 activations; None when ``x`` holds
    NaN or infinity (the caller takes a float row)."""
    key = "avxvnni_a8_runner" if vnni else "avx2_a8_runner"
    cached = layer.extra.get(key)
    if cached is None:
        cached = layer.extra[key] = a8_runner_for(layer, vnni)
    run, args = cached
    out = run(*args[:3], x.numpy(), *args[3:], threads if layer.rows >= 128 * threads else 1)
    return torch.from_numpy(out) if out.size else None


def f32_token_runner(layer: BlockedNM):
    """The registry row's batch-1 shortcut: ``x (..., cols) -> (1, rows)``."""
    from sparsemerge.kernels.threads import row_tasks, sync_threads

    run, plan = runner_for(layer)
    vals, meta, units, rows = plan["vals"], plan["meta"], plan["units"], layer.rows

    def token(x: torch.Tensor):
        sync_threads()
        return torch.from_numpy(run(vals, meta, x.detach().numpy().reshape(1, -1), rows, units, row_tasks(rows)))

    return token


def a8_token_runner(layer: BlockedNM, vnni: bool = False):
    """The registry row's batch-1 shortcut: ``x -> (1, rows)``, or None when not finite."""
    from sparsemerge.kernels.threads import row_tasks, sync_threads

    run, args = a8_runner_for(layer, vnni)
    rows = layer.rows

    def token(x: torch.Tensor):
        sync_threads()
        out = run(*args[:3], x.detach().numpy().reshape(1, -1), *args[3:], row_tasks(rows))
        return torch.from_numpy(out) if out.size else None

    return token
