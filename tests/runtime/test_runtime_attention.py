"""Chunked (flash-decoding) attention of one token against the softmax formula in float64."""
from __future__ import annotations

import numpy as np
import pytest

from sparsemerge.runtime import attention as A


def _reference(q, kc, vc, pos, heads, kv, hd, window):
    t0 = 0 if window == 0 else max(0, pos - window + 1)
    out = np.zeros(heads * hd)
    for h in range(heads):
        g = h // (heads // kv)
        s = kc[g, t0:pos + 1].astype(np.float64) @ q[h * hd:(h + 1) * hd] * hd ** -0.5
        p = np.exp(s - s.max())
        out[h * hd:(h + 1) * hd] = (p / p.sum()) @ vc[g, t0:pos + 1]
    return out


def _attend(q, kc, vc, pos, heads, kv, hd, window, threads):
    out = np.full(heads * hd, -7.0, np.float32)  # every element must be written
    scratch = A.make_scratch(heads, kv, hd, kc.shape[1])
    A.attend(q, kc, vc, pos, heads, kv, hd, np.float32(hd ** -0.5), window, scratch, out, threads)
    return out


# positions inside the first chunk, on and across chunk edges (CHUNK = 64), windows that start
# inside a chunk; grouped (6/2), one kv head (multi-query), and one kv head per query head
@pytest.mark.parametrize("pos,window", [(0, 0), (7, 0), (63, 0), (64, 0), (65, 0), (130, 0), (199, 0),
                                        (40, 8), (150, 70), (199, 64)])
@pytest.mark.parametrize("heads,kv,hd", [(6, 2, 16), (4, 1, 8), (3, 3, 24)])
def test_chunked_attention_matches_the_softmax_formula(pos, window, heads, kv, hd):
    rng = np.random.default_rng(pos + 7 * heads)
    q = (rng.standard_normal(heads * hd) * 2).astype(np.float32)
    kc = rng.standard_normal((kv, 200, hd)).astype(np.float32)
    vc = rng.standard_normal((kv, 200, hd)).astype(np.float32)
    one = _attend(q, kc, vc, pos, heads, kv, hd, window, 1)
    np.testing.assert_allclose(one, _reference(q, kc, vc, pos, heads, kv, hd, window), rtol=2e-5, atol=2e-6)
    # the chunks depend on the position only: two threads give the same bits
    assert np.array_equal(_attend(q, kc, vc, pos, heads, kv, hd, window, 2), one)


def test_peaked_scores_and_a_nan_in_the_cache():
    heads, kv, hd = 2, 1, 8
    q = np.zeros(heads * hd, np.float32)
    q[:hd] = 40.0  # head 0: one position dominates by e^hundreds, far below float32's range
    kc = np.zeros((kv, 100, hd), np.float32)
    vc = np.arange(100 * hd, dtype=np.float32).reshape(kv, 100, hd)
    kc[0, 70] = 1.0
    out = _attend(q, kc, vc, 99, heads, kv, hd, 0, 1)
    np.testing.assert_allclose(out[:hd], vc[0, 70], rtol=1e-6)
    np.testing.assert_allclose(out[hd:], vc[0].mean(0), rtol=1e-6)  # head 1: uniform weights
    kc[0, 3, 2] = np.nan  # a NaN key reaches every head reading it (as in the float model)
    assert np.isnan(_attend(q, kc, vc, 99, heads, kv, hd, 0, 2)).all()


def test_exp_nonpositive_matches_exp():
    x = -np.concatenate([np.linspace(0, 90, 5000), [0.0, 1e-30, 87.3, 88.7, 200.0, np.inf]]).astype(np.float32)
    y = x.copy()
    A.exp_nonpositive(y, y.shape[0], np.zeros(y.shape[0], np.uint32))
    ref = np.exp(x.astype(np.float64))
    normal = ref > 1.2e-38
    # float32's rounding of x log2 e bounds the relative error by ~1e-7 |x|
    assert (np.abs(y[normal] / ref[normal] - 1) <= 2e-7 + 1e-7 * np.abs(x[normal])).all()
    assert (y[~normal] <= 1.2e-38).all() and (y >= 0).all()


def test_half_helpers_in_python_equal_numpy():
    from sparsemerge.runtime.half import from_f32, to_f32

    cache = np.zeros(1, np.uint16)
    for v in (1.5, -3.1e-5, 65519.0, 1e6):
        bits = from_f32(cache, np.float32(v))
        with np.errstate(over="ignore"):  # 1e6 overflows to inf in both
            half = np.float32(v).astype(np.float16)
        assert bits == half.view(np.uint16)
        assert to_f32(bits) == half.astype(np.float32)
