"""numba CPU kernels for the row-blocked N:M layout (``kernels/layout.py``).

Batch 1 (decoding) is memory-bound: a 2:4 float32 layer reads half the value bytes of the
dense one plus 4 bits of metadata per group (``0.5 + 1/16`` of dense = 0.5625), INT8
``0.125 + 1/32``, INT4 ``0.0625 + 1/32`` (chapter 10.1.8). The 2:4 kernels work on blocks
of R = 64 output rows: for every group of 4 inputs they broadcast ``x[4g..4g+3]`` and pick
each row's two inputs with bit tests on the metadata word and two blends per slot
(``vptestnmd`` + ``vblendmps`` on AVX-512), then two FMAs. Quantized codes are accumulated
unscaled per quantization group and scaled once per group: ``acc += s * sum (c - z) x``.

Batch > 1 with 2:4 decodes (dequantizes) each group's 2 x R values once and then, for every
batch row, blends and accumulates as above: the decode is shared by the batch. General N:M
(any batch) decodes each (group, slot) run of R values once and updates
``acc[r, :B] += w[r] * xT[g*m + p[r], :B]`` (a gather of x at batch 1).

Why helpers: numba/LLVM vectorizes a float reduction in a separate ``@njit(fastmath=True)``
function called from the ``prange`` body, but not when the loop is written inside the
``prange`` loop itself. Thresholds in the bit tests are int32 arrays so that the tests stay
32-bit (numba widens integer arithmetic on scalars to 64 bits).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit, prange

from sparsemerge.kernels.cpu_general import BF16, F16, F32, Q4, Q8, _decode_run, general_matmul, general_matmul_serial
from sparsemerge.kernels.layout import BLOCK_ROWS, BlockedNM
from sparsemerge.kernels.threads import sync_threads

R = BLOCK_ROWS
BITS = np.array([np.uint32(1) << np.uint32(i) for i in range(32)], dtype=np.uint32)
FP16_SCALE = np.float32(2.0**112)  # (bits of |h| << 13) as float32 * 2^112 == |h| for finite halves



# ---------------------------------------------------------------- 2:4 batch 1, float32
@njit(fastmath=True, cache=True)
def _g24_f32_block(vals, meta, x, out, blk, bits):
    acc = np.zeros(R, np.float32)
    G = vals.shape[1]
    for g in range(G):
        m = meta[blk, g >> 3]
        j = (g & 7) * 4
        b0 = bits[j]
        b1 = bits[j + 1]
        b2 = bits[j + 2]
        b3 = bits[j + 3]
        x0 = x[4 * g]
        x1 = x[4 * g + 1]
        x2 = x[4 * g + 2]
        x3 = x[4 * g + 3]
        v0 = vals[blk, g, 0]
        v1 = vals[blk, g, 1]
        for r in range(R):
            mm = m[r]
            xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
            xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
            acc[r] += v0[r] * xa + v1[r] * xb
    for r in range(R):
        out[blk * R + r] = acc[r]


@njit(parallel=True, cache=True)
def gemv24_f32(vals, meta, x, out, bits):
    for blk in prange(vals.shape[0]):
        _g24_f32_block(vals, meta, x, out, blk, bits)


# ---------------------------------------------------------------- 2:4 batch 1, bf16 / fp16 values
@njit(fastmath=True, cache=True)
def _g24_half_block(vals, kind, meta, x, out, blk, bits, scale16):
    acc = np.zeros(R, np.float32)
    tmp = np.empty(2 * R, np.uint32)
    tmpf = tmp.view(np.float32)
    G = vals.shape[1]
    for g in range(G):
        v = vals[blk, g]  # (2, R) uint16
        if kind == BF16:
            for r in range(R):
                tmp[r] = np.uint32(v[0, r]) << np.uint32(16)
                tmp[R + r] = np.uint32(v[1, r]) << np.uint32(16)
        else:
            for r in range(R):
                h0 = np.uint32(v[0, r])
                h1 = np.uint32(v[1, r])
                tmp[r] = (h0 & np.uint32(0x7FFF)) << np.uint32(13)
                tmp[R + r] = (h1 & np.uint32(0x7FFF)) << np.uint32(13)
            for r in range(R):
                s0 = np.float32(-1.0) if np.uint32(v[0, r]) & np.uint32(0x8000) else np.float32(1.0)
                s1 = np.float32(-1.0) if np.uint32(v[1, r]) & np.uint32(0x8000) else np.float32(1.0)
                tmpf[r] = tmpf[r] * scale16 * s0
                tmpf[R + r] = tmpf[R + r] * scale16 * s1
        m = meta[blk, g >> 3]
        j = (g & 7) * 4
        b0 = bits[j]
        b1 = bits[j + 1]
        b2 = bits[j + 2]
        b3 = bits[j + 3]
        x0 = x[4 * g]
        x1 = x[4 * g + 1]
        x2 = x[4 * g + 2]
        x3 = x[4 * g + 3]
        for r in range(R):
            mm = m[r]
            xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
            xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
            acc[r] += tmpf[r] * xa + tmpf[R + r] * xb
    for r in range(R):
        out[blk * R + r] = acc[r]


@njit(parallel=True, cache=True)
def gemv24_half(vals, kind, meta, x, out, bits, scale16):
    for blk in prange(vals.shape[0]):
        _g24_half_block(vals, kind, meta, x, out, blk, bits, scale16)


# ---------------------------------------------------------------- 2:4 batch 1, INT8 / INT4 codes
@njit(fastmath=True, cache=True)
def _g24_q_block(codes, bits4, meta, scale, zero, has_zero, gps, x, out, blk, bits):
    acc = np.zeros(R, np.float32)
    part = np.zeros(R, np.float32)
    G = codes.shape[1]
    Q = scale.shape[1]
    for q in range(Q):
        for r in range(R):
            part[r] = 0.0
        g1 = min(G, (q + 1) * gps)
        zq = zero[blk, q] if has_zero else scale[blk, q]  # (R,), unused when symmetric
        for g in range(q * gps, g1):
            m = meta[blk, g >> 3]
            j = (g & 7) * 4
            b0 = bits[j]
            b1 = bits[j + 1]
            b2 = bits[j + 2]
            b3 = bits[j + 3]
            x0 = x[4 * g]
            x1 = x[4 * g + 1]
            x2 = x[4 * g + 2]
            x3 = x[4 * g + 3]
            if bits4:
                c = codes[blk, g, 0]  # (R,) uint8: slot 0 low nibble, slot 1 high nibble
                for r in range(R):
                    mm = m[r]
                    xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
                    xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
                    cr = np.int32(c[r])
                    c0 = np.float32(cr & 15) - zq[r]
                    c1 = np.float32(cr >> 4) - zq[r]
                    part[r] += c0 * xa + c1 * xb
            elif has_zero:
                c0v = codes[blk, g, 0]
                c1v = codes[blk, g, 1]
                for r in range(R):
                    mm = m[r]
                    xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
                    xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
                    part[r] += (np.float32(c0v[r]) - zq[r]) * xa + (np.float32(c1v[r]) - zq[r]) * xb
            else:
                c0v = codes[blk, g, 0]
                c1v = codes[blk, g, 1]
                for r in range(R):
                    mm = m[r]
                    xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
                    xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
                    part[r] += np.float32(c0v[r]) * xa + np.float32(c1v[r]) * xb
        sq = scale[blk, q]
        for r in range(R):
            acc[r] += part[r] * sq[r]
    for r in range(R):
        out[blk * R + r] = acc[r]


@njit(parallel=True, cache=True)
def gemv24_q(codes, bits4, meta, scale, zero, has_zero, gps, x, out, bits):
    for blk in prange(codes.shape[0]):
        _g24_q_block(codes, bits4, meta, scale, zero, has_zero, gps, x, out, blk, bits)


# ---------------------------------------------------------------- 2:4, batch > 1
@njit(fastmath=True, cache=True)
def _g24_batch_block(vals, kind, meta, scale, zero, has_zero, gps, x, out, blk, bits, scale16):
    """Decode each group's 2 x R values once (dequantized), then for every batch row pick the
    inputs by blends and accumulate: the decode is shared by the batch."""
    B = x.shape[0]
    G = x.shape[1] // 4
    acc = np.zeros((B, R), np.float32)
    w0 = np.empty(R, np.float32)
    w1 = np.empty(R, np.float32)
    tmp = np.empty(R, np.uint32)
    for g in range(G):
        _decode_run(vals, kind, blk, g, 0, scale, zero, has_zero, gps, w0, tmp, scale16)
        _decode_run(vals, kind, blk, g, 1, scale, zero, has_zero, gps, w1, tmp, scale16)
        m = meta[blk, g >> 3]
        j = (g & 7) * 4
        b0 = bits[j]
        b1 = bits[j + 1]
        b2 = bits[j + 2]
        b3 = bits[j + 3]
        for b in range(B):
            x0 = x[b, 4 * g]
            x1 = x[b, 4 * g + 1]
            x2 = x[b, 4 * g + 2]
            x3 = x[b, 4 * g + 3]
            ab = acc[b]
            for r in range(R):
                mm = m[r]
                xa = x2 if (mm & b1) else (x1 if (mm & b0) else x0)
                xb = x3 if (mm & b3) else (x2 if (mm & b2) else x1)
                ab[r] += w0[r] * xa + w1[r] * xb
    for b in range(B):
        for r in range(R):
            out[b, blk * R + r] = acc[b, r]


@njit(parallel=True, cache=True)
def gemm24(vals, kind, meta, scale, zero, has_zero, gps, x, out, bits, scale16):
    for blk in prange(vals.shape[0]):
        _g24_batch_block(vals, kind, meta, scale, zero, has_zero, gps, x, out, blk, bits, scale16)


# ---------------------------------------------------------------- serial twins
# Small layers (decoding a 135M model: 0.1-2 MB each) run on the calling thread: a parallel
# region costs a few microseconds to start, and far more when another process holds a core
# (every call then waits for the descheduled worker).
@njit(cache=True)
def gemv24_f32_serial(vals, meta, x, out, bits):
    for blk in range(vals.shape[0]):
        _g24_f32_block(vals, meta, x, out, blk, bits)


@njit(cache=True)
def gemv24_half_serial(vals, kind, meta, x, out, bits, scale16):
    for blk in range(vals.shape[0]):
        _g24_half_block(vals, kind, meta, x, out, blk, bits, scale16)


@njit(cache=True)
def gemv24_q_serial(codes, bits4, meta, scale, zero, has_zero, gps, x, out, bits):
    for blk in range(codes.shape[0]):
        _g24_q_block(codes, bits4, meta, scale, zero, has_zero, gps, x, out, blk, bits)


@njit(cache=True)
def gemm24_serial(vals, kind, meta, scale, zero, has_zero, gps, x, out, bits, scale16):
    for blk in range(vals.shape[0]):
        _g24_batch_block(vals, kind, meta, scale, zero, has_zero, gps, x, out, blk, bits, scale16)


PARALLEL = {
    True: (gemv24_f32, gemv24_half, gemv24_q, gemm24, general_matmul),
    False: (gemv24_f32_serial, gemv24_half_serial, gemv24_q_serial, gemm24_serial, general_matmul_serial),
}
# bytes of packed weights (times the batch) below which a layer runs serially
PARALLEL_MIN_BYTES = int(os.environ.get("SPARSEMERGE_PARALLEL_MIN_BYTES", 1 << 21))


# ---------------------------------------------------------------- Python entry point
_EMPTY3_F = np.zeros((1, 1, 1), np.float32)
_EMPTY3_U32 = np.zeros((1, 1, 1), np.uint32)
_EMPTY4_U8 = np.zeros((1, 1, 1, 1), np.uint8)


def _np(t: "torch.Tensor | None", empty: np.ndarray) -> np.ndarray:
    return empty if t is None else t.numpy()


def _value_kind(layer: BlockedNM) -> tuple[int, np.ndarray]:
    v = layer.values
    if layer.codec == "int8":
        return Q8, v.numpy()
    if layer.codec == "int4":
        return Q4, v.numpy()
    if v.dtype == torch.float32:
        return F32, v.numpy()
    kind = BF16 if v.dtype == torch.bfloat16 else F16
    return kind, v.view(torch.int16).numpy().view(np.uint16)


def _plan(layer: BlockedNM) -> tuple:
    """numpy views of the layer's tensors, computed once per layout object."""
    plan = layer.extra.get("cpu_plan")
    if plan is None:
        kind, vals = _value_kind(layer)
        meta = _EMPTY3_U32 if layer.meta is None else layer.meta.numpy().view(np.uint32)
        plan = (kind, vals, meta, _np(layer.index, _EMPTY4_U8), _np(layer.scale, _EMPTY3_F), _np(layer.zero, _EMPTY3_F),
                layer.zero is not None, layer.groups_per_scale, layer.values.shape[0] * R, layer.nbytes())
        layer.extra["cpu_plan"] = plan
    return plan


def blocked_matmul(layer: BlockedNM, x: torch.Tensor, path: str) -> torch.Tensor:
    """``x (B, cols)`` float32 contiguous CPU -> ``(B, rows)`` with one numba kernel family:
    ``path`` "gemv24" (2:4, batch 1), "gemm24" (2:4, any batch) or "general" (any N:M).
    The caller (a registry row, ``kernels/backends.py``) has checked that the path applies."""
    threads = sync_threads()
    B = x.shape[0]
    kind, vals, meta, index, scale, zero, has_zero, gps, rows_pad, nbytes = _plan(layer)
    parallel = threads > 1 and nbytes * B >= PARALLEL_MIN_BYTES and vals.shape[0] > 1
    f_f32, f_half, f_q, f_gemm, f_general = PARALLEL[parallel]
    if path == "gemv24":
        xn = x.numpy().reshape(-1)
        out = np.empty(rows_pad, np.float32)
        if kind == F32:
            f_f32(vals, meta, xn, out, BITS)
        elif kind in (BF16, F16):
            f_half(vals, kind, meta, xn, out, BITS, FP16_SCALE)
        else:
            f_q(vals, kind == Q4, meta, scale, zero, has_zero, gps, xn, out, BITS)
        return torch.from_numpy(out[: layer.rows]).unsqueeze(0)
    if path == "gemm24":
        out2 = np.empty((B, rows_pad), np.float32)
        f_gemm(vals, kind, meta, scale, zero, has_zero, gps, x.numpy(), out2, BITS, FP16_SCALE)
        return torch.from_numpy(out2[:, : layer.rows])
    if path != "general":
        raise ValueError(f"unknown numba path {path!r}; expected gemv24, gemm24 or general")
    xt = np.ascontiguousarray(x.numpy().T)  # (cols, B)
    out2 = np.empty((B, rows_pad), np.float32)
    f_general(vals, kind, layer.n, layer.m, meta, index, layer.is_24, scale, zero, has_zero, gps, xt, out2, FP16_SCALE)
    return torch.from_numpy(out2[:, : layer.rows])
