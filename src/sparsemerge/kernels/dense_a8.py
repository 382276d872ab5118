"""Dense INT8 weights x INT8 activations at batch 1 (the language-model head): LLVM IR kernels.

The dense INT8 head of a 2:4 SmolLM2 (49152 x 576 codes, 28 MB, ~40% of a token's bytes) ran
as a numba loop converting every code to float: compute-bound. These kernels read the codes
once, as they are stored, and multiply them with the INT8 activations of ``cpu_vnni._quantize``
(per block of 256 inputs: ``xq = round(x / xs_b)`` in [-127, 127], read as ``xu = xq + 128``)
in integer arithmetic:

* ``avx512vnni``: one 512-bit ``vpdpbusd`` per 64 codes (``sum c * xu``, 64 multiply-adds);
* ``avxvnni``: two VEX 256-bit ``vpdpbusd`` (Alder Lake, Zen 5); x86-64-v3 code otherwise;
* ``avx2`` (+FMA): the sign trick of llama.cpp - ``vpmaddubsw(|c|, sign(c) * xq)`` has int16
  pair sums of at most 2 * 128 * 127 = 32512 (no saturation, unlike ``vpmaddubsw(xu, c)``:
  2 * 255 * 127), then ``vpmaddwd`` by ones to int32.

The VNNI variants compute ``sum c * xu = sum c * xq + 128 * sum c``; ``corr = -128 * sum c``
(per row and segment, from the weights alone) starts each segment's int32 sum, so the dot is
exact; the AVX2 variant multiplies ``xq`` itself and does not read ``corr``.

A *segment* is ``S = gcd(G, 256)`` inputs (``G`` the weight-scale group, 256 when the scale is
per row): the largest run with one weight scale and one activation scale. Per row::

    out[r] = sum_segments  wscale[r, g(s)] * xs[b(s)] * (int32 dot over segment s)

i.e. ``sum_k (c_rk * wscale) * (xq_k * xs)``: what :func:`reference` computes in float64.

Rows go in groups of four that share every activation load (four independent int32
accumulators); the codes are stored quad-interleaved - for rows 4q..4q+3, chunk k (64 inputs)
of row i sits at byte ``256 k + 64 i`` of quad q - so a quad's four rows are one sequential
stream, read once. (Row-major codes read four rows at a time - four interleaved streams -
got ~30% less DRAM bandwidth on a Zen 5 VM; one row at a time over row-major codes reached
the same bandwidth as the interleaved quads but ~30% less throughput from cache.) Rows of a
partial quad at either end of ``r0..r1`` run one at a time, so any range works (the runtime
splits rows unaligned). Rows and columns are padded with zero codes (to multiples of 4 and
64), so whatever sits in ``xu`` behind ``cols`` (stale values of a wider layer) adds nothing.

At a segment's end a transposing in-lane reduction (two shuffle + add levels, then the 128-bit
blocks added) turns the four accumulators into the four rows' exact segment sums, which are
scaled in double (``wscale * xs`` of two floats is exact in double) and added to a
``<4 x double>``; each result is rounded to float32 once. So every variant gives the same
numbers: the float64 reference rounded once, up to double rounding noise. (The vpdpbusd lanes
hold ``sum c * xu``, biased by 128 * sum c: scaled lane by lane in float32 they would lose
digits to cancellation.)

C signature (``cpu_vnni``'s, so the runtime calls it with ``runtime.ffi.call_a8``)::

    void fn(stream, wscale, corr, xu, xs, out, r0, r1, nch, cps, nscale, spg)

with the plan keys ``npairs`` = ``nch`` (64-input chunks per row: a quad is 256 * nch bytes),
``tail`` = ``cps`` (chunks per segment: S / 64), ``nscale`` (scales per row) and ``xb_per_q`` =
``spg`` (segments per weight-scale group) - see :func:`prepare`.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Optional, Union

import numpy as np
import torch
from numba import njit, prange

from sparsemerge.kernels.cpu_vnni import XBLOCK, _quantize
from sparsemerge.kernels.llvm_jit import compile_functions, features_missing
from sparsemerge.runtime.ffi import call_a8

CHUNK = 64  # input columns per inner step (one zmm, two ymm)
QUAD = 4  # rows sharing each activation load
MIN_ROWS_PER_THREAD = 128
VARIANTS = ("avx512vnni", "avxvnni", "avx2")  # best first
REQUIRED_FEATURES = {
    "avx512vnni": ("avx512f", "avx512vnni"),
    "avxvnni": ("avx2", "fma", "avxvnni"),
    "avx2": ("avx2", "fma"),
}
# (cpu, features) to compile for; None: the host. The 256-bit variants are x86-64-v3 code even
# on an AVX-512 machine, which is how the tests run them everywhere.
_TARGET = {"avx512vnni": (None, None), "avxvnni": ("x86-64-v3", "+avxvnni"), "avx2": ("x86-64-v3", "")}
# software prefetch distance (bytes ahead in each row's stream; 0: none) per variant, measured
# with benchmarks/bench_prefetch.py: avx2 on a Zen 3, avx512vnni on a Zen 4 (the 49152 x 576
# head 1.41x at 8192 bytes against none), avxvnni on a Zen 5 (the head 1.10x min, 1.35x median
# at 4096 bytes).
PREFETCH_BYTES = {"avx512vnni": 8192, "avxvnni": 4096, "avx2": 4096}
PROTO = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 6), *([ctypes.c_int64] * 6))


def _vec(values, ty: str) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# ---------------------------------------------------------------- IR
# per variant: (int32 lanes, declarations, activation loads at %xo, one row's dot at %wk; {i} = row)
_DECL_COMMON = """
declare i32 @llvm.vector.reduce.add.vLi32(<L x i32>)
declare <4 x double> @llvm.fma.v4f64(<4 x double>, <4 x double>, <4 x double>)
declare double @llvm.fma.f64(double, double, double)
declare i64 @llvm.umin.i64(i64, i64)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
"""
# after a row's dot: read-prefetch (rw 0, locality 3, data 1) DISTANCE bytes ahead of its chunk
_PREFETCH = """
  %pf{i} = getelementptr i8, ptr %wp{i}, i64 DISTANCE
  call void @llvm.prefetch.p0(ptr %pf{i}, i32 0, i32 3, i32 1)
"""
_X512 = """
  %xp = getelementptr i8, ptr %xu, i64 %xo
  %x = load <64 x i8>, ptr %xp, align 1
"""
_W512 = """
  %wp{i} = getelementptr i8, ptr %wrow{i}, i64 %wk
  %w{i} = load <64 x i8>, ptr %wp{i}, align 1
  %accn{i} = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %acc{i}, <64 x i8> %x, <64 x i8> %w{i})
"""
_X256 = """
  %xp = getelementptr i8, ptr %xu, i64 %xo
  %xhp = getelementptr i8, ptr %xp, i64 32
  %xl = load <32 x i8>, ptr %xp, align 1
  %xh = load <32 x i8>, ptr %xhp, align 1
"""
_WVNNI = """
  %wp{i} = getelementptr i8, ptr %wrow{i}, i64 %wk
  %whp{i} = getelementptr i8, ptr %wp{i}, i64 32
  %wl{i} = load <32 x i8>, ptr %wp{i}, align 1
  %wh{i} = load <32 x i8>, ptr %whp{i}, align 1
  %t{i} = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %acc{i}, <32 x i8> %xl, <32 x i8> %wl{i})
  %accn{i} = call <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32> %t{i}, <32 x i8> %xh, <32 x i8> %wh{i})
"""
# xq = xu ^ 0x80 (signed); |c| * (sign(c) * xq) in int16 pairs, exact; widened by vpmaddwd
_XAVX2 = _X256 + """
  %ql = xor <32 x i8> %xl, SIGNBIT
  %qh = xor <32 x i8> %xh, SIGNBIT
"""
_WAVX2 = """
  %wp{i} = getelementptr i8, ptr %wrow{i}, i64 %wk
  %whp{i} = getelementptr i8, ptr %wp{i}, i64 32
  %wl{i} = load <32 x i8>, ptr %wp{i}, align 1
  %wh{i} = load <32 x i8>, ptr %whp{i}, align 1
  %al{i} = call <32 x i8> @llvm.abs.v32i8(<32 x i8> %wl{i}, i1 false)
  %ah{i} = call <32 x i8> @llvm.abs.v32i8(<32 x i8> %wh{i}, i1 false)
  %sl{i} = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %ql, <32 x i8> %wl{i})
  %sh{i} = call <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8> %qh, <32 x i8> %wh{i})
  %pl{i} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %al{i}, <32 x i8> %sl{i})
  %ph{i} = call <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8> %ah{i}, <32 x i8> %sh{i})
  %dl{i} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %pl{i}, <16 x i16> ONES16)
  %dh{i} = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %ph{i}, <16 x i16> ONES16)
  %t{i} = add <8 x i32> %acc{i}, %dl{i}
  %accn{i} = add <8 x i32> %t{i}, %dh{i}
"""
_VARIANT_IR = {
    "avx512vnni": (16, "declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)", _X512, _W512),
    "avxvnni": (8, "declare <8 x i32> @llvm.x86.avx512.vpdpbusd.256(<8 x i32>, <32 x i8>, <32 x i8>)", _X256, _WVNNI),
    "avx2": (8, "declare <32 x i8> @llvm.abs.v32i8(<32 x i8>, i1)\n"
                "declare <32 x i8> @llvm.x86.avx2.psign.b(<32 x i8>, <32 x i8>)\n"
                "declare <16 x i16> @llvm.x86.avx2.pmadd.ub.sw(<32 x i8>, <32 x i8>)\n"
                "declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)", _XAVX2, _WAVX2),
}

# rows r .. r + R - 1 of the layer (R = 4 or 1); {each:...} lines repeat per row of the group
_GROUP_IR = """
define internal void @NAME_gR(ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out, i64 %r,
                               i64 %nch, i64 %cps, i64 %nscale, i64 %spg, i64 %nseg) alwaysinline nounwind {
entry:
  %qstride = shl i64 %nch, 8
EACH_ROWPTRS
  br label %segloop
segloop:
  %s = phi i64 [ 0, %entry ], [ %snext, %segend ]
  %g = phi i64 [ 0, %entry ], [ %gnext, %segend ]
  %gc = phi i64 [ 0, %entry ], [ %gcnext, %segend ]
  %k0 = phi i64 [ 0, %entry ], [ %k1, %segend ]
  %accd = phi DTY [ zeroinitializer, %entry ], [ %accd2, %segend ]
  %sdone = icmp uge i64 %s, %nseg
  br i1 %sdone, label %exit, label %segbody
segbody:
  %k1a = add i64 %k0, %cps
  %k1 = call i64 @llvm.umin.i64(i64 %k1a, i64 %nch)
EACH_INIT
  br label %chunkloop
chunkloop:
  %k = phi i64 [ %k0, %segbody ], [ %knext, %chunkbody ]
EACH_IPHI
  %kdone = icmp uge i64 %k, %k1
  br i1 %kdone, label %segend, label %chunkbody
chunkbody:
  %xo = shl i64 %k, 6
  %wk = shl i64 %k, 8
XLOAD
EACH_DOT
  %knext = add i64 %k, 1
  br label %chunkloop
segend:
  %b = lshr i64 %k0, 2
  %xsp = getelementptr float, ptr %xs, i64 %b
  %xsv = load float, ptr %xsp, align 4
  %xsd = fpext float %xsv to double
EACH_WS
SEGSUM
  %snext = add i64 %s, 1
  %gc1 = add i64 %gc, 1
  %gwrap = icmp uge i64 %gc1, %spg
  %ginc = add i64 %g, 1
  %gnext = select i1 %gwrap, i64 %ginc, i64 %g
  %gcnext = select i1 %gwrap, i64 0, i64 %gc1
  br label %segloop
exit:
STORE
  ret void
}
"""
_ROWPTRS = """
  %r{i} = add i64 %r, {i}
  %rq{i} = lshr i64 %r{i}, 2
  %rl{i} = and i64 %r{i}, 3
  %wq{i} = mul i64 %rq{i}, %qstride
  %wi{i} = shl i64 %rl{i}, 6
  %wo{i} = add i64 %wq{i}, %wi{i}
  %wrow{i} = getelementptr i8, ptr %stream, i64 %wo{i}
  %co{i} = mul i64 %r{i}, %nseg
  %crow{i} = getelementptr i32, ptr %corr, i64 %co{i}
  %so{i} = mul i64 %r{i}, %nscale
  %srow{i} = getelementptr float, ptr %wscale, i64 %so{i}
"""
_INIT_CORR = """
  %cp{i} = getelementptr i32, ptr %crow{i}, i64 %s
  %cv{i} = load i32, ptr %cp{i}, align 4
  %acc0{i} = insertelement <L x i32> zeroinitializer, i32 %cv{i}, i32 0
"""
_INIT_ZERO = "  %acc0{i} = add <L x i32> zeroinitializer, zeroinitializer\n"
_IPHI = "  %acc{i} = phi <L x i32> [ %acc0{i}, %segbody ], [ %accn{i}, %chunkbody ]\n"
_WS = """
  %wsp{i} = getelementptr float, ptr %srow{i}, i64 %g
  %ws{i} = load float, ptr %wsp{i}, align 4
  %wsd{i} = fpext float %ws{i} to double
"""
# one row: the segment's int32 lanes added exactly, then one double fma
_SEGSUM1 = """
  %tot = call i32 @llvm.vector.reduce.add.vLi32(<L x i32> %acc0)
  %totd = sitofp i32 %tot to double
  %sc = fmul double %wsd0, %xsd
  %accd2 = call double @llvm.fma.f64(double %totd, double %sc, double %accd)
"""
_STORE1 = """
  %res = fptrunc double %accd to float
  %op = getelementptr float, ptr %out, i64 %r
  store float %res, ptr %op, align 4
"""
# four rows: a transposing in-lane reduction (two shuffle+add levels give each 128-bit block
# the partial sums [r0 r1 r2 r3]; the blocks are then added) to <4 x i32>, then a <4 x double> fma
_SEGSUM4 = """
  %pa01 = shufflevector <L x i32> %acc0, <L x i32> %acc1, <L x i32> MLO
  %pb01 = shufflevector <L x i32> %acc0, <L x i32> %acc1, <L x i32> MHI
  %p01 = add <L x i32> %pa01, %pb01
  %pa23 = shufflevector <L x i32> %acc2, <L x i32> %acc3, <L x i32> MLO
  %pb23 = shufflevector <L x i32> %acc2, <L x i32> %acc3, <L x i32> MHI
  %p23 = add <L x i32> %pa23, %pb23
  %qa = shufflevector <L x i32> %p01, <L x i32> %p23, <L x i32> MLO
  %qb = shufflevector <L x i32> %p01, <L x i32> %p23, <L x i32> MHI
  %q = add <L x i32> %qa, %qb
BLOCKSUM
  %totd = sitofp <4 x i32> %tot to <4 x double>
  %w0v = insertelement <4 x double> poison, double %wsd0, i32 0
  %w1v = insertelement <4 x double> %w0v, double %wsd1, i32 1
  %w2v = insertelement <4 x double> %w1v, double %wsd2, i32 2
  %wv = insertelement <4 x double> %w2v, double %wsd3, i32 3
  %xs1 = insertelement <4 x double> poison, double %xsd, i32 0
  %xsv4 = shufflevector <4 x double> %xs1, <4 x double> poison, <4 x i32> zeroinitializer
  %sc = fmul <4 x double> %wv, %xsv4
  %accd2 = call <4 x double> @llvm.fma.v4f64(<4 x double> %totd, <4 x double> %sc, <4 x double> %accd)
"""
_STORE4 = """
  %res = fptrunc <4 x double> %accd to <4 x float>
  %op = getelementptr float, ptr %out, i64 %r
  store <4 x float> %res, ptr %op, align 4
"""


def _blocksum(lanes: int) -> str:
    """``%tot`` (<4 x i32>) = the sum of the 128-bit blocks of ``%q`` (<lanes x i32>)."""
    lines, cur, n = [], "%q", lanes
    while n > 4:
        half = n // 2
        for part, idx in (("lo", range(half)), ("hi", range(half, n))):
            lines.append(f"  %{part}{n} = shufflevector <{n} x i32> {cur}, <{n} x i32> poison, <{half} x i32> {_vec(idx, 'i32')}")
        lines.append(f"  %s{n} = add <{half} x i32> %lo{n}, %hi{n}")
        cur, n = f"%s{n}", half
    lines.append(f"  %tot = add <4 x i32> {cur}, zeroinitializer")
    return "\n".join(lines)


_MAIN_IR = """
define void @NAME(ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out, i64 %r0, i64 %r1,
                  i64 %nch, i64 %cps, i64 %nscale, i64 %spg) nounwind {
entry:
  %nch1 = add i64 %nch, %cps
  %nch2 = sub i64 %nch1, 1
  %nseg = udiv i64 %nch2, %cps
  br label %headloop
headloop:
  %h = phi i64 [ %r0, %entry ], [ %hnext, %headbody ]
  %hmis = and i64 %h, 3
  %hodd = icmp ne i64 %hmis, 0
  %hin = icmp ult i64 %h, %r1
  %hgo = and i1 %hodd, %hin
  br i1 %hgo, label %headbody, label %quadloop
headbody:
  call void @NAME_g1(PTRS, i64 %h, PARAMS)
  %hnext = add i64 %h, 1
  br label %headloop
quadloop:
  %r = phi i64 [ %h, %headloop ], [ %r4, %quadbody ]
  %r4 = add i64 %r, 4
  %fits = icmp ule i64 %r4, %r1
  br i1 %fits, label %quadbody, label %tailloop
quadbody:
  call void @NAME_g4(PTRS, i64 %r, PARAMS)
  br label %quadloop
tailloop:
  %t = phi i64 [ %r, %quadloop ], [ %tnext, %tailbody ]
  %tdone = icmp uge i64 %t, %r1
  br i1 %tdone, label %exit, label %tailbody
tailbody:
  call void @NAME_g1(PTRS, i64 %t, PARAMS)
  %tnext = add i64 %t, 1
  br label %tailloop
exit:
  ret void
}
"""


def kernel_ir(variant: str, name: str, prefetch: Optional[int] = None) -> str:
    """The LLVM module of one variant: ``@name`` (the C signature above) and its row-group
    helpers ``@name_g4`` / ``@name_g1``; ``prefetch`` bytes ahead (None: :data:`PREFETCH_BYTES`)."""
    lanes, decl, xload, dot = _VARIANT_IR[variant]
    prefetch = PREFETCH_BYTES[variant] if prefetch is None else int(prefetch)
    if prefetch > 0:
        dot += _PREFETCH.replace("DISTANCE", str(prefetch))
    init = _INIT_ZERO if variant == "avx2" else _INIT_CORR  # the sign trick needs no correction
    mlo = _vec([v for j in range(lanes // 4) for v in (4 * j, 4 * j + 2, lanes + 4 * j, lanes + 4 * j + 2)], "i32")
    mhi = _vec([v for j in range(lanes // 4) for v in (4 * j + 1, 4 * j + 3, lanes + 4 * j + 1, lanes + 4 * j + 3)], "i32")
    parts = [_DECL_COMMON, decl]
    for rows in (QUAD, 1):
        body = (_GROUP_IR.replace("_gR", f"_g{rows}").replace("XLOAD", xload)
                .replace("DTY", "<4 x double>" if rows == QUAD else "double")
                .replace("SEGSUM", _SEGSUM4.replace("BLOCKSUM", _blocksum(lanes)) if rows == QUAD else _SEGSUM1)
                .replace("STORE", _STORE4 if rows == QUAD else _STORE1))
        for key, text in (("EACH_ROWPTRS", _ROWPTRS), ("EACH_INIT", init), ("EACH_IPHI", _IPHI),
                          ("EACH_DOT", dot), ("EACH_WS", _WS)):
            body = body.replace(key, "".join(text.replace("{i}", str(i)) for i in range(rows)))
        parts.append(body)
    parts.append(_MAIN_IR)
    ir = "\n".join(parts).replace("NAME", name).replace("vLi32", f"v{lanes}i32").replace("<L x", f"<{lanes} x")
    ir = ir.replace("MLO", mlo).replace("MHI", mhi)
    ir = ir.replace("PTRS", "ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out")
    ir = ir.replace("PARAMS", "i64 %nch, i64 %cps, i64 %nscale, i64 %spg, i64 %nseg")
    return ir.replace("SIGNBIT", _vec([-128] * 32, "i8")).replace("ONES16", _vec([1] * 16, "i16"))


# ---------------------------------------------------------------- compilation and availability
def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown dense A8 variant {variant!r}; use one of {', '.join(VARIANTS)}")


def _compiled(variant: str, prefetch: Optional[int] = None) -> tuple[Optional[dict], Optional[str]]:
    """({"int8": ctypes function}, None) or (None, reason); compiled once per process, variant
    and prefetch distance (None: :data:`PREFETCH_BYTES`), whenever the host has the features
    (the cap only narrows the choice)."""
    return _compile(variant, PREFETCH_BYTES[variant] if prefetch is None else int(prefetch))


@functools.lru_cache(maxsize=None)
def _compile(variant: str, prefetch: int) -> tuple[Optional[dict], Optional[str]]:
    try:
        lack = features_missing(REQUIRED_FEATURES[variant])
        if lack:
            return None, f"the CPU lacks {', '.join(lack)}"
        cpu, feats = _TARGET[variant]
        name = f"gemv_dense_a8_{variant}"
        fns = compile_functions(kernel_ir(variant, name, prefetch), {name: PROTO}, cpu=cpu, features=feats)
        return {"int8": fns[name]}, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the dense A8 {variant} kernel: {exc}"


def compiled_functions(variant: str, prefetch: Optional[int] = None) -> dict:
    """``{"int8": fn}``: the raw ctypes function ``fn(stream, wscale, corr, xu, xs, out, r0, r1,
    npairs, tail, nscale, xb_per_q)`` on :func:`prepare`'s plan, prefetching ``prefetch`` bytes
    ahead (None: :data:`PREFETCH_BYTES`). Compiled if the host has the variant's features
    (whatever the cap); RuntimeError otherwise."""
    _check_variant(variant)
    fns, reason = _compiled(variant, prefetch)
    if fns is None:
        raise RuntimeError(reason)
    return fns


def variant_reason(variant: str) -> Optional[str]:
    """None when ``variant`` can run on this CPU under the feature cap; else why not."""
    from sparsemerge.kernels.features import missing_reason

    _check_variant(variant)
    return missing_reason(REQUIRED_FEATURES[variant]) or _compiled(variant)[1]


def best_variant() -> tuple[Optional[str], dict]:
    """``(variant, {better variant: why not})``: the first of :data:`VARIANTS` this CPU runs
    under the cap (None when none does; the dict then names every reason)."""
    reasons = {}
    for v in VARIANTS:
        why = variant_reason(v)
        if why is None:
            return v, reasons
        reasons[v] = why
    return None, reasons


def layout_reason(rows: int, cols: int, group_size: int) -> Optional[str]:
    """None when a (rows, cols) layer with weight-scale groups of ``group_size`` inputs
    (0 = per row) fits the kernels' arithmetic; else why not."""
    if rows < 1 or cols < 1:
        return f"an empty weight ({rows} x {cols})"
    if group_size < 0 or group_size % CHUNK:
        return f"a weight-scale group of {group_size} inputs is not a multiple of {CHUNK} (0 = per row)"
    return None


def unavailable_reason(rows: int, cols: int, group_size: int, variant: str) -> Optional[str]:
    """None when ``variant`` can run this layer here (CPU features under the cap); else why not."""
    return layout_reason(rows, cols, group_size) or variant_reason(variant)


# ---------------------------------------------------------------- plan
def _segment(group_size: int) -> int:
    """Inputs per segment: one weight scale and one activation scale (gcd(G, 256))."""
    return XBLOCK if group_size == 0 else math.gcd(group_size, XBLOCK)


def prepare(codes: Union[torch.Tensor, np.ndarray], scale: Union[torch.Tensor, np.ndarray], group_size: int) -> dict:
    """The arrays and parameters the kernels read, for ``w[r, k] = codes[r, k] * scale[r, k // G]``
    (``G = group_size``, 0: one scale per row):

    * ``stream``: uint8 (ceil(rows / 4), 256 * nch) - the codes (two's complement) padded with
      zeros to 4 rows and 64 columns, quad-interleaved: row r's chunk k at ``[r // 4, 256 k +
      64 (r % 4)]`` (a copy: :func:`stream_rows` reads rows back, e.g. for a tied embedding);
    * ``scale``: float32 (rows, nscale), ``nscale`` = 1 or ceil(cols / G);
    * ``corr``: int32 (rows, nseg): ``-128 * sum of the segment's codes`` (VNNI variants);
    * ``npairs``: ``nch``, the 64-input chunks per row; ``tail``: chunks per segment (S / 64,
      ``S = gcd(G or 256, 256)``); ``xb_per_q``: segments per scale group (``nseg`` per row);
    * ``rows``, ``cols``, ``group_size``; ``nbytes``: the bytes one call reads (stream, scale, corr).
    """
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().cpu().float().numpy()
    codes, scale = np.asarray(codes), np.asarray(scale)
    if codes.dtype != np.int8 or codes.ndim != 2:
        raise ValueError(f"dense A8 needs int8 codes (rows, cols), got {codes.dtype} {codes.shape}")
    rows, cols = codes.shape
    reason = layout_reason(rows, cols, group_size)
    if reason:
        raise ValueError(f"dense A8 cannot run this layer: {reason}")
    if scale.ndim == 1:
        scale = scale.reshape(-1, 1)
    nscale = 1 if group_size == 0 else -(-cols // group_size)
    if scale.shape != (rows, nscale):
        raise ValueError(f"dense A8: scale {scale.shape} does not fit codes {codes.shape} with group size "
                         f"{group_size} (expected ({rows}, {nscale}))")
    nch = -(-cols // CHUNK)
    nquads = -(-rows // QUAD)
    padded = np.zeros((nquads * QUAD, nch * CHUNK), np.int8)
    padded[:rows, :cols] = codes
    # quad q = rows 4q..4q+3: chunk k of its row i at byte 256 k + 64 i (one sequential stream)
    stream = padded.reshape(nquads, QUAD, nch, CHUNK).transpose(0, 2, 1, 3).reshape(nquads, -1).view(np.uint8)
    seg = _segment(group_size)
    nseg = -(-cols // seg)
    corr = np.empty((rows, nseg), np.int32)
    for s in range(nseg):  # |sum| <= 256 * 128: int32 holds -128 times it
        corr[:, s] = -128 * codes[:, s * seg: (s + 1) * seg].sum(1, dtype=np.int32)
    plan = {
        "stream": np.ascontiguousarray(stream),
        "scale": np.ascontiguousarray(scale, np.float32),
        "corr": np.ascontiguousarray(corr),
        "npairs": nch,
        "tail": seg // CHUNK,
        "nscale": nscale,
        "xb_per_q": nseg if group_size == 0 else group_size // seg,
        "rows": rows,
        "cols": cols,
        "group_size": group_size,
    }
    plan["nbytes"] = sum(plan[k].nbytes for k in ("stream", "scale", "corr"))
    return plan


# ---------------------------------------------------------------- numba runner
@njit(error_model="numpy", cache=True)
def _rows(addr, stream, wscale, corr, xu, xs, out, r0, r1, nch, cps, nscale, spg):  # pragma: no cover - jitted
    call_a8(addr, stream.ctypes.data, wscale.ctypes.data, corr.ctypes.data, xu.ctypes.data, xs.ctypes.data,
            out.ctypes.data, r0, r1, nch, cps, nscale, spg)


@njit(parallel=True, error_model="numpy", cache=True)
def _run(addr, stream, wscale, corr, x, rows, nch, cps, nscale, spg, tasks):  # pragma: no cover - jitted
    """Quantize ``x (cols,)``, then split the rows (in quads) over ``tasks`` threads; an empty
    array when ``x`` is not finite."""
    nxb = (nch + 3) // 4
    xu = np.full(nxb * XBLOCK, 128, np.uint8)
    xs = np.empty(nxb, np.float32)
    if not _quantize(x, xu, xs):
        return np.empty(0, np.float32)
    out = np.empty(rows, np.float32)
    step = ((rows + tasks - 1) // tasks + 3) // 4 * 4
    for t in prange(tasks):
        r0 = t * step
        r1 = min(rows, r0 + step)
        if r0 < r1:
            _rows(addr, stream, wscale, corr, xu, xs, out, r0, r1, nch, cps, nscale, spg)
    return out


def address(variant: str, prefetch: Optional[int] = None) -> int:
    """The kernel's address, for ``runtime.ffi.call_a8``."""
    return ctypes.cast(compiled_functions(variant, prefetch)["int8"], ctypes.c_void_p).value


def dense_a8_matmul(plan: dict, x: Union[torch.Tensor, np.ndarray], threads: int = 1,
                    variant: Optional[str] = None) -> Optional[torch.Tensor]:
    """``x (1, cols)`` float32 -> ``(1, rows)`` float32 tensor with :func:`prepare`'s plan and the
    best variant under the CPU cap (or ``variant``); None when ``x`` holds NaN or infinity
    (INT8 cannot carry them: the caller takes the float path)."""
    if variant is None:
        variant, reasons = best_variant()
        if variant is None:
            raise RuntimeError("no dense A8 kernel runs here: " + "; ".join(f"{k}: {v}" for k, v in reasons.items()))
    else:
        why = variant_reason(variant)
        if why:
            raise RuntimeError(f"dense A8 {variant}: {why}")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    rows, cols = plan["rows"], plan["cols"]
    if x.ndim != 2 or x.shape != (1, cols):
        raise ValueError(f"dense A8 takes one row x (1, {cols}), got {x.shape}")
    xv = np.ascontiguousarray(x[0], np.float32)
    tasks = max(1, threads) if rows >= MIN_ROWS_PER_THREAD * max(1, threads) else 1
    out = _run(address(variant), plan["stream"], plan["scale"], plan["corr"], xv, rows, plan["npairs"],
               plan["tail"], plan["nscale"], plan["xb_per_q"], tasks)
    return torch.from_numpy(out).reshape(1, rows) if out.size else None


def stream_rows(plan: dict, ids) -> np.ndarray:
    """int8 ``(len(ids), cols)``: the codes of rows ``ids`` read back from the quad-interleaved
    stream (a tied embedding can look tokens up here instead of keeping its own copy)."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= plan["rows"]):
        raise IndexError(f"row ids must lie in [0, {plan['rows']}), got {ids.min()}..{ids.max()}")
    nch = plan["npairs"]
    quads = plan["stream"].reshape(-1, nch, QUAD, CHUNK)
    return quads[ids // QUAD, :, ids % QUAD, :].reshape(ids.size, nch * CHUNK)[:, : plan["cols"]].view(np.int8)


def reference(codes: Union[torch.Tensor, np.ndarray], scale: Union[torch.Tensor, np.ndarray], group_size: int,
              x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """float64 numpy: ``(codes * scale) @ x_hat`` with ``x_hat = xq * xs`` the activations as
    ``cpu_vnni._quantize`` rounds them; ``x (1, cols)`` -> ``(1, rows)``. The kernels return
    this rounded once to float32 (up to double rounding noise)."""
    c = np.asarray(codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else codes).astype(np.float64)
    s = np.asarray(scale.detach().cpu().float().numpy() if isinstance(scale, torch.Tensor) else scale, np.float64)
    xv = np.ascontiguousarray(np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)[0], np.float32)
    rows, cols = c.shape
    nxb = -(-cols // XBLOCK)
    xu = np.full(nxb * XBLOCK, 128, np.uint8)
    xs = np.empty(nxb, np.float32)
    if not _quantize(xv, xu, xs):
        raise ValueError("activations hold NaN or infinity")
    x_hat = (xu[:cols].astype(np.float64) - 128) * np.repeat(xs.astype(np.float64), XBLOCK)[:cols]
    s = s.reshape(rows, -1)
    w = c * (s if group_size == 0 else np.repeat(s, group_size, 1)[:, :cols])
    return (w @ x_hat).reshape(1, rows)
