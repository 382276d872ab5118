"""Dense INT8 x INT8-activation GEMV kernels (kernels/dense_a8.py): every variant against the
float64 statement of the same quantized arithmetic, the C ABI through the runtime's
``call_a8``, row ranges, padding, saturation, the plan, the reasons and the machine code."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from numba import njit

from sparsemerge.kernels import dense_a8 as D
from sparsemerge.kernels.cpu_vnni import XBLOCK, _quantize
from sparsemerge.kernels.features import ENV, cpu_level
from sparsemerge.kernels.llvm_jit import features_missing
from sparsemerge.runtime.ffi import call_a8

# the cap that makes each variant the best one on a host that has them all
CAP = {"avx512vnni": None, "avxvnni": "avxvnni", "avx2": "avx2"}


@pytest.fixture(autouse=True)
def _no_env_cap(monkeypatch):
    """The tests set the cap themselves (cpu_level(None) falls back to the environment)."""
    monkeypatch.delenv(ENV, raising=False)


def host_lacks(variant: str) -> list[str]:
    return features_missing(D.REQUIRED_FEATURES[variant])


def needs(variant: str):
    return pytest.mark.skipif(bool(host_lacks(variant)), reason=f"CPU lacks {host_lacks(variant)}")


each_variant = pytest.mark.parametrize("variant", [pytest.param(v, marks=needs(v)) for v in D.VARIANTS])


def layer(rows: int, cols: int, group_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-128, 128, (rows, cols)).astype(np.int8)
    ngroups = 1 if group_size == 0 else -(-cols // group_size)
    scale = (rng.random((rows, ngroups)) * 0.02 + 1e-3).astype(np.float32)
    x = (rng.standard_normal((1, cols)) * 2).astype(np.float32)
    x[0, ::7] *= 10  # uneven blocks: different xs per 256
    return codes, scale, x


def check_close(y, codes, scale, group_size, x):
    """y is the float64 reference rounded once to float32: every segment's integer dot is exact
    and its scaling and the sum over segments are in double, so only the final rounding (half
    an ulp) and double-rounding noise (relative to sum |w| |x_hat|) separate them."""
    ref = D.reference(codes, scale, group_size, x)
    mag = D.reference(np.abs(codes.astype(np.int16)).astype(np.float64), scale, group_size, np.abs(x))
    y = np.asarray(y, np.float64)
    assert y.shape == ref.shape
    bad = np.abs(y - ref) > 2.0 ** -24 * np.abs(ref) + 1e-12 * mag
    assert not bad.any(), (y[bad][:5], ref[bad][:5])


def quantized(x: np.ndarray, nch: int, fill: int = 128):
    nxb = -(-nch // 4)
    xu = np.full(nxb * XBLOCK, fill, np.uint8)
    xs = np.empty(nxb, np.float32)
    assert _quantize(np.ascontiguousarray(x[0]), xu, xs)
    return xu, xs


# ---------------------------------------------------------------- every variant vs the reference
@each_variant
@pytest.mark.parametrize("group_size", [0, 128, 256, 192])
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 576), (7, 320), (197, 576), (13, 1536), (5, 200), (1030, 128)])
def test_matches_the_quantized_reference(variant, group_size, rows, cols):
    codes, scale, x = layer(rows, cols, group_size, rows + cols)
    with cpu_level(CAP[variant]):
        assert D.best_variant()[0] == variant
        assert D.unavailable_reason(rows, cols, group_size, variant) is None
        plan = D.prepare(codes, scale, group_size)
        y = D.dense_a8_matmul(plan, x, threads=1)
        check_close(y.numpy(), codes, scale, group_size, x)
        if rows >= 2 * D.MIN_ROWS_PER_THREAD:  # the row split over threads gives the same numbers
            torch.testing.assert_close(D.dense_a8_matmul(plan, torch.from_numpy(x), threads=2), y, rtol=0, atol=0)


@each_variant
def test_variants_agree_bitwise(variant):
    """Exact integer dots, the same double arithmetic per segment: every variant gives the
    same float32 numbers."""
    codes, scale, x = layer(64, 1536, 128, 9)
    plan = D.prepare(torch.from_numpy(codes), torch.from_numpy(scale), 128)
    y = D.dense_a8_matmul(plan, x, 1, variant=variant)
    assert torch.equal(y, D.dense_a8_matmul(plan, x, 1, variant="avx2"))


@each_variant
def test_prefetch_distance_changes_no_number(variant):
    """The software prefetch only moves data into the cache: with it (one per row and chunk,
    at its distance) and without, the same float32 numbers, whatever the row range."""
    assert "call void @llvm.prefetch" not in D.kernel_ir(variant, "k", 0)
    ir = D.kernel_ir(variant, "k", 4096)
    calls = [line for line in ir.splitlines() if "call void @llvm.prefetch" in line]
    assert len(calls) == D.QUAD + 1 and all("i32 0, i32 3, i32 1" in c for c in calls)  # g4's rows + g1's row
    assert ir.count("i64 4096\n") == D.QUAD + 1
    codes, scale, x = layer(37, 576, 64, 5)
    plan = D.prepare(codes, scale, 64)
    xu, xs = quantized(x, plan["npairs"])
    par = (plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"])
    outs = []
    for prefetch in (0, 64, 4096):
        out = np.zeros(37, np.float32)
        _call(D.address(variant, prefetch), plan["stream"], plan["scale"], plan["corr"], xu, xs, out, 0, 37, *par)
        outs.append(out)
    check_close(outs[0][None], codes, scale, 64, x)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


# ---------------------------------------------------------------- the C ABI, row ranges, padding
@njit
def _call(addr, stream, wscale, corr, xu, xs, out, r0, r1, npairs, tail, nscale, xb_per_q):
    call_a8(addr, stream.ctypes.data, wscale.ctypes.data, corr.ctypes.data, xu.ctypes.data, xs.ctypes.data,
            out.ctypes.data, r0, r1, npairs, tail, nscale, xb_per_q)


@each_variant
@pytest.mark.parametrize("rows,cols,group_size,split", [(11, 576, 0, 5), (23, 576, 128, 9), (6, 320, 64, 1),
                                                        (9, 200, 128, 3), (4, 1536, 256, 2)])
def test_call_a8_from_numba_in_two_row_ranges(variant, rows, cols, group_size, split):
    """The runtime's intrinsic calls the kernel by address with the plan's p0..p3; two calls
    on [0, split) and [split, rows) (unaligned to the quads) fill exactly their rows, and
    stale bytes behind ``cols`` in xu change nothing."""
    codes, scale, x = layer(rows, cols, group_size, 3)
    plan = D.prepare(codes, scale, group_size)
    addr = ctypes.cast(D.compiled_functions(variant)["int8"], ctypes.c_void_p).value
    assert addr == D.address(variant)
    xu, xs = quantized(x, plan["npairs"])
    xu[cols:] = np.random.default_rng(0).integers(0, 256, xu.size - cols)  # stale padding
    out = np.full(rows + 8, np.float32(-7.5), np.float32)
    args = (plan["stream"], plan["scale"], plan["corr"], xu, xs, out)
    par = (plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"])
    _call(addr, *args, 0, split, *par)
    assert (out[split:] == np.float32(-7.5)).all()  # nothing written outside [r0, r1)
    _call(addr, *args, split, rows, *par)
    assert (out[rows:] == np.float32(-7.5)).all()
    check_close(out[None, :rows], codes, scale, group_size, x)
    _call(addr, *args, rows, rows, *par)  # an empty range writes nothing
    assert (out[rows:] == np.float32(-7.5)).all()


@each_variant
def test_extreme_codes_do_not_saturate(variant):
    """Codes +-127 and -128 against activations +-127: vpmaddubsw pairs reach 2 * 128 * 127 =
    32512 (inside int16) with the sign trick; hand-computed sums."""
    cols = 256
    codes = np.zeros((3, cols), np.int8)
    codes[0] = 127
    codes[1] = -128
    codes[2, 0::2], codes[2, 1::2] = -128, 127
    scale = np.ones((3, 1), np.float32)
    x = np.ones((1, cols), np.float32)
    x[0, 0::2] = -1.0  # xs = 1/127, xq = -127, +127 alternating
    plan = D.prepare(codes, scale, 0)
    y = D.dense_a8_matmul(plan, x, 1, variant=variant).numpy()[0]
    # row 0: 127 * (sum of +-1) = 0; row 1: 0; row 2: 128 * 128 pairs... per pair: -128*-1 + 127*1 = 255
    np.testing.assert_allclose(y, [0.0, 0.0, 255.0 * 128], rtol=1e-7, atol=0)
    x[0] = -1.0
    y = D.dense_a8_matmul(plan, x, 1, variant=variant).numpy()[0]
    np.testing.assert_allclose(y, [-127.0 * cols, 128.0 * cols, 128.0 * (cols // 2) - 127.0 * (cols // 2)], rtol=1e-7)


@each_variant
def test_nan_input_returns_none(variant):
    codes, scale, x = layer(8, 256, 0)
    x[0, 17] = np.nan
    assert D.dense_a8_matmul(D.prepare(codes, scale, 0), x, 1, variant=variant) is None


# ---------------------------------------------------------------- the plan
def test_plan_layout_and_parameters():
    codes = torch.randint(-128, 128, (10, 576), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(10, 5)
    plan = D.prepare(codes, scale, 128)
    c = codes.numpy()
    # quad-interleaved: row r's chunk k at [r // 4, 256 k + 64 (r % 4)], rows padded to 12 with zeros
    stream = plan["stream"]
    assert stream.dtype == np.uint8 and stream.shape == (3, 9 * 256)
    for r in range(12):
        for k in range(9):
            got = stream[r // 4, 256 * k + 64 * (r % 4): 256 * k + 64 * (r % 4) + 64].view(np.int8)
            np.testing.assert_array_equal(got, c[r, 64 * k: 64 * k + 64] if r < 10 else 0)
    np.testing.assert_array_equal(D.stream_rows(plan, [9, 0, 4, 9]), c[[9, 0, 4, 9]])
    with pytest.raises(IndexError):
        D.stream_rows(plan, [10])
    assert (plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"]) == (9, 2, 5, 1)
    assert plan["corr"].shape == (10, 5) and plan["corr"].dtype == np.int32
    c = c.astype(np.int64)
    np.testing.assert_array_equal(plan["corr"][:, 0], -128 * c[:, :128].sum(1))
    np.testing.assert_array_equal(plan["corr"][:, 4], -128 * c[:, 512:].sum(1))
    assert plan["nbytes"] == 12 * 576 + 10 * 5 * 4 + 10 * 5 * 4
    per_row = D.prepare(codes, scale[:, :1], 0)
    assert (per_row["tail"], per_row["nscale"], per_row["xb_per_q"]) == (4, 1, 3)
    np.testing.assert_array_equal(per_row["corr"][:, 2], -128 * c[:, 512:].sum(1))
    g512 = D.prepare(codes, torch.rand(10, 2), 512)  # a scale group of two activation blocks
    assert (g512["tail"], g512["xb_per_q"]) == (4, 2)
    odd = D.prepare(codes[:, :200], torch.rand(10, 1), 0)  # padded with zero codes to 256
    assert odd["stream"].shape == (3, 4 * 256) and odd["npairs"] == 4
    assert not odd["stream"].reshape(3, 4, 4, 64)[:, 3, :, 8:].any()
    np.testing.assert_array_equal(D.stream_rows(odd, range(10)), codes.numpy()[:, :200])


def test_bad_input_is_rejected_clearly():
    codes = np.zeros((4, 256), np.int8)
    with pytest.raises(ValueError, match="int8 codes"):
        D.prepare(codes.astype(np.int16), np.ones((4, 1), np.float32), 0)
    with pytest.raises(ValueError, match="expected \\(4, 2\\)"):
        D.prepare(codes, np.ones((4, 1), np.float32), 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        D.prepare(codes, np.ones((4, 3), np.float32), 96)
    with pytest.raises(ValueError, match="one row"):
        D.dense_a8_matmul(D.prepare(codes, np.ones(4, np.float32), 0), np.ones((2, 256), np.float32), 1)
    with pytest.raises(ValueError, match="unknown dense A8 variant"):
        D.unavailable_reason(4, 256, 0, "sse2")


# ---------------------------------------------------------------- choice under the feature cap
@needs("avx512vnni")
@needs("avxvnni")
def test_the_cap_picks_the_variant_and_says_why():
    with cpu_level("avx2"):
        best, why = D.best_variant()
        assert best == "avx2"
        assert "avx512vnni" in why["avx512vnni"] and "cap" in why["avx512vnni"]
        assert "avxvnni" in why["avxvnni"]
        assert "cap" in D.unavailable_reason(100, 576, 0, "avxvnni")
    with cpu_level("none"):
        best, why = D.best_variant()
        assert best is None and set(why) == set(D.VARIANTS)
        with pytest.raises(RuntimeError, match="no dense A8 kernel"):
            D.dense_a8_matmul(D.prepare(np.zeros((4, 64), np.int8), np.ones(4, np.float32), 0), np.ones((1, 64), np.float32))
        with pytest.raises(RuntimeError, match="cap"):
            D.dense_a8_matmul(D.prepare(np.zeros((4, 64), np.int8), np.ones(4, np.float32), 0), np.ones((1, 64), np.float32),
                              variant="avx2")
    assert D.best_variant() == ("avx512vnni", {})
    assert "multiple of 64" in D.unavailable_reason(4, 256, 100, "avx2")


# ---------------------------------------------------------------- the machine code
@pytest.mark.parametrize("variant", D.VARIANTS)
def test_machine_code_uses_the_variants_instructions(variant):
    """The 256-bit variants are x86-64-v3 code (no zmm, no EVEX): they run on AVX2 machines."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    cpu, feats = D._TARGET[variant]
    if cpu is None:  # the host target: only where the host has AVX-512 VNNI
        if host_lacks(variant):
            pytest.skip(f"CPU lacks {host_lacks(variant)}")
        cpu, feats = llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    machine = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=feats, opt=3)
    asm = machine.emit_assembly(llvm.parse_assembly(D.kernel_ir(variant, "k")))
    if variant == "avx512vnni":
        assert "vpdpbusd" in asm and "zmm" in asm
    else:
        assert "zmm" not in asm and "{evex}" not in asm and "%k1" not in asm
        for op in (["{vex}\tvpdpbusd"] if variant == "avxvnni" else ["vpmaddubsw", "vpsignb", "vpabsb", "vpmaddwd"]):
            assert op in asm, op


# ---------------------------------------------------------------- with Int8Linear's codes
@pytest.mark.parametrize("group_size", [0, 128])
def test_int8linear_codes_match_the_float_head_within_the_activation_rounding(group_size):
    from sparsemerge.kernels.dense_int8 import Int8Linear

    if D.best_variant()[0] is None:
        pytest.skip("no dense A8 variant on this CPU")
    lin = torch.nn.Linear(576, 300, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    head = Int8Linear.from_linear(lin, group_size)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(1))
    y = D.dense_a8_matmul(D.prepare(head.codes, head.scale, head.group_size), x, 2)
    with torch.no_grad():
        ref = x @ head.to_dense().T
    # per-256 activation rounding: ~0.4% relative per block
    assert (y - ref).norm() / ref.norm() < 1e-2
    check_close(y.numpy(), head.codes.numpy(), head.scale.numpy(), group_size, x.numpy())
