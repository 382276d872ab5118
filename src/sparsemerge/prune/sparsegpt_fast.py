"""Numba kernel for the inner (per column block) loop of SparseGPT's OBS update.

Inside one block of ``count`` columns (Alg. 1 of Frantar & Alistarh 2023), column ``i`` is
pruned (``q = w_i`` with the masked entries zeroed), its error ``e = (w_i - q) / U_ii`` is
propagated to the later columns of the block (``W[:, j] -= e U_ij`` for ``j > i``), and for N:M
patterns the mask of each group of M columns is chosen when its first column is reached, from
``w^2 / U_jj^2`` of the already-updated weights. Output rows never interact, so the loop runs
in parallel over chunks of rows, and inside a chunk the row loop is the vectorised inner loop
(``W1`` is stored transposed, ``(count, rows)``, so a column is contiguous). The torch loop in
``sparsegpt.py`` issued ~7 small tensor ops per column; this kernel removes that overhead.

As elsewhere in the package (see ``kernels/cpu.py``), the vectorised loops live in small
``fastmath`` helpers working on 1-D slices: written inline in the ``prange`` body, numba/LLVM
did not vectorise them.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

ROW_CHUNK = 256  # rows per task: a (128 x 256) float32 block slice stays in L2


@njit(fastmath=True, cache=True)
def _axpy(y, a, x):  # pragma: no cover - jitted
    """``y -= a * x`` (1-D float32)."""
    for r in range(y.shape[0]):
        y[r] -= a * x[r]


@njit(fastmath=True, cache=True)
def _prune_column(w, keep_zero, err, inv_d):  # pragma: no cover - jitted
    """``err = (w - q) / d`` with ``q = 0`` where ``keep_zero``; then ``w = q``."""
    for r in range(w.shape[0]):
        if keep_zero[r]:
            err[r] = w[r] * inv_d
            w[r] = 0.0
        else:
            err[r] = 0.0


@njit(cache=True)
def _saliency(W1, d1, sal, i, m, r0, r1):  # pragma: no cover - jitted
    for a in range(m):
        inv = np.float32(1.0) / (d1[i + a] * d1[i + a])
        row = W1[i + a]
        _scaled_square(sal[a], row[r0:r1], inv)


@njit(fastmath=True, cache=True)
def _scaled_square(out, w, inv):  # pragma: no cover - jitted
    for r in range(out.shape[0]):
        out[r] = w[r] * w[r] * inv


@njit(fastmath=True, cache=True)
def _outranks(rank, sb, sa, ties_count):  # pragma: no cover - jitted
    """``rank += sb > sa`` (or ``>=`` when ``ties_count``: b has the lower index)."""
    if ties_count:
        for r in range(rank.shape[0]):
            rank[r] += sb[r] >= sa[r]
    else:
        for r in range(rank.shape[0]):
            rank[r] += sb[r] > sa[r]


@njit(fastmath=True, cache=True)
def _set_mask(dst, rank, n):  # pragma: no cover - jitted
    for r in range(dst.shape[0]):
        dst[r] = dst[r] or rank[r] >= n  # OR: entries fixed up front (hierarchical: dropped blocks) stay pruned


@njit(cache=True)
def _choose_nm(W1, d1, mask1, sal, rank, i, n, m, r0, r1):  # pragma: no cover - jitted
    """Prune the ``m - n`` lowest ``w^2 / d^2`` of columns ``i..i+m-1`` per row: entry ``a``
    is pruned when ``n`` or more entries outrank it (larger, or equal with a lower index - the
    tie rule of ``masks.nm_mask``)."""
    _saliency(W1, d1, sal, i, m, r0, r1)
    for a in range(m):
        rank[:] = 0
        for b in range(m):
            if b != a:
                _outranks(rank, sal[b], sal[a], b < a)
        _set_mask(mask1[i + a, r0:r1], rank, n)


@njit(parallel=True, cache=True)
def obs_block(W1, U1, mask1, n, m, choose_nm):  # pragma: no cover - jitted
    """In place on ``W1`` (count x rows, float32) and ``mask1`` (True = prune); returns the
    errors ``Err1`` (count x rows) for the lazy update of the later blocks."""
    count, rows = W1.shape
    err = np.zeros_like(W1)
    d1 = np.empty(count, np.float32)
    for i in range(count):
        d1[i] = U1[i, i]
    chunks = (rows + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(chunks):
        r0 = c * ROW_CHUNK
        r1 = min(rows, r0 + ROW_CHUNK)
        sal = np.empty((max(m, 1), r1 - r0), np.float32)
        rank = np.empty(r1 - r0, np.int32)
        for i in range(count):
            if choose_nm and i % m == 0:
                _choose_nm(W1, d1, mask1, sal, rank, i, n, m, r0, r1)
            e = err[i, r0:r1]
            _prune_column(W1[i, r0:r1], mask1[i, r0:r1], e, np.float32(1.0) / d1[i])
            for j in range(i + 1, count):
                _axpy(W1[j, r0:r1], U1[i, j], e)
    return err
