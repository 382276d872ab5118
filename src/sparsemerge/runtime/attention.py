"""Attention of one decoding token over the KV cache, in chunks of positions (compiled).

Grouped-query attention: query head h reads kv head g(h) = h // group, group = heads / kv_heads,

    o_h = sum_t softmax_t(s_ht) V[g, t],    s_ht = scaling * q_h . K[g, t],   t = t0 .. pos

computed as flash-decoding does (Dao et al. 2023, "Flash-Decoding for long-context inference"):
the positions are cut into chunks of ``CHUNK``; a task is one (kv head, chunk) pair and computes,
for each of the ``group`` query heads that share that kv head, the chunk's partial softmax

    m_c = max_t s_t,   l_c = sum_t e^(s_t - m_c),   o_c = sum_t e^(s_t - m_c) V_t

with the chunk's K and V rows read once for all heads of the group and kept in L1. The chunks
are then combined exactly: ``M = max_c m_c``, ``o = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c``.
Chunk boundaries depend on the position only, so one thread and many give the same bits.

The exponentials are a vectorized polynomial (``exp_poly``; a call of ``exp`` per element does not
vectorize), shared with SwiGLU's sigmoid. The cache is float32 or float16 (its bits as uint16,
widened as read: runtime/half.py): one compiled function per cache dtype.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from sparsemerge.runtime.half import to_f32

# fast-math without "no NaN/Inf": a NaN must still reach the logits (runtime/step.py)
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
CHUNK = 64  # cache positions per task: 64 rows of K and V (16 KiB each at head_dim 64) stay in L1
PAR_MIN_POS = 96  # from here on the chunks are spread over the threads (a region costs ~10 us)

LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)


@njit(fastmath=FAST, error_model="numpy", cache=True, inline="always")
def exp_poly(f):  # pragma: no cover - jitted
    """``e^f`` for |f| <= ln(2) / 2: Taylor polynomial of degree 7 (truncation error below
    |f|^8 / 8! < 1e-8 relative). With ``2^n`` as float bits, n = rint(x log2 e), it gives
    ``e^x = 2^n e^f``, f = x - n ln 2."""
    return np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (np.float32(1 / 6) + f * (
        np.float32(1 / 24) + f * (np.float32(1 / 120) + f * (np.float32(1 / 720) + f * np.float32(1 / 5040)))))))


@njit(fastmath=FAST, error_model="numpy", cache=True)
def exp_nonpositive(a, n, bits):  # pragma: no cover - jitted
    """``a[:n] = e^a[:n]`` in place for ``a <= 0`` (softmax's ``s - max``): z = a log2 e clamped
    at -126 (e^-87: below float32's normal range, where the softmax weight is zero anyway),
    ``2^rint(z)`` as float bits in ``bits`` (uint32, >= n) times :func:`exp_poly` of the rest.
    The relative error grows with |a| as float32's rounding of z does (~1e-7 |a|)."""
    fb = bits.view(np.float32)
    for i in range(n):
        z = max(a[i] * LOG2E, np.float32(-126.0))
        m = np.rint(z)
        a[i] = exp_poly((z - m) * LN2)
        bits[i] = np.uint32(np.int32(m) + 127) << np.uint32(23)
    for i in range(n):
        a[i] *= fb[i]


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _chunk(q, kc, vc, g, group, hd, scaling, lo, hi, sc, bits, o, ml):  # pragma: no cover - jitted
    """Partial softmax of query heads g*group .. g*group + group - 1 over positions lo..hi-1:
    ``sc`` (group, CHUNK) scores then weights, ``o`` (group, hd) unnormalised outputs,
    ``ml`` (group, 2) = (m_c, l_c); m_c is NaN when a score was NaN.

    Scores and weighted rows go four cache rows per pass over q_h / o_h: one loop with four
    reductions (or four rows added per load and store of o_h) vectorizes with the loop's cost
    shared, 2.5x the speed of a row at a time. The loops are written out here rather than
    called: a call per head and chunk costs more than a chunk's arithmetic."""
    n = hi - lo
    n4 = n - n % 4
    for j in range(group):
        h = g * group + j
        qh = q[h * hd:(h + 1) * hd]
        s_j = sc[j]
        for tt in range(0, n4, 4):  # s_t = scaling * q_h . K_t
            k0, k1, k2, k3 = kc[g, lo + tt], kc[g, lo + tt + 1], kc[g, lo + tt + 2], kc[g, lo + tt + 3]
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for i in range(hd):
                qi = qh[i]
                s0 += qi * to_f32(k0[i])
                s1 += qi * to_f32(k1[i])
                s2 += qi * to_f32(k2[i])
                s3 += qi * to_f32(k3[i])
            s_j[tt], s_j[tt + 1], s_j[tt + 2], s_j[tt + 3] = s0 * scaling, s1 * scaling, s2 * scaling, s3 * scaling
        for tt in range(n4, n):
            k = kc[g, lo + tt]
            s = np.float32(0.0)
            for i in range(hd):
                s += qh[i] * to_f32(k[i])
            s_j[tt] = s * scaling
        mx = np.float32(-np.inf)
        bad = False
        for tt in range(n):
            bad |= s_j[tt] != s_j[tt]
            mx = max(mx, s_j[tt])
        for tt in range(n):
            s_j[tt] -= mx
        exp_nonpositive(s_j, n, bits[j])
        tot = np.float32(0.0)
        for tt in range(n):
            tot += s_j[tt]
        ml[j, 0] = np.float32(np.nan) if bad else mx
        ml[j, 1] = tot
        oj = o[j]  # o_h = sum_t p_t V_t
        for i in range(hd):
            oj[i] = 0.0
        for tt in range(0, n4, 4):
            v0, v1, v2, v3 = vc[g, lo + tt], vc[g, lo + tt + 1], vc[g, lo + tt + 2], vc[g, lo + tt + 3]
            p0, p1, p2, p3 = s_j[tt], s_j[tt + 1], s_j[tt + 2], s_j[tt + 3]
            for i in range(hd):
                oj[i] += (p0 * to_f32(v0[i]) + p1 * to_f32(v1[i])) + (p2 * to_f32(v2[i]) + p3 * to_f32(v3[i]))
        for tt in range(n4, n):
            v = vc[g, lo + tt]
            pt = s_j[tt]
            for i in range(hd):
                oj[i] += pt * to_f32(v[i])


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _combine(o, ml, g, group, hd, nch, out):  # pragma: no cover - jitted
    """``out_h = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c`` for the heads of kv head g,
    chunks in order (tasks g*nch .. g*nch + nch - 1); NaN when any chunk saw a NaN."""
    for j in range(group):
        h = g * group + j
        oh = out[h * hd:(h + 1) * hd]
        big = np.float32(-np.inf)
        bad = False
        for c in range(nch):
            m = ml[g * nch + c, j, 0]
            bad |= m != m
            if m > big:
                big = m
        if bad:
            for i in range(hd):
                oh[i] = np.float32(np.nan)
            continue
        for i in range(hd):
            oh[i] = 0.0
        tot = np.float32(0.0)
        for c in range(nch):
            t = g * nch + c
            w = np.exp(ml[t, j, 0] - big)
            tot += w * ml[t, j, 1]
            oc = o[t, j]
            for i in range(hd):
                oh[i] += w * oc[i]
        inv = np.float32(1.0) / tot
        for i in range(hd):
            oh[i] *= inv


@njit(error_model="numpy", cache=True)
def _tasks_serial(q, kc, vc, t0, pos, kv_heads, group, hd, scaling, nch, scratch):  # pragma: no cover - jitted
    sc, bits, o, ml = scratch
    for t in range(kv_heads * nch):
        g, c = t // nch, t % nch
        lo = t0 + c * CHUNK
        _chunk(q, kc, vc, g, group, hd, scaling, lo, min(pos + 1, lo + CHUNK), sc[t], bits[t], o[t], ml[t])


@njit(parallel=True, error_model="numpy", cache=True)
def _tasks_par(q, kc, vc, t0, pos, kv_heads, group, hd, scaling, nch, scratch, threads):  # pragma: no cover - jitted
    sc, bits, o, ml = scratch
    ntask = kv_heads * nch
    step = (ntask + threads - 1) // threads
    for w in prange(threads):  # contiguous task ranges
        for t in range(w * step, min(ntask, (w + 1) * step)):
            g, c = t // nch, t % nch
            lo = t0 + c * CHUNK
            _chunk(q, kc, vc, g, group, hd, scaling, lo, min(pos + 1, lo + CHUNK), sc[t], bits[t], o[t], ml[t])


@njit(error_model="numpy", cache=True)
def attend(q, kc, vc, pos, heads, kv_heads, hd, scaling, window, scratch, out, threads):  # pragma: no cover - jitted
    """``out`` (heads * hd) = grouped-query attention of ``q`` (heads * hd) over cache positions
    t0..pos of ``kc``/``vc`` (kv_heads, max_seq, hd; float32, or float16 bits as uint16), t0 = 0 or
    ``pos - window + 1`` with a sliding window. ``scratch``: :func:`make_scratch`'s tuple.
    ``threads`` > 1: the tasks spread over that many threads (the same bits as one)."""
    group = heads // kv_heads
    t0 = 0 if window <= 0 else max(0, pos - window + 1)
    nch = (pos + 1 - t0 + CHUNK - 1) // CHUNK
    if threads > 1:
        _tasks_par(q, kc, vc, t0, pos, kv_heads, group, hd, scaling, nch, scratch, min(threads, kv_heads * nch))
    else:
        _tasks_serial(q, kc, vc, t0, pos, kv_heads, group, hd, scaling, nch, scratch)
    o, ml = scratch[2], scratch[3]
    for g in range(kv_heads):
        _combine(o, ml, g, group, hd, nch, out)


def make_scratch(heads: int, kv_heads: int, hd: int, max_seq: int) -> tuple:
    """Buffers for :func:`attend`: per task (kv head x chunk) the scores, exp bits, partial
    outputs and (m, l)."""
    group = heads // kv_heads
    tasks = kv_heads * ((max_seq + CHUNK - 1) // CHUNK)
    f = np.float32
    return (np.zeros((tasks, group, CHUNK), f), np.zeros((tasks, group, CHUNK), np.uint32),
            np.zeros((tasks, group, hd), f), np.zeros((tasks, group, 2), f))
