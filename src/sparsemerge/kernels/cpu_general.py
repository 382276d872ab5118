"""numba CPU kernels for any N:M pattern and batch (see ``kernels/cpu_blocked.py`` for the 2:4
kernels; ``kernels/cpu.py`` for the entry point): each (group, slot) run of R values is decoded once
(dequantized, positions from the 2:4 metadata or the index array) and applied as
``acc[r, :B] += w[r] * xT[g*m + p[r], :B]``, a gather of x at batch 1.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from sparsemerge.kernels.layout import BLOCK_ROWS

R = BLOCK_ROWS
# value kinds
F32, BF16, F16, Q8, Q4 = 0, 1, 2, 3, 4


@njit(fastmath=True, cache=True)
def _decode_run(vals, kind, blk, g, s, scale, zero, has_zero, gps, w, tmp, scale16):
    """w[:R] <- float32 values of slot s of group g in block blk."""
    if kind == F32:
        v = vals[blk, g, s]
        for r in range(R):
            w[r] = v[r]
    elif kind == BF16:
        v = vals[blk, g, s]
        for r in range(R):
            tmp[r] = np.uint32(v[r]) << np.uint32(16)
        wf = tmp.view(np.float32)
        for r in range(R):
            w[r] = wf[r]
    elif kind == F16:
        v = vals[blk, g, s]
        for r in range(R):
            tmp[r] = (np.uint32(v[r]) & np.uint32(0x7FFF)) << np.uint32(13)
        wf = tmp.view(np.float32)
        for r in range(R):
            sign = np.float32(-1.0) if np.uint32(v[r]) & np.uint32(0x8000) else np.float32(1.0)
            w[r] = wf[r] * scale16 * sign
    else:
        q = g // gps
        sq = scale[blk, q]
        if kind == Q8:
            v = vals[blk, g, s]
            for r in range(R):
                w[r] = np.float32(v[r])
        else:
            v = vals[blk, g, s >> 1]
            sh = 4 * (s & 1)
            for r in range(R):
                w[r] = np.float32((np.int32(v[r]) >> sh) & 15)
        if has_zero:
            zq = zero[blk, q]
            for r in range(R):
                w[r] = (w[r] - zq[r]) * sq[r]
        else:
            for r in range(R):
                w[r] = w[r] * sq[r]


@njit(fastmath=True, cache=True)
def _positions(meta, index, is24, blk, g, s, p):
    if is24:
        m = meta[blk, g >> 3]
        sh = 4 * (g & 7)
        for r in range(R):
            c = (np.int64(m[r]) >> sh) & 15
            if s == 0:
                p[r] = (c & 1) + ((c >> 1) & 1)
            else:
                p[r] = 1 + ((c >> 2) & 1) + ((c >> 3) & 1)
    else:
        ix = index[blk, g, s]
        for r in range(R):
            p[r] = ix[r]


@njit(fastmath=True, cache=True)
def _axpy_rows(acc, w, p, xt, base):
    B = xt.shape[1]
    for r in range(R):
        wr = w[r]
        xi = base + p[r]
        for b in range(B):
            acc[r, b] += wr * xt[xi, b]


@njit(fastmath=True, cache=True)
def _gather_rows(acc1, w, p, x1, base):
    for r in range(R):
        acc1[r] += w[r] * x1[base + p[r]]


@njit(fastmath=True, cache=True)
def _general_block(vals, kind, n, m, meta, index, is24, scale, zero, has_zero, gps, xt, out, blk, scale16):
    B = xt.shape[1]
    G = xt.shape[0] // m
    acc = np.zeros((R, B), np.float32)
    acc1 = np.zeros(R, np.float32)
    w = np.empty(R, np.float32)
    p = np.empty(R, np.int64)
    tmp = np.empty(R, np.uint32)
    x1 = xt[:, 0]
    for g in range(G):
        for s in range(n):
            _decode_run(vals, kind, blk, g, s, scale, zero, has_zero, gps, w, tmp, scale16)
            _positions(meta, index, is24, blk, g, s, p)
            if B == 1:
                _gather_rows(acc1, w, p, x1, g * m)
            else:
                _axpy_rows(acc, w, p, xt, g * m)
    for r in range(R):
        if B == 1:
            out[0, blk * R + r] = acc1[r]
        else:
            for b in range(B):
                out[b, blk * R + r] = acc[r, b]


@njit(parallel=True, cache=True)
def general_matmul(vals, kind, n, m, meta, index, is24, scale, zero, has_zero, gps, xt, out, scale16):
    for blk in prange(vals.shape[0]):
        _general_block(vals, kind, n, m, meta, index, is24, scale, zero, has_zero, gps, xt, out, blk, scale16)



@njit(cache=True)
def general_matmul_serial(vals, kind, n, m, meta, index, is24, scale, zero, has_zero, gps, xt, out, scale16):
    for blk in range(vals.shape[0]):
        _general_block(vals, kind, n, m, meta, index, is24, scale, zero, has_zero, gps, xt, out, blk, scale16)
