"""The compiled decode step: one numba call runs a token through every decoder layer.

A Llama-family layer (Llama, SmolLM2, Mistral, Qwen2) at position ``p`` with hidden state h::

    x  = RMSNorm(h) * w_in                          x_i / sqrt(mean(x^2) + eps), then the weight
    qkv = [W_q; W_k; W_v] x (+ b)                    one fused product (3 if they cannot fuse)
    q, k = RoPE(q, p), RoPE(k, p)                    rotate_half form: (a, b) -> (a c - b s, b c + a s)
    K[p], V[p] = k, v                                the KV cache (float16 or float32)
    o_h = sum_t softmax_t(q_h . K_t[g(h)] / sqrt(d)) V_t[g(h)]    GQA: g(h) = h // (heads / kv_heads),
                                                     in chunks of positions (runtime/attention.py)
    h  = h + W_o o
    x  = RMSNorm(h) * w_post
    [g; u] = [W_gate; W_up] x                        one fused product
    h  = h + W_down (silu(g) * u)

and after the last layer ``logits = W_head RMSNorm(h)``. Each projection is an *op*: a row of
``ops[layer, slot]`` = (kind, index into that kind's arrays, output offset, rows, bias index).
Kinds (the kernel the plan chose for the layer):

    A8   2:4 INT8/INT4 with INT8 activations: an LLVM row kernel at an address (VNNI or AVX2)
    F32  2:4 float32 row kernel at an address (vpermi2ps gather or its AVX2 sibling)
    BQ   2:4 INT8/INT4, float activations: numba kernel over the row-blocked layout
    BF   2:4 float32/any CPU: numba kernel over the row-blocked layout
    BH   2:4 float16 / bfloat16 values: the same, widening each value as it is read
    BG   any other N:M (1:4, 4:8, 2:8 ... of a mixed allocation), any codec: numba kernel over
         the row-blocked layout, x gathered by each slot's stored position
    DF   dense float32 (numba GEMV)          DQ   dense INT8 codes with row/group scales

Nothing is allocated per token: every buffer lives in ``bufs`` (built by the engine).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from sparsemerge.kernels.cpu_blocked import BITS, FP16_SCALE, R, _g24_f32_block, _g24_half_block, _g24_q_block
from sparsemerge.kernels.cpu_general import F32, Q4, Q8, _decode_run
from sparsemerge.runtime.attention import LN2, LOG2E, PAR_MIN_POS, attend, exp_poly
from sparsemerge.runtime.ffi import call_a8, call_f32
from sparsemerge.runtime.half import from_f32

KIND_A8, KIND_F32, KIND_BQ, KIND_BF, KIND_DF, KIND_DQ, KIND_BH, KIND_BG = 0, 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = ("A8", "F32", "BQ", "BF", "DF", "DQ", "BH", "BG")
# BG params: value kind (cpu_general F32/BF16/F16/Q8/Q4), n, m, has zero point, groups per scale,
# index into the typed list of the values' dtype (BG_LISTS order)
BG_FIELDS = 6
BG_LISTS = ("float32", "int8", "uint8", "uint16")
# op table fields
F_KIND, F_IDX, F_OFF, F_ROWS, F_BIAS = 0, 1, 2, 3, 4
OP_FIELDS = 5
# slots of a layer: up to 3 ops reading the attention input, o, up to 2 for the MLP input, down
SLOT_QKV, SLOT_O, SLOT_GU, SLOT_DOWN = (0, 1, 2), (3,), (4, 5), (6,)
SLOTS = 7
# model parameters (cfg int64 array)
C_HIDDEN, C_HEADS, C_KV_HEADS, C_HEAD_DIM, C_INTER, C_LAYERS, C_VOCAB, C_MAX_SEQ, C_THREADS, C_WINDOW, C_EMB_GROUP = range(11)
CFG_FIELDS = 11
# A8 params: npairs, tail, nscale, xb_per_q, fn address; F32 params: units, quads, block_units, fn address
A8_FIELDS, F32_FIELDS = 5, 4
MIN_ROWS_PER_THREAD = 128  # below this a second thread costs more than it saves
# fast-math without "no NaN/Inf" (a NaN must reach the logits as in the float model), and
# IEEE division (1/0 = inf, not ZeroDivisionError)
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


# ---------------------------------------------------------------- per-kind products (out has slack)
@njit(error_model="numpy", cache=True)
def _a8_rows(par, stream, wscale, corr, xu, xs, out, r0, r1):  # pragma: no cover - jitted
    call_a8(par[4], stream.ctypes.data, wscale.ctypes.data, corr.ctypes.data, xu.ctypes.data,
            xs.ctypes.data, out.ctypes.data, r0, r1, par[0], par[1], par[2], par[3])


@njit(error_model="numpy", cache=True)
def _f32_rows(par, vals, meta, x, out, r0, r1):  # pragma: no cover - jitted
    call_f32(par[3], vals.ctypes.data, meta.ctypes.data, x.ctypes.data, out.ctypes.data, r0, r1, par[0], par[1], par[2])


@njit(error_model="numpy", cache=True)
def _bq_blocks(codes, bits4, meta, scale, zero, has_zero, gps, x, out, b0, b1):  # pragma: no cover - jitted
    for blk in range(b0, b1):
        _g24_q_block(codes, bits4, meta, scale, zero, has_zero, gps, x, out, blk, BITS)


@njit(error_model="numpy", cache=True)
def _bf_blocks(vals, meta, x, out, b0, b1):  # pragma: no cover - jitted
    for blk in range(b0, b1):
        _g24_f32_block(vals, meta, x, out, blk, BITS)


@njit(error_model="numpy", cache=True)
def _bh_blocks(vals, kind, meta, x, out, b0, b1):  # pragma: no cover - jitted
    for blk in range(b0, b1):
        _g24_half_block(vals, kind, meta, x, out, blk, BITS, FP16_SCALE)


@njit(parallel=True, error_model="numpy", cache=True)
def _bh_par(vals, kind, meta, x, out, tasks):  # pragma: no cover - jitted
    nb = vals.shape[0]
    step = (nb + tasks - 1) // tasks
    for t in prange(tasks):
        _bh_blocks(vals, kind, meta, x, out, t * step, min(nb, (t + 1) * step))


@njit(fastmath=FAST, error_model="numpy", cache=True, inline="always")
def _pick_inputs(x, col, m, ix, xs):  # pragma: no cover - jitted
    """``xs[r] = x[col + ix[r]]`` for a block's R rows. M = 4 and 8 (1:4, 3:4, 4:8, 2:8 ...)
    choose among the group's inputs by a tree of blends on the index bits, which vectorizes
    (like the 2:4 kernels' compare-and-blend); other M gather."""
    if m == 8:
        a0, a1, a2, a3 = x[col], x[col + 1], x[col + 2], x[col + 3]
        a4, a5, a6, a7 = x[col + 4], x[col + 5], x[col + 6], x[col + 7]
        for r in range(R):
            p = np.int32(ix[r])
            odd, two = (p & 1) != 0, (p & 2) != 0
            lo = (a3 if odd else a2) if two else (a1 if odd else a0)
            hi = (a7 if odd else a6) if two else (a5 if odd else a4)
            xs[r] = hi if (p & 4) != 0 else lo
    elif m == 4:
        a0, a1, a2, a3 = x[col], x[col + 1], x[col + 2], x[col + 3]
        for r in range(R):
            p = np.int32(ix[r])
            odd = (p & 1) != 0
            xs[r] = (a3 if odd else a2) if (p & 2) != 0 else (a1 if odd else a0)
    else:
        for r in range(R):
            xs[r] = x[col + ix[r]]


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _bg_blocks(vals, vkind, n, m, index, scale, zero, has_zero, gps, x, out, b0, b1, w, tmp):  # pragma: no cover - jitted
    """General N:M at batch 1: ``out[blk*R + r] = sum_g sum_s w[blk,g,s,r] x[g*m + index[blk,g,s,r]]``
    for the 64-row blocks b0..b1. Per (group, slot) the R rows' inputs are picked into ``xs``
    (:func:`_pick_inputs`), then applied: INT8/INT4 codes sum ``(code - zero) * x`` per
    quantization group q and are scaled once, ``acc += scale[q] * part``; float32 values apply
    directly; float16/bfloat16 runs are widened first (kernels/cpu_general.py). ``w`` holds
    3 x R scratch floats (accumulator, picked inputs, partial sums or widened values)."""
    G = index.shape[1]
    acc, xs, part = w[:R], w[R:2 * R], w[2 * R:3 * R]
    for blk in range(b0, b1):
        base = blk * R
        for r in range(R):
            acc[r] = 0.0
        if vkind == Q8 or vkind == Q4:
            Q = scale.shape[1]
            for q in range(Q):
                for r in range(R):
                    part[r] = 0.0
                zq = zero[blk, q]
                for g in range(q * gps, min(G, (q + 1) * gps)):
                    col = g * m
                    for s in range(n):
                        _pick_inputs(x, col, m, index[blk, g, s], xs)
                        if vkind == Q4:
                            c = vals[blk, g, s >> 1]
                            sh = 4 * (s & 1)
                            if has_zero:
                                for r in range(R):
                                    part[r] += (np.float32((np.int32(c[r]) >> sh) & 15) - zq[r]) * xs[r]
                            else:
                                for r in range(R):
                                    part[r] += (np.float32((np.int32(c[r]) >> sh) & 15) - 8.0) * xs[r]
                        else:
                            c = vals[blk, g, s]
                            if has_zero:
                                for r in range(R):
                                    part[r] += (np.float32(c[r]) - zq[r]) * xs[r]
                            else:
                                for r in range(R):
                                    part[r] += np.float32(c[r]) * xs[r]
                sq = scale[blk, q]
                for r in range(R):
                    acc[r] += sq[r] * part[r]
        elif vkind == F32:
            for g in range(G):
                col = g * m
                for s in range(n):
                    _pick_inputs(x, col, m, index[blk, g, s], xs)
                    v = vals[blk, g, s]
                    for r in range(R):
                        acc[r] += np.float32(v[r]) * xs[r]
        else:  # float16 / bfloat16 bits: widen a run, then apply it
            for g in range(G):
                col = g * m
                for s in range(n):
                    _pick_inputs(x, col, m, index[blk, g, s], xs)
                    _decode_run(vals, vkind, blk, g, s, scale, zero, has_zero, gps, part, tmp, FP16_SCALE)
                    for r in range(R):
                        acc[r] += part[r] * xs[r]
        for r in range(R):
            out[base + r] = acc[r]


@njit(parallel=True, error_model="numpy", cache=True)
def _bg_par(vals, vkind, n, m, index, scale, zero, has_zero, gps, x, out, tasks, w, tmp):  # pragma: no cover - jitted
    nb = index.shape[0]
    step = (nb + tasks - 1) // tasks
    for t in prange(tasks):
        _bg_blocks(vals, vkind, n, m, index, scale, zero, has_zero, gps, x, out, t * step, min(nb, (t + 1) * step),
                   w[t], tmp[t])


@njit(error_model="numpy", cache=True)
def _bg_run(vals, p, index, scale, zero, x, out, tasks, w, tmp):  # pragma: no cover - jitted
    # through the parallel twin even for one task: measured 3.7x faster than calling
    # _bg_blocks directly (0.19 vs 0.70 ms for a 3072 x 576 4:8 INT8 product on one thread)
    _bg_par(vals, p[0], p[1], p[2], index, scale, zero, p[3] != 0, p[4], x, out, max(tasks, 1), w, tmp)


# Parallel twins: rows (or 64-row blocks, or row quads) split into ``tasks`` ranges. A parallel
# region costs microseconds to start - and milliseconds when another process holds a core,
# since it waits for every worker - so run_op takes them only for layers big enough to share.
@njit(parallel=True, error_model="numpy", cache=True)
def _a8_par(par, stream, wscale, corr, xu, xs, out, rows, tasks):  # pragma: no cover - jitted
    step = (rows + tasks - 1) // tasks
    for t in prange(tasks):
        r0 = t * step
        r1 = min(rows, r0 + step)
        if r0 < r1:
            _a8_rows(par, stream, wscale, corr, xu, xs, out, r0, r1)


@njit(parallel=True, error_model="numpy", cache=True)
def _f32_par(par, vals, meta, x, out, rows, tasks):  # pragma: no cover - jitted
    quads = par[1]
    step = 4 * ((quads + tasks - 1) // tasks)
    for t in prange(tasks):
        r0 = t * step
        r1 = min(4 * quads, r0 + step)
        if r0 < r1:
            _f32_rows(par, vals, meta, x, out, r0, r1)


@njit(parallel=True, error_model="numpy", cache=True)
def _bq_par(codes, bits4, meta, scale, zero, has_zero, gps, x, out, tasks):  # pragma: no cover - jitted
    nb = codes.shape[0]
    step = (nb + tasks - 1) // tasks
    for t in prange(tasks):
        _bq_blocks(codes, bits4, meta, scale, zero, has_zero, gps, x, out, t * step, min(nb, (t + 1) * step))


@njit(parallel=True, error_model="numpy", cache=True)
def _bf_par(vals, meta, x, out, tasks):  # pragma: no cover - jitted
    nb = vals.shape[0]
    step = (nb + tasks - 1) // tasks
    for t in prange(tasks):
        _bf_blocks(vals, meta, x, out, t * step, min(nb, (t + 1) * step))


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _dot_f32(w, x):  # pragma: no cover - jitted
    acc = np.float32(0.0)
    for k in range(w.shape[0]):
        acc += w[k] * x[k]
    return acc


@njit(fastmath=FAST, error_model="numpy", cache=True)
def _dot_q8(q, x):  # pragma: no cover - jitted
    acc = np.float32(0.0)
    for k in range(q.shape[0]):
        acc += np.float32(q[k]) * x[k]
    return acc


@njit(error_model="numpy", cache=True)
def _df_rows(w, x, out, r0, r1):  # pragma: no cover - jitted
    for r in range(r0, r1):
        out[r] = _dot_f32(w[r], x)


@njit(error_model="numpy", cache=True)
def _dq_rows(q, scale, group, x, out, r0, r1):  # pragma: no cover - jitted
    """``out[r] = sum_g scale[r, g] * dot(q[r, g*group:(g+1)*group], x[same])``."""
    cols = q.shape[1]
    for r in range(r0, r1):
        acc = np.float32(0.0)
        for g in range(scale.shape[1]):
            k0 = g * group
            k1 = min(cols, k0 + group)
            acc += _dot_q8(q[r, k0:k1], x[k0:k1]) * scale[r, g]
        out[r] = acc


@njit(parallel=True, error_model="numpy", cache=True)
def _df_par(w, x, out, tasks):  # pragma: no cover - jitted
    rows = w.shape[0]
    step = (rows + tasks - 1) // tasks
    for t in prange(tasks):
        _df_rows(w, x, out, t * step, min(rows, (t + 1) * step))


@njit(parallel=True, error_model="numpy", cache=True)
def _dq_par(q, scale, group, x, out, tasks):  # pragma: no cover - jitted
    rows = q.shape[0]
    step = (rows + tasks - 1) // tasks
    for t in prange(tasks):
        _dq_rows(q, scale, group, x, out, t * step, min(rows, (t + 1) * step))


@njit(error_model="numpy", cache=True)
def _tasks(rows, threads):  # pragma: no cover - jitted
    return threads if rows >= MIN_ROWS_PER_THREAD * threads else 1


@njit(error_model="numpy", cache=True)
def run_op(op, x, xu, xs, dst, tmp, threads, kw):  # pragma: no cover - jitted
    """``dst[off : off + rows] = W x (+ b)`` for one op row; ``kw`` = the kinds' arrays.
    ``dst`` has slack behind ``off + rows``: kernels may write whole row quads / blocks."""
    (a8_par, a8_stream, a8_scale, a8_corr, f32_par, f32_vals, f32_meta,
     bq_par, bq_codes8, bq_codes4, bq_meta, bq_scale, bq_zero, bf_vals, bf_meta,
     df_w, dq_par, dq_codes, dq_scale, biases, bh_par, bh_vals, bh_meta,
     bg_par, bg_f32, bg_i8, bg_u8, bg_u16, bg_index, bg_scale, bg_zero, bg_w, bg_tmp) = kw
    kind, idx, off, rows, bias = op[F_KIND], op[F_IDX], op[F_OFF], op[F_ROWS], op[F_BIAS]
    # the kernel writes straight into the destination (every buffer has slack for the padded
    # rows some kernels write); with a bias it writes to tmp and the sum is stored
    out = dst[off:] if bias < 0 else tmp
    tasks = _tasks(rows, threads)
    if kind == KIND_A8:
        if tasks > 1:
            _a8_par(a8_par[idx], a8_stream[idx], a8_scale[idx], a8_corr[idx], xu, xs, out, rows, tasks)
        else:
            _a8_rows(a8_par[idx], a8_stream[idx], a8_scale[idx], a8_corr[idx], xu, xs, out, 0, rows)
    elif kind == KIND_F32:
        if tasks > 1:
            _f32_par(f32_par[idx], f32_vals[idx], f32_meta[idx], x, out, rows, tasks)
        else:
            _f32_rows(f32_par[idx], f32_vals[idx], f32_meta[idx], x, out, 0, 4 * f32_par[idx, 1])
    elif kind == KIND_BQ:
        p = bq_par[idx]
        nb = bq_meta[idx].shape[0]
        if p[0]:
            if tasks > 1:
                _bq_par(bq_codes4[p[3]], True, bq_meta[idx], bq_scale[idx], bq_zero[idx], p[1] != 0, p[2], x, out, tasks)
            else:
                _bq_blocks(bq_codes4[p[3]], True, bq_meta[idx], bq_scale[idx], bq_zero[idx], p[1] != 0, p[2], x, out, 0, nb)
        else:
            if tasks > 1:
                _bq_par(bq_codes8[p[3]], False, bq_meta[idx], bq_scale[idx], bq_zero[idx], p[1] != 0, p[2], x, out, tasks)
            else:
                _bq_blocks(bq_codes8[p[3]], False, bq_meta[idx], bq_scale[idx], bq_zero[idx], p[1] != 0, p[2], x, out, 0, nb)
    elif kind == KIND_BF:
        if tasks > 1:
            _bf_par(bf_vals[idx], bf_meta[idx], x, out, tasks)
        else:
            _bf_blocks(bf_vals[idx], bf_meta[idx], x, out, 0, bf_vals[idx].shape[0])
    elif kind == KIND_BH:
        if tasks > 1:
            _bh_par(bh_vals[idx], bh_par[idx, 0], bh_meta[idx], x, out, tasks)
        else:
            _bh_blocks(bh_vals[idx], bh_par[idx, 0], bh_meta[idx], x, out, 0, bh_vals[idx].shape[0])
    elif kind == KIND_BG:
        p = bg_par[idx]
        t = min(tasks, bg_w.shape[0])
        if p[5] == 0:
            _bg_run(bg_f32[idx], p, bg_index[idx], bg_scale[idx], bg_zero[idx], x, out, t, bg_w, bg_tmp)
        elif p[5] == 1:
            _bg_run(bg_i8[idx], p, bg_index[idx], bg_scale[idx], bg_zero[idx], x, out, t, bg_w, bg_tmp)
        elif p[5] == 2:
            _bg_run(bg_u8[idx], p, bg_index[idx], bg_scale[idx], bg_zero[idx], x, out, t, bg_w, bg_tmp)
        else:
            _bg_run(bg_u16[idx], p, bg_index[idx], bg_scale[idx], bg_zero[idx], x, out, t, bg_w, bg_tmp)
    elif kind == KIND_DF:
        if tasks > 1:
            _df_par(df_w[idx], x, out, tasks)
        else:
            _df_rows(df_w[idx], x, out, 0, rows)
    else:
        if tasks > 1:
            _dq_par(dq_codes[idx], dq_scale[idx], dq_par[idx, 0], x, out, tasks)
        else:
            _dq_rows(dq_codes[idx], dq_scale[idx], dq_par[idx, 0], x, out, 0, rows)
    if bias >= 0:
        b = biases[bias]
        for r in range(rows):
            dst[off + r] = tmp[r] + b[r]


# ---------------------------------------------------------------- elementwise parts
@njit(fastmath=FAST, error_model="numpy", cache=True)
def rmsnorm(h, w, eps, out):  # pragma: no cover - jitted
    """``out = h / sqrt(mean(h^2) + eps) * w`` (LlamaRMSNorm, computed in float32)."""
    ss = np.float32(0.0)
    for i in range(h.shape[0]):
        ss += h[i] * h[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(h.shape[0]) + eps)
    for i in range(h.shape[0]):
        out[i] = w[i] * (h[i] * inv)


XBLOCK = 256  # inputs per activation scale (kernels/cpu_vnni.py)
ROUNDER = np.float32(12582912.0)  # 1.5 * 2^23


@njit(error_model="numpy", cache=True)  # no fast-math: the same bits as _quantize (a/127, not a*(1/127))
def quantize_a8(x, xu, xs):  # pragma: no cover - jitted
    """``kernels/cpu_vnni._quantize`` in vectorizable loops: per block of 256 inputs
    ``xs_b = max|x| / 127`` (1 for an all-zero block), ``xu = rint(x / xs_b) + 128``. The
    absolute maximum is taken on the float bits as unsigned integers (|x| orders like its
    bits, and a NaN or infinity has bits >= 0x7F800000), so the reduction vectorizes and
    non-finite input is caught in the same pass: returns False, writing nothing, like
    ``_quantize``. Each block's loops run over slices from 0: an index computed from the block
    (``b * 256 + j``) kept numba's negative-index check in the loop, which stopped LLVM from
    vectorizing it (5x slower, 1536 inputs)."""
    bits = x.view(np.uint32)
    xs_bits = xs.view(np.uint32)
    cols = x.shape[0]
    nb = (cols + XBLOCK - 1) // XBLOCK
    for b in range(nb):  # pass 1: each block's max |x| as bits; any NaN/Inf -> nothing written
        lo = b * XBLOCK
        blk = bits[lo: lo + min(cols - lo, XBLOCK)]
        m = np.uint32(0)
        for j in range(blk.shape[0]):
            v = blk[j] & np.uint32(0x7FFFFFFF)
            m = v if v > m else m
        if m >= np.uint32(0x7F800000):
            return False
        xs_bits[b] = m
    for b in range(nb):
        amax = xs[b]
        step = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        xs[b] = step
        inv = np.float32(1.0) / step
        lo = b * XBLOCK
        n = min(cols - lo, XBLOCK)
        xb = x[lo: lo + n]
        ub = xu[lo: lo + n]
        for j in range(n):
            # rint by the 1.5 * 2^23 trick (round-to-nearest-even, |y| <= 127 here), + 128:
            # exact integers in [1, 255] after the clamp, converted straight to bytes
            y = (xb[j] * inv + ROUNDER) - ROUNDER + np.float32(128.0)
            y = y if y > np.float32(1.0) else np.float32(1.0)
            y = y if y < np.float32(255.0) else np.float32(255.0)
            ub[j] = np.uint8(y)
    return True


@njit(error_model="numpy", cache=True)
def norm_and_quantize(h, w, eps, out, xu, xs, quantize):  # pragma: no cover - jitted
    """RMSNorm fused with the INT8 activation quantization the A8 kernels read (per block of
    256, ``kernels/cpu_vnni._quantize``). Returns False when the input is not finite."""
    rmsnorm(h, w, eps, out)
    if quantize:
        return quantize_a8(out, xu, xs)
    return True


@njit(fastmath=FAST, error_model="numpy", cache=True)
def rope(v, heads, hd, cos, sin):  # pragma: no cover - jitted
    """In place on ``heads`` vectors of ``hd``: ``(a, b) -> (a cos - b sin, b cos + a sin)``
    for the halves a = v[:hd/2], b = v[hd/2:] (transformers' rotate_half convention); the
    halves as slices, so the loop indexes from 0 and vectorizes (see :func:`quantize_a8`)."""
    half = hd // 2
    for h in range(heads):
        a = v[h * hd: h * hd + half]
        b = v[h * hd + half: (h + 1) * hd]
        for i in range(half):
            ai = a[i]
            bi = b[i]
            a[i] = ai * cos[i] - bi * sin[i]
            b[i] = bi * cos[i] + ai * sin[i]


@njit(fastmath=FAST, error_model="numpy", cache=True)
def silu_mul(gu, inter, out, bits):  # pragma: no cover - jitted
    """``out = silu(g) * u`` for ``gu = [g; u]``, silu(z) = z / (1 + e^-z).

    ``e^-z = 2^n 2^f`` (n = rint(-z log2 e), |f| <= 1/2): 2^f by a Taylor polynomial
    (``attention.exp_poly``) and 2^n as float bits ``(n + 127) << 23`` in ``bits`` (uint32,
    >= inter) - loops LLVM vectorizes, where a call of exp per element does not."""
    fb = bits.view(np.float32)
    for i in range(inter):
        z = min(max(-gu[i] * LOG2E, np.float32(-126.0)), np.float32(126.0))
        n = np.rint(z)
        out[i] = exp_poly((z - n) * LN2)
        bits[i] = np.uint32(np.int32(n) + 127) << np.uint32(23)
    g = gu[:inter]
    u = gu[inter: 2 * inter]
    for i in range(inter):
        out[i] = g[i] / (np.float32(1.0) + out[i] * fb[i]) * u[i]


# ---------------------------------------------------------------- the step
# the parts of a step (``decode_step_parts``): the products, attention over the cache, and
# the element-wise rest (embedding row, RMSNorm + INT8 quantization, RoPE, the KV cache
# write, SwiGLU, residuals) - a token's time less the three is the runtime's own overhead
PART_PRODUCTS, PART_ATTENTION, PART_ELEMENTWISE = 1, 2, 4
PART_ALL = PART_PRODUCTS | PART_ATTENTION | PART_ELEMENTWISE


@njit(error_model="numpy", cache=True)
def decode_step(token, pos, cfg, eps, scaling, ops, head_op, a8_in, norms, emb, kc, vc, cos, sin, bufs, kw, logits):  # pragma: no cover - jitted
    """Run token ``token`` at position ``pos`` through the model; writes ``logits``.
    Returns False if an activation was not finite (see :func:`decode_step_parts`)."""
    return decode_step_parts(token, pos, cfg, eps, scaling, ops, head_op, a8_in, norms, emb, kc, vc, cos, sin, bufs, kw,
                             logits, PART_ALL)


@njit(error_model="numpy", cache=True)
def decode_step_parts(token, pos, cfg, eps, scaling, ops, head_op, a8_in, norms, emb, kc, vc, cos, sin, bufs, kw, logits, parts):  # pragma: no cover - jitted
    """The step, running only the ``parts`` (PART_* bits; PART_ALL: a real step). Less than
    all parts computes nothing meaningful: it times a part on the step's own buffers
    (``DecodeEngine.time_elementwise``).

    ``a8_in[layer, 0..1]``: whether the attention / MLP input feeds an A8 op (quantize it),
    ``a8_in[layer, 2..3]``: the same for o_proj / down_proj inputs; ``a8_in[layers, 0]`` the head.
    ``norms``: (2 * layers + 1, hidden) RMSNorm weights (input, post-attention per layer, final).
    ``emb``: (table f32 (V, H) or empty, codes int8 (V, H) or empty, scales (V, Gq)).
    Returns False if an activation was not finite (INT8 cannot carry it: the caller falls back)."""
    H = cfg[C_HIDDEN]
    NH = cfg[C_HEADS]
    KVH = cfg[C_KV_HEADS]
    HD = cfg[C_HEAD_DIM]
    INTER = cfg[C_INTER]
    L = cfg[C_LAYERS]
    threads = cfg[C_THREADS]
    h_buf, x_buf, qkv, att, gu, act, xu, xs, tmp, attn, bits = bufs
    h = h_buf[:H]  # the buffers carry slack behind them: norms need the exact length
    x = x_buf[:H]
    products = (parts & PART_PRODUCTS) != 0
    attention = (parts & PART_ATTENTION) != 0
    elementwise = (parts & PART_ELEMENTWISE) != 0
    table, codes, escale = emb
    # embedding lookup: float table or INT8 codes with row/group scales
    if elementwise and table.shape[0] > 1:
        for i in range(H):
            h[i] = table[token, i]
    elif elementwise:
        group = cfg[C_EMB_GROUP]
        for i in range(H):
            h[i] = np.float32(codes[token, i]) * escale[token, i // group]
    c = cos[pos]
    s = sin[pos]
    ok = True
    for layer in range(L):
        lo = ops[layer]
        kl = kc[layer]
        vl = vc[layer]
        if elementwise:
            ok &= norm_and_quantize(h, norms[2 * layer], eps, x, xu, xs, a8_in[layer, 0] != 0)
        if products:
            for slot in SLOT_QKV:
                if lo[slot, F_KIND] >= 0:
                    run_op(lo[slot], x, xu, xs, qkv, tmp, threads, kw)
        if elementwise:
            rope(qkv[: NH * HD], NH, HD, c, s)
            rope(qkv[NH * HD: (NH + KVH) * HD], KVH, HD, c, s)
            for g in range(KVH):
                for i in range(HD):
                    kl[g, pos, i] = from_f32(kl, qkv[(NH + g) * HD + i])
                    vl[g, pos, i] = from_f32(vl, qkv[(NH + KVH + g) * HD + i])
        if attention:
            attend(qkv, kl, vl, pos, NH, KVH, HD, scaling, cfg[C_WINDOW], attn, att, threads if pos >= PAR_MIN_POS else 1)
        if elementwise and a8_in[layer, 2] != 0:
            ok &= quantize_a8(att[: NH * HD], xu, xs)
        if products:
            run_op(lo[SLOT_O[0]], att[: NH * HD], xu, xs, x_buf, tmp, threads, kw)
        if elementwise:
            for i in range(H):
                h[i] += x[i]
            ok &= norm_and_quantize(h, norms[2 * layer + 1], eps, x, xu, xs, a8_in[layer, 1] != 0)
        if products:
            for slot in SLOT_GU:
                if lo[slot, F_KIND] >= 0:
                    run_op(lo[slot], x, xu, xs, gu, tmp, threads, kw)
        if elementwise:
            silu_mul(gu, INTER, act, bits)
            if a8_in[layer, 3] != 0:
                ok &= quantize_a8(act[:INTER], xu, xs)
        if products:
            run_op(lo[SLOT_DOWN[0]], act[:INTER], xu, xs, x_buf, tmp, threads, kw)
        if elementwise:
            for i in range(H):
                h[i] += x[i]
    if elementwise:
        ok &= norm_and_quantize(h, norms[2 * L], eps, x, xu, xs, a8_in[L, 0] != 0)
        ok &= np.isfinite(x.sum())
    if products:
        run_op(head_op, x, xu, xs, logits, tmp, threads, kw)
    return ok


@njit(cache=True)
def run_nothing(op, x, xu, xs, dst, tmp, threads, kw):  # pragma: no cover - jitted
    """:func:`run_op`'s arguments and nothing else: the cost of calling it from Python
    (``DecodeEngine.time_ops`` subtracts it)."""
    return op[0]


@njit(error_model="numpy", cache=True)
def products_only(cfg, ops, head_op, bufs, kw, sink):  # pragma: no cover - jitted
    """Every product of one decoding step, in the step's order and on its buffers, and
    nothing else: the kernels' share of a token's time (``DecodeEngine.time_products``).
    ``sink`` (>= vocab floats) takes the outputs that would overwrite the step's state."""
    H = cfg[C_HIDDEN]
    NH = cfg[C_HEADS]
    HD = cfg[C_HEAD_DIM]
    INTER = cfg[C_INTER]
    threads = cfg[C_THREADS]
    h_buf, x_buf, qkv, att, gu, act, xu, xs, tmp, attn, bits = bufs
    x = x_buf[:H]
    for layer in range(cfg[C_LAYERS]):
        lo = ops[layer]
        for slot in SLOT_QKV:
            if lo[slot, F_KIND] >= 0:
                run_op(lo[slot], x, xu, xs, qkv, tmp, threads, kw)
        run_op(lo[SLOT_O[0]], att[: NH * HD], xu, xs, sink, tmp, threads, kw)
        for slot in SLOT_GU:
            if lo[slot, F_KIND] >= 0:
                run_op(lo[slot], x, xu, xs, gu, tmp, threads, kw)
        run_op(lo[SLOT_DOWN[0]], act[:INTER], xu, xs, sink, tmp, threads, kw)
    run_op(head_op, x, xu, xs, sink, tmp, threads, kw)
