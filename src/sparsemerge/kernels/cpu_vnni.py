"""2:4 + INT8/INT4 at batch 1 with AVX-512 VBMI + VNNI: select the inputs, then integer dot products.

The blend kernels of ``kernels/cpu.py`` spend ~15 vector instructions per 32 kept weights on
picking inputs and converting codes; at batch 1 they are instruction-bound. This kernel works
row by row on 128 input columns (a *pair* of 64-column chunks) at a time and never expands the
weights; it gathers the activations the kept weights need instead:

* metadata: the 2-bit in-group position ``p_j`` of each kept weight (4 bits per 2:4 group, the
  same size as a keep-bitmask), 16 bytes per pair, laid out so that one 128-bit broadcast load
  and one ``vpmultishiftqb`` put ``p_j`` into the low bits of byte ``j``; ``vpternlogd`` forms
  the index ``4 * (j // 2) + p_j`` (the group's first column plus the position);
* ``vpermi2b`` picks those 64 of the pair's 128 INT8 activations (a two-register table);
* ``vpdpbusd`` multiplies them with the 64 kept INT8 weights, straight from memory, and adds
  them in 16 int32 lanes: 64 multiply-adds per instruction, four vector instructions per pair.

On Zen 4 this is ~4 zmm instructions per 64 kept weights against ~6 plus a 1.2-cycle
``vpexpandb`` for expanding the weights to their columns (the previous design), so the kernel
becomes memory-bound.

Numerics: the activations are quantized per call (dynamic, symmetric, per block of 256
inputs, like llama.cpp's Q8 activations): ``x ~ xs_b * xq`` with ``xq = round(x / xs_b)``,
``xs_b = max|x_b| / 127``. ``vpdpbusd`` needs one unsigned operand, so the kernel reads the
activations as ``xu = xq + 128`` and the weights as signed codes ``c`` (INT4: the nibble minus
its zero point 8, stored as a two's-complement nibble and sign-extended by one
``vgf2p8affineqb``): ``sum_j c_j xu_j = sum_j c_j xq_j + 128 sum_j c_j``. The second term
depends only on the weights; it is stored per row and block at packing time (``-128 sum c``)
and starts the block's int32 accumulator, so each block's dot product is exact and the result
is ``out_r = sum_b s_rb * dot_b`` with ``s_rb = weight scale * xs_b``.
The activation rounding adds a relative error of ~0.4% per block to the weight codec's; it is
therefore opt-in (``SparsifyConfig.act_quant="int8"``, ``sparsemerge run/bench --act-quant int8``);
:func:`reference_w8a8` is the pure-torch statement of the same arithmetic that tests compare
against.

The kernel is LLVM IR (compiled by :mod:`sparsemerge.kernels.llvm_jit`), called from a numba
``prange`` over row ranges. :func:`unavailable_reason` says why it cannot run (CPU
without AVX-512 VBMI/VNNI/GFNI, layer not 2:4, columns not a multiple of 64, asymmetric codes...).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import numpy as np
import torch
from numba import njit

from sparsemerge.kernels.layout import BlockedNM, positions_of, unblock
from sparsemerge.kernels.llvm_jit import a8_block_end, compile_functions, features_missing

CHUNK = 64  # input columns of a tail chunk (a row ends with at most one)
PAIR = 128  # input columns per vpermi2b table / vpdpbusd
XBLOCK = 256  # input columns per activation scale (two pairs)
REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512vbmi", "avx512vnni", "gfni")
# software prefetch this many bytes ahead of the pair being read (0: none), as the AVX2 kernels
# do (cpu_avx2.A8_PREFETCH_BYTES). On a Zen 4 VM (benchmarks/bench_prefetch.py --vnni512, one
# thread) SmolLM2 2:4 decoding gained 1.23-1.38x (INT4 g128) and 1.30x (INT8) at 8192 bytes
# against none, 1.20x at 4096, 1.30x at 16384; the 4096x4096 GEMV 1.09-1.26x.
PREFETCH_BYTES = 8192


def _vec(values, ty: str = "i8") -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# byte j of a pair's metadata vector: the field of kept weight j sits in qword (j // 8) % 2 of the
# 16 metadata bytes at bit 2 * (8 * (j // 16) + j % 8); a 128-bit broadcast repeats the two qwords
# so that qword j // 8 of the vector holds it, and vpmultishiftqb shifts it to the byte's low bits
META_QWORD = [(j // 8) % 2 for j in range(64)]
META_SHIFT = [2 * (8 * (j // 16) + j % 8) for j in range(64)]
_SHIFTS = _vec(META_SHIFT)
_GROUP_BASE = _vec([4 * (j // 2) for j in range(64)])  # the first column of kept weight j's group
_THREE = _vec([3] * 64)


def _affine_matrix(rows: list[int]) -> int:
    """The qword of ``vgf2p8affineqb`` whose output bit ``i`` is the parity of ``x & rows[i]``."""
    return sum(r << (8 * (7 - i)) for i, r in enumerate(rows))


# sign-extend the low / high nibble of every byte (bits 0-3 / 4-7, the top bit copied upwards)
_LOW_NIBBLE = _affine_matrix([1, 2, 4, 8, 8, 8, 8, 8])
_HIGH_NIBBLE = _affine_matrix([16, 32, 64, 128, 128, 128, 128, 128])
# pair: 32 bytes broadcast to both halves, byte i = weight i | weight 32+i << 4
_PAIR_NIBBLES = _vec([_LOW_NIBBLE] * 4 + [_HIGH_NIBBLE] * 4, "i64")
# tail: 16 bytes broadcast to all four quarters, byte i = weight i | weight 16+i << 4, upper half 0
_TAIL_NIBBLES = _vec([_LOW_NIBBLE] * 2 + [_HIGH_NIBBLE] * 2 + [0] * 4, "i64")
_BCAST2 = _vec([0, 1] * 4, "i32")
_BCAST32 = _vec([i % 32 for i in range(64)], "i32")
_BCAST16 = _vec([i % 16 for i in range(64)], "i32")
_LOW32 = _vec(list(range(32)) + [32] * 32, "i32")  # 32 loaded bytes, then zeros

# %acc{S}' = %acc{S} + dot(selected activations, kept weights) of pair %p{S} of the row.
_PAIR_STEP = """
  %mo{S} = mul i64 %p{S}, PAIR_STRIDE
  %mp{S} = getelementptr i8, ptr %mrow, i64 %mo{S}
PREFETCH  %m2{S} = load <2 x i64>, ptr %mp{S}, align 1
  %m8{S} = shufflevector <2 x i64> %m2{S}, <2 x i64> poison, <8 x i32> BCAST2
  %mb{S} = bitcast <8 x i64> %m8{S} to <64 x i8>
  %ms{S} = call <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8> SHIFTS, <64 x i8> %mb{S})
  %pj{S} = and <64 x i8> %ms{S}, THREE
  %ix{S} = or <64 x i8> %pj{S}, GROUP_BASE
  %xo{S} = mul i64 %p{S}, 128
  %xlp{S} = getelementptr i8, ptr %xu, i64 %xo{S}
  %xhp{S} = getelementptr i8, ptr %xlp{S}, i64 64
  %xl{S} = load <64 x i8>, ptr %xlp{S}, align 1
  %xh{S} = load <64 x i8>, ptr %xhp{S}, align 1
  %xsel{S} = call <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8> %xl{S}, <64 x i8> %ix{S}, <64 x i8> %xh{S})
WEIGHTS
  %accn{S} = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %acc{S}, <64 x i8> %xsel{S}, <64 x i8> %w{S})
"""
# software prefetch DISTANCE bytes ahead of the pair being read (read, all cache levels, data;
# a prefetch never faults past the stream's end), one per 64-byte line a pair covers
_PREFETCH_LINE = """
  %pf{S}L = getelementptr i8, ptr %mp{S}, i64 OFFSET
  call void @llvm.prefetch.p0(ptr %pf{S}L, i32 0, i32 3, i32 1)
"""
_W_INT8_PAIR = """
  %wo{S} = mul i64 %p{S}, PAIR_STRIDE
  %wp{S} = getelementptr i8, ptr %vrow, i64 %wo{S}
  %w{S} = load <64 x i8>, ptr %wp{S}, align 1
"""
_W_INT8_TAIL = """
  %wo{S} = mul i64 %p{S}, PAIR_STRIDE
  %wp{S} = getelementptr i8, ptr %vrow, i64 %wo{S}
  %w32{S} = load <32 x i8>, ptr %wp{S}, align 1
  %w{S} = shufflevector <32 x i8> %w32{S}, <32 x i8> zeroinitializer, <64 x i32> LOW32
"""
_W_INT4_PAIR = """
  %wo{S} = mul i64 %p{S}, PAIR_STRIDE
  %wp{S} = getelementptr i8, ptr %vrow, i64 %wo{S}
  %w32{S} = load <32 x i8>, ptr %wp{S}, align 1
  %wn{S} = shufflevector <32 x i8> %w32{S}, <32 x i8> poison, <64 x i32> BCAST32
  %wm{S} = bitcast <8 x i64> PAIR_NIBBLES to <64 x i8>
  %w{S} = call <64 x i8> @llvm.x86.vgf2p8affineqb.512(<64 x i8> %wn{S}, <64 x i8> %wm{S}, i8 0)
"""
_W_INT4_TAIL = """
  %wo{S} = mul i64 %p{S}, PAIR_STRIDE
  %wp{S} = getelementptr i8, ptr %vrow, i64 %wo{S}
  %w16{S} = load <16 x i8>, ptr %wp{S}, align 1
  %wn{S} = shufflevector <16 x i8> %w16{S}, <16 x i8> poison, <64 x i32> BCAST16
  %wm{S} = bitcast <8 x i64> TAIL_NIBBLES to <64 x i8>
  %w{S} = call <64 x i8> @llvm.x86.vgf2p8affineqb.512(<64 x i8> %wn{S}, <64 x i8> %wm{S}, i8 0)
"""

_IR = """
declare <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8>, <64 x i8>)
declare <64 x i8> @llvm.x86.avx512.vpermi2var.qi.512(<64 x i8>, <64 x i8>, <64 x i8>)
declare <64 x i8> @llvm.x86.vgf2p8affineqb.512(<64 x i8>, <64 x i8>, i8)
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)

; out[r] = sum_b wscale[r, b / xb_per_q] * xs[b] * (corr[r, b] + sum over block b of xu * c)
; a row is one byte stream: npairs pairs of 16 metadata bytes + PAIR_BYTES weight bytes and, if
; tail = 1, one 64-column chunk (16 metadata bytes + TAIL_BYTES weight bytes) at the end
; (a separate metadata array was a second stream per row and cost ~15% of the bandwidth)
define void @NAME(ptr %stream, ptr %wscale, ptr %corr, ptr %xu, ptr %xs, ptr %out,
                  i64 %r0, i64 %r1, i64 %npairs, i64 %tail, i64 %nscale, i64 %xb_per_q) {
entry:
  %nunits = add i64 %npairs, %tail
  %nxb = lshr i64 %nunits, 1
  %nxbr = and i64 %nunits, 1
  %nxbt = add i64 %nxb, %nxbr
  %vstride0 = mul i64 %npairs, PAIR_STRIDE
  %vstride1 = mul i64 %tail, TAIL_STRIDE
  %vstride = add i64 %vstride0, %vstride1
  br label %rowloop
rowloop:
  %r = phi i64 [ %r0, %entry ], [ %rnext, %rowend ]
  %rdone = icmp uge i64 %r, %r1
  br i1 %rdone, label %exit, label %rowbody
rowbody:
  %mro = mul i64 %r, %vstride
  %mrow = getelementptr i8, ptr %stream, i64 %mro
  %vrow = getelementptr i8, ptr %mrow, i64 16
  %cro = mul i64 %r, %nxbt
  %crow = getelementptr i32, ptr %corr, i64 %cro
  %sro = mul i64 %r, %nscale
  %srow = getelementptr float, ptr %wscale, i64 %sro
  br label %xbloop
xbloop:
  %xb = phi i64 [ 0, %rowbody ], [ %xbnext, %xbend ]
  %accf = phi <16 x float> [ zeroinitializer, %rowbody ], [ %accf2, %xbend ]
  %q = phi i64 [ 0, %rowbody ], [ %qnext, %xbend ]
  %qc = phi i64 [ 0, %rowbody ], [ %qcnext, %xbend ]
  %xbdone = icmp uge i64 %xb, %nxbt
  br i1 %xbdone, label %rowend, label %xbbody
xbbody:
  %cp = getelementptr i32, ptr %crow, i64 %xb
  %cv = load i32, ptr %cp, align 4
  %acc0 = insertelement <16 x i32> zeroinitializer, i32 %cv, i32 0
  %p0 = shl i64 %xb, 1
  %p1 = add i64 %p0, 1
  %full = icmp ult i64 %p1, %npairs
  br i1 %full, label %fullblock, label %lastblock
fullblock:
PAIR0
PAIR1
  br label %xbend
lastblock:
  %haspair = icmp ult i64 %p0, %npairs
  br i1 %haspair, label %lastpair, label %lasttail0
lastpair:
PAIRL
  br label %lasttail0
lasttail0:
  %acct = phi <16 x i32> [ %acc0, %lastblock ], [ %accnl, %lastpair ]
  %pt = phi i64 [ %p0, %lastblock ], [ %p1, %lastpair ]
  %hastail = icmp ne i64 %tail, 0
  br i1 %hastail, label %lasttail, label %xbend
lasttail:
TAIL
  br label %xbend
xbend:
  %acci = phi <16 x i32> [ %accn1, %fullblock ], [ %acct, %lasttail0 ], [ %accnt, %lasttail ]
A8_BLOCK_END
"""


def _step(suffix: str, weights: str, pair: str, acc: str, prefetch: str = "") -> str:
    """One pair (or tail) step named by ``suffix``: pair index ``pair``, accumulator ``acc`` in,
    ``%accn{suffix}`` out; ``prefetch``: its prefetch instructions (or none)."""
    body = _PAIR_STEP.replace("PREFETCH", prefetch).replace("WEIGHTS", weights).replace("%p{S}", pair).replace("%acc{S}", acc)
    return body.replace("{S}", suffix)


def _prefetch_ir(distance: int, stride: int) -> str:
    """Prefetches ``distance`` bytes ahead of a pair of ``stride`` bytes: one per 64-byte line."""
    if distance <= 0:
        return ""
    return "".join(_PREFETCH_LINE.replace("L", str(i)).replace("OFFSET", str(distance + 64 * i))
                   for i in range((stride + 63) // 64))


def _kernel_ir(name: str, codec: str, prefetch: int = 0) -> str:
    pair_w, tail_w = (_W_INT8_PAIR, _W_INT8_TAIL) if codec == "int8" else (_W_INT4_PAIR, _W_INT4_TAIL)
    pf = _prefetch_ir(prefetch, 80 if codec == "int8" else 48)
    ir = (_IR.replace("NAME", name)
          .replace("PAIR_BYTES", "64" if codec == "int8" else "32").replace("TAIL_BYTES", "32" if codec == "int8" else "16")
          .replace("PAIR0", _step("0", pair_w, "%p0", "%acc0", pf))
          .replace("PAIR1", _step("1", pair_w, "%p1", "%accn0", pf))
          .replace("PAIRL", _step("l", pair_w, "%p0", "%acc0"))
          .replace("\nTAIL\n", "\n" + _step("t", tail_w, "%pt", "%acct") + "\n")
          .replace("PAIR_STRIDE", "80" if codec == "int8" else "48").replace("TAIL_STRIDE", "48" if codec == "int8" else "32"))
    for key, value in (("BCAST2", _BCAST2), ("BCAST32", _BCAST32), ("BCAST16", _BCAST16), ("LOW32", _LOW32),
                       ("SHIFTS", _SHIFTS), ("THREE", _THREE), ("GROUP_BASE", _GROUP_BASE),
                       ("PAIR_NIBBLES", _PAIR_NIBBLES), ("TAIL_NIBBLES", _TAIL_NIBBLES)):
        ir = ir.replace(key, value)
    return ir.replace("A8_BLOCK_END", a8_block_end(16))


def cpu_features_missing() -> list[str]:
    return features_missing(REQUIRED_FEATURES)


@functools.lru_cache(maxsize=None)
def _compiled_fns(prefetch: Optional[int] = None) -> tuple[Optional[dict], Optional[str]]:
    """({codec: ctypes function}, None) or (None, reason). Compiled once per process and
    prefetch distance (None: :data:`PREFETCH_BYTES`; the benchmark compiles several)."""
    distance = PREFETCH_BYTES if prefetch is None else int(prefetch)
    try:
        missing = cpu_features_missing()
        if missing:
            return None, f"the CPU lacks {', '.join(missing)}"
        proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 6), *([ctypes.c_int64] * 6))
        fns = compile_functions("\n".join(_kernel_ir(f"gemv24_{c}_a8", c, distance) for c in ("int8", "int4")),
                                {f"gemv24_{c}_a8": proto for c in ("int8", "int4")})
        return {c: fns[f"gemv24_{c}_a8"] for c in ("int8", "int4")}, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the VNNI kernel: {exc}"


def compiled_functions() -> dict:
    """``{"int8": fn, "int4": fn}``: the raw ctypes functions ``fn(stream, wscale, corr, xu, xs,
    out, r0, r1, npairs, tail, nscale, xb_per_q)`` (six pointers, six int64s) for callers that
    close over them in their own numba code. Raises RuntimeError when unavailable."""
    fns, reason = _compiled_fns(PREFETCH_BYTES)  # keyed by the distance in force now
    if fns is None:
        raise RuntimeError(reason)
    return fns


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[Optional[dict], Optional[str]]:
    """({codec: numba runner}, None) or (None, reason)."""
    fns, reason = _compiled_fns()
    return (None, reason) if fns is None else ({c: _row_runner(f) for c, f in fns.items()}, None)


@njit(cache=True)
def _quantize(x, xu, xs):  # pragma: no cover - jitted
    """Symmetric INT8 per block of 256: ``xs_b = max|x_b| / 127`` (1 for an all-zero block),
    ``xq = rint(x / xs_b)``, stored as ``xu = xq + 128`` (unsigned) - the padding of ``xu``
    beyond ``x`` stays as it is. False (nothing written) when ``x`` holds NaN or infinity."""
    cols = x.shape[0]
    amax_all = np.float32(0.0)
    for j in range(cols):
        amax_all = max(amax_all, abs(x[j]))
    if not np.isfinite(amax_all) or np.isnan(x.sum()):
        return False
    for b in range(xs.shape[0]):
        j0 = b * XBLOCK
        j1 = min(cols, j0 + XBLOCK)
        amax = np.float32(0.0)
        for j in range(j0, j1):
            amax = max(amax, abs(x[j]))
        step = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        xs[b] = step
        inv = np.float32(1.0) / step
        for j in range(j0, j1):
            q = min(max(np.rint(x[j] * inv), np.float32(-127.0)), np.float32(127.0))
            xu[j] = np.uint8(np.int32(q) + 128)
    return True


def _row_runner(fn):
    """One numba call per matmul: quantize ``x (1, cols)``, then split the rows over numba's
    threads and call ``fn`` on each range (a ctypes function pointer, called without the GIL);
    returns ``out (1, rows)``, or an empty array when ``x`` is not finite (the caller takes the
    float path). Python-side work per call matters: a decoding step calls ~200 small layers,
    and every torch/numpy call costs microseconds, tens of them with cold caches."""
    import numba

    @numba.njit(parallel=True)
    def run(stream, wscale, corr, x2, rows, npairs, tail, nscale, xb_per_q, tasks):  # pragma: no cover - jitted
        x = x2[0]
        nxb = (2 * npairs + tail + 3) // 4
        xu = np.full((npairs + 1) * PAIR, 128, np.uint8)
        xs = np.empty(nxb, np.float32)
        if not _quantize(x, xu, xs):
            return np.empty((0, 0), np.float32)
        out = np.empty((1, rows), np.float32)
        step = (rows + tasks - 1) // tasks
        for t in numba.prange(tasks):
            r0 = t * step
            r1 = min(rows, r0 + step)
            if r0 < r1:
                fn(stream.ctypes.data, wscale.ctypes.data, corr.ctypes.data, xu.ctypes.data,
                   xs.ctypes.data, out.ctypes.data, r0, r1, npairs, tail, nscale, xb_per_q)
        return out

    return run


def unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when this kernel can run ``layer`` at batch 1; else why not."""
    return layout_reason(layer) or _compiled_fns()[1]


def layout_reason(layer: BlockedNM) -> Optional[str]:
    """Why a layer does not fit the INT8-activation kernels' arithmetic (this module's and the
    AVX2 ones of ``kernels/cpu_avx2.py``): 2:4, symmetric INT8 or INT4 (zero point 8),
    columns in 64s, scale groups covering whole 256-input activation blocks. None: it fits."""
    if not layer.is_24:
        return f"{layer.n}:{layer.m} is not 2:4"
    if layer.codec == "int8":
        if layer.zero is not None:
            return "asymmetric int8 codes (zero points) are not supported"
    elif layer.codec == "int4":
        if layer.zero is None or not bool((layer.zero == 8).all()):
            return "int4 codes need the symmetric zero point 8"
    else:
        return f"codec {layer.codec!r} is not int8/int4"
    if layer.cols % CHUNK:
        return f"input features {layer.cols} are not a multiple of {CHUNK}"
    gps = layer.groups_per_scale
    if layer.group_size is not None and (4 * gps) % XBLOCK:
        return f"a scale group covers {4 * gps} inputs, not a multiple of {XBLOCK}"
    return None


def _pack_meta(pos: np.ndarray) -> np.ndarray:
    """``pos (rows, units, 64)`` in-group positions (0..3) of each unit's kept weights -> the
    16 metadata bytes per unit (:data:`META_QWORD`, :data:`META_SHIFT`)."""
    rows, units, _ = pos.shape
    words = np.zeros((rows, units, 2), np.uint64)
    for j in range(64):
        words[:, :, META_QWORD[j]] |= pos[:, :, j].astype(np.uint64) << np.uint64(META_SHIFT[j])
    return words.reshape(rows, units * 16 // 8).view(np.uint8).reshape(rows, units * 16)


def _pack_nibbles(c: np.ndarray, width: int) -> np.ndarray:
    """Signed codes ``c (..., 2 * width)`` -> ``width`` bytes: byte i = c_i | c_{width+i} << 4."""
    n = c.astype(np.int16) & 15
    return (n[..., :width] | (n[..., width:] << 4)).astype(np.uint8)


def prepare(layer: BlockedNM) -> dict:
    """The row-major arrays the kernel reads (cached in ``layer.extra``)."""
    plan = layer.extra.get("vnni_plan")
    if plan is not None:
        return plan
    rows, cols = layer.rows, layer.cols
    npairs, tail = cols // PAIR, (cols % PAIR) // CHUNK
    nunits = npairs + tail
    pos = positions_of(layer).cpu().numpy().reshape(rows, cols // 2).astype(np.uint8)  # kept order = column order
    v = unblock(layer.values, rows).cpu().to(torch.int16)
    if layer.codec == "int4":  # two codes per byte, low nibble first; zero point 8
        v = torch.stack([v & 15, (v & 255) >> 4], -1).reshape(rows, -1) - 8
    c = v.reshape(rows, cols // 2).numpy()  # signed codes, column order
    # metadata: 64 kept weights per unit (a tail's last 32 fields stay 0 and meet zero weights)
    pos_units = np.zeros((rows, nunits, 64), np.uint8)
    pos_units.reshape(rows, -1)[:, : cols // 2] = pos
    meta = _pack_meta(pos_units)
    pair_c = c[:, : npairs * 64].reshape(rows, npairs, 64)
    tail_c = c[:, npairs * 64:].reshape(rows, tail, 32)
    if layer.codec == "int8":
        pair_w, tail_w = pair_c.astype(np.int8).view(np.uint8), tail_c.astype(np.int8).view(np.uint8)
    else:
        pair_w, tail_w = _pack_nibbles(pair_c, 32), _pack_nibbles(tail_c, 16)
    meta = meta.reshape(rows, nunits, 16)
    # one byte stream per row: each unit's 16 metadata bytes, then its weights
    stream = np.concatenate([np.concatenate([meta[:, :npairs], pair_w], 2).reshape(rows, -1),
                             np.concatenate([meta[:, npairs:], tail_w], 2).reshape(rows, -1)], 1)
    nxb = -(-cols // XBLOCK)
    block_sums = np.zeros((rows, nxb * 128), np.int64)
    block_sums[:, : cols // 2] = c
    corr = (-128 * block_sums.reshape(rows, nxb, 128).sum(2)).astype(np.int32)
    scale = unblock(layer.scale, rows).cpu().float().contiguous().numpy()
    xb_per_q = nxb if layer.group_size is None else (4 * layer.groups_per_scale) // XBLOCK
    plan = {
        "stream": np.ascontiguousarray(stream),
        "scale": np.ascontiguousarray(scale),
        "corr": np.ascontiguousarray(corr),
        "npairs": npairs,
        "tail": tail,
        "nscale": scale.shape[1],
        "xb_per_q": max(1, xb_per_q),
    }
    plan["nbytes"] = sum(plan[k].nbytes for k in ("stream", "scale", "corr"))
    layer.extra["vnni_plan"] = plan
    return plan


def quantize_activations(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(xq int8 (cols,), xs float32 (nxb,))`` for one input row, as the kernel computes them
    (:func:`_quantize`; the kernel reads ``xq + 128``)."""
    xn = np.ascontiguousarray(x.reshape(-1).detach().float().numpy())
    cols = xn.shape[0]
    nxb = -(-cols // XBLOCK)
    xu = np.full(nxb * XBLOCK, 128, np.uint8)
    xs = np.empty(nxb, np.float32)
    if not _quantize(xn, xu, xs):
        raise ValueError("activations hold NaN or infinity")
    return (xu[:cols].astype(np.int16) - 128).astype(np.int8), xs


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """``x (..., cols)`` rounded as the kernel sees it (every row on its own, per block of 256:
    ``xs_b * round(x / xs_b)``), in float - to evaluate a whole sequence at once with the
    decoding kernel's activation error (e.g. perplexity)."""
    cols = x.shape[-1]
    nxb = -(-cols // XBLOCK)
    rows = x.reshape(-1, cols).float()
    pad = torch.nn.functional.pad(rows, (0, nxb * XBLOCK - cols)).reshape(rows.shape[0], nxb, XBLOCK)
    amax = pad.abs().amax(dim=2, keepdim=True)
    xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    deq = torch.round(pad / xs).clamp_(-127, 127) * xs
    return deq.reshape(rows.shape[0], -1)[:, :cols].reshape(x.shape).to(x.dtype)


def fake_quant_inputs(model: torch.nn.Module, names: list[str]) -> list:
    """Forward pre-hooks that pass the inputs of the modules ``names`` through
    :func:`fake_quant_activations`; returns the handles (``h.remove()`` to undo)."""
    return [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args: (fake_quant_activations(args[0]), *args[1:]))
        for n in names
    ]


def runner_for(layer: BlockedNM) -> tuple:
    """``(run, args)``: ``run(*args[:3], x, *args[3:], tasks)`` returns ``out (1, rows)`` for
    one float32 input row ``x (1, cols)`` (numpy), an empty array when ``x`` is not finite."""
    fns, reason = _compiled()
    if fns is None:
        raise RuntimeError(reason)
    plan = prepare(layer)
    args = (plan["stream"], plan["scale"], plan["corr"], layer.rows, plan["npairs"], plan["tail"],
            plan["nscale"], plan["xb_per_q"])
    return fns[layer.codec], args


def vnni_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> Optional[torch.Tensor]:
    """``x (1, cols)`` float32 -> ``(1, rows)`` with the VNNI kernel; None when ``x`` holds NaN
    or infinity (INT8 cannot carry them: the caller takes the float path)."""
    cached = layer.extra.get("vnni_runner")
    if cached is None:
        cached = layer.extra["vnni_runner"] = runner_for(layer)
    run, args = cached
    out = run(*args[:3], x.numpy(), *args[3:], threads if layer.rows >= 128 * threads else 1)
    return torch.from_numpy(out) if out.size else None


def token_runner(layer: BlockedNM):
    """``x (..., cols) float32 CPU with one row -> (1, rows)``, or None when ``x`` is not finite
    (the caller then takes a float row): the batch-1 shortcut of the registry row."""
    from sparsemerge.kernels.threads import row_tasks, sync_threads

    run, args = runner_for(layer)
    rows = layer.rows

    def token(x: torch.Tensor):
        sync_threads()
        out = run(*args[:3], x.detach().numpy().reshape(1, -1), *args[3:], row_tasks(rows))
        return torch.from_numpy(out) if out.size else None

    return token


def reference_w8a8(layer: BlockedNM, x: torch.Tensor) -> torch.Tensor:
    """Pure torch: the same arithmetic as the kernel (activation blocks of 256, integer dots),
    in float64 - what tests compare the kernel with."""
    from sparsemerge.kernels.layout import to_dense

    xq, xs = quantize_activations(x)
    x_hat = torch.from_numpy(xq.astype(np.float64)) * torch.from_numpy(xs.astype(np.float64)).repeat_interleave(XBLOCK)[: layer.cols]
    return (to_dense(layer).double() @ x_hat).float().unsqueeze(0)
