"""numba CPU kernel for hierarchical N:M layers (``kernels/hier.py``, chapter 10.2.5).

``y[b, i] = sum_{kb < KB} sum_{g < B/M} sum_{s < N} w[i, j] * x[b, c0 + g*M + p[i, j]]`` with
``c0 = blocks[i // R, kb] * B`` and ``j = (kb*B/M + g)*N + s``: a row visits only the KB kept
blocks of its row tile (the dropped ``(L-K)/L`` of the input is never read), and inside a
kept block only its N:M slots. Values are float32, or INT8/INT4 codes (int8 in memory)
dequantized on the fly, ``w = (q - zero[i, j // G]) * scale[i, j // G]``. ``x`` is passed
transposed, ``(cols, batch)``, so a column's batch entries are contiguous; batch 1 runs a
scalar accumulation.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange

from sparsemerge.kernels.threads import sync_threads

PARALLEL_MIN_WORK = 1 << 16  # stored values x batch below which one thread is faster


@njit(fastmath=True, cache=True, inline="always")
def _value(vals, scale, zero, quant, has_zero, gsz, r, j):  # pragma: no cover - jitted
    """Stored value j of row r as float32, dequantized when the layer holds codes."""
    w = np.float32(vals[r, j])
    if quant:
        q = j // gsz
        w = (w - zero[r, q]) * scale[r, q] if has_zero else w * scale[r, q]
    return w


@njit(fastmath=True, cache=True)
def _row(blocks, vals, index, scale, zero, quant, has_zero, gsz, R, B, M, N, xt, out, r):  # pragma: no cover - jitted
    nbat = xt.shape[1]
    t = r // R
    KB = blocks.shape[1]
    gpb = B // M
    j = 0
    if nbat == 1:  # batch 1: a scalar accumulator
        acc = np.float32(0.0)
        for kb in range(KB):
            c0 = blocks[t, kb] * B
            for g in range(gpb):
                base = c0 + g * M
                for s in range(N):
                    acc += _value(vals, scale, zero, quant, has_zero, gsz, r, j) * xt[base + index[r, j], 0]
                    j += 1
        out[0, r] = acc
        return
    accs = np.zeros(nbat, np.float32)
    for kb in range(KB):
        c0 = blocks[t, kb] * B
        for g in range(gpb):
            base = c0 + g * M
            for s in range(N):
                w = _value(vals, scale, zero, quant, has_zero, gsz, r, j)
                xi = base + index[r, j]
                for b in range(nbat):
                    accs[b] += w * xt[xi, b]
                j += 1
    for b in range(nbat):
        out[b, r] = accs[b]


@njit(parallel=True, cache=True)
def _matmul_parallel(blocks, vals, index, scale, zero, quant, has_zero, gsz, R, B, M, N, xt, out):  # pragma: no cover
    for r in prange(vals.shape[0]):
        _row(blocks, vals, index, scale, zero, quant, has_zero, gsz, R, B, M, N, xt, out, r)


@njit(cache=True)
def _matmul_serial(blocks, vals, index, scale, zero, quant, has_zero, gsz, R, B, M, N, xt, out):  # pragma: no cover
    for r in range(vals.shape[0]):
        _row(blocks, vals, index, scale, zero, quant, has_zero, gsz, R, B, M, N, xt, out, r)


_ONE = np.ones((1, 1), np.float32)


def hier_matmul(layout, x: torch.Tensor) -> torch.Tensor:
    """``x (batch, cols)`` float32 CPU -> ``(batch, rows)`` float32 for a
    :class:`~sparsemerge.kernels.hier.HierLayout` (the registry row ``numba-hier``)."""
    threads = sync_threads()
    p = layout.pattern
    vals = layout.values.numpy()
    quant = layout.codec != "none"
    scale = layout.scale.numpy() if quant else _ONE
    has_zero = layout.zero is not None
    zero = layout.zero.numpy() if has_zero else _ONE
    gsz = layout.group_size or max(vals.shape[1], 1)
    xt = np.ascontiguousarray(x.numpy().T)  # (cols, batch)
    out = np.empty((x.shape[0], layout.rows), np.float32)
    fn = _matmul_parallel if threads > 1 and vals.size * x.shape[0] >= PARALLEL_MIN_WORK else _matmul_serial
    fn(layout.blocks.numpy(), vals, layout.index.numpy(), scale, zero, quant, has_zero, gsz,
       p.rows, p.block, p.m, p.n, xt, out)
    return torch.from_numpy(out)
