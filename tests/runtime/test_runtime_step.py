"""The compiled pieces of a decoding step against numpy formulas."""
from __future__ import annotations

import numpy as np
import pytest

from sparsemerge.runtime import step as S


def test_silu_mul_matches_the_formula_including_extremes():
    rng = np.random.default_rng(0)
    g = (rng.standard_normal(1000) * 6).astype(np.float32)
    g[:4] = [200.0, -200.0, 0.0, 88.0]
    u = rng.standard_normal(1000).astype(np.float32)
    out = np.zeros(1000, np.float32)
    S.silu_mul(np.concatenate([g, u]), 1000, out, np.zeros(1000, np.uint32))
    gd = g.astype(np.float64)
    ref = gd / (1 + np.exp(-gd)) * u
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)


def test_rope_rotates_halves():
    hd = 8
    v = np.arange(2 * hd, dtype=np.float32)
    ang = np.array([0.3, 1.1, -0.4, 2.0], np.float32)
    c, s = np.cos(ang), np.sin(ang)
    w = v.copy()
    S.rope(w, 2, hd, c, s)
    for h in range(2):
        a, b = v[h * hd:h * hd + 4], v[h * hd + 4:(h + 1) * hd]
        np.testing.assert_allclose(w[h * hd:h * hd + 4], a * c - b * s, rtol=1e-6)
        np.testing.assert_allclose(w[h * hd + 4:(h + 1) * hd], b * c + a * s, rtol=1e-6)


def test_rmsnorm():
    h = np.random.default_rng(1).standard_normal(96).astype(np.float32)
    w = np.linspace(0.5, 1.5, 96).astype(np.float32)
    out = np.zeros(96, np.float32)
    S.rmsnorm(h, w, np.float32(1e-5), out)
    np.testing.assert_allclose(out, h / np.sqrt(np.mean(h.astype(np.float64) ** 2) + 1e-5) * w, rtol=1e-5)


def test_quantize_a8_is_bit_identical_to_the_kernels_quantizer():
    from sparsemerge.kernels.cpu_vnni import _quantize

    rng = np.random.default_rng(3)
    for cols in (64, 320, 576, 960, 1536):
        x = (rng.standard_normal(cols) * rng.uniform(0.01, 100)).astype(np.float32)
        x[::5] = np.round(x[::5])  # exact integers and halves after scaling
        x[cols // 2] = 0.0
        xu1, xs1 = np.full(2048, 128, np.uint8), np.ones(8, np.float32)
        xu2, xs2 = xu1.copy(), xs1.copy()
        assert S.quantize_a8(x, xu1, xs1) and _quantize(x, xu2, xs2)
        nb = -(-cols // 256)
        assert np.array_equal(xu1[:cols], xu2[:cols]) and np.array_equal(xs1[:nb], xs2[:nb])
    zero = np.zeros(256, np.float32)
    assert S.quantize_a8(zero, xu1, xs1) and (xu1[:256] == 128).all() and xs1[0] == 1.0
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones(300, np.float32)
        x[290] = bad
        before = xu1.copy()
        assert not S.quantize_a8(x, xu1, xs1) and np.array_equal(xu1, before)  # nothing written
