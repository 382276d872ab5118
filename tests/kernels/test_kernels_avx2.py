"""The AVX2 + FMA batch-1 kernels (kernels/cpu_avx2.py): against the pure-torch reference, the
slot layouts emulated in numpy, the machine code, and the registry under the feature cap."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemerge.kernels import KERNELS, SparseLinear, SparsifyConfig, cpu_level, select, sparsify_
from sparsemerge.kernels import cpu_avx2 as A
from sparsemerge.kernels import cpu_vnni as V
from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.layout import pack_blocked, positions_of
from sparsemerge.kernels.llvm_jit import merge_declarations
from sparsemerge.kernels.reference import reference_matmul
from sparsemerge.masks import nm_mask

needs_avx2 = pytest.mark.skipif(bool(A.cpu_features_missing()), reason=f"CPU lacks {A.cpu_features_missing()}")
needs_avxvnni = pytest.mark.skipif(bool(A.cpu_features_missing(True)), reason=f"CPU lacks {A.cpu_features_missing(True)}")


def sparse_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), 2, 4)


class Req:
    def __init__(self, layout, act_quant="none"):
        self.layout, self.act_quant = layout, act_quant


# ---------------------------------------------------------------- float32
@needs_avx2
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (5, 96), (197, 576), (1030, 160), (13, 4192)])
@pytest.mark.parametrize("threads", [1, 2])
def test_f32_matches_the_reference(rows, cols, threads):
    layer = pack_blocked(sparse_weight(rows, cols, rows + cols), 2, 4)
    assert A.f32_unavailable_reason(layer) is None
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    y = A.f32_matmul(layer, x, threads)
    torch.testing.assert_close(y, reference_matmul(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_matmul(layer, x, path="avx2-f32"), y)


def test_f32_slot_order_emulated():
    """vpermilps(x[8u..8u+7], meta >> 2j) picks in-lane by the low 2 bits; slots 0,1,4,5 from the
    first register, 2,3,6,7 from the second: the emulation must give each slot the input of
    the kept weight F32_ORDER says it holds."""
    rows, cols = 4, 64
    w = sparse_weight(rows, cols, 3)
    plan = A.prepare_f32(pack_blocked(w, 2, 4))
    x = np.arange(cols, dtype=np.float32) + 1
    meta = plan["meta"].reshape(1, 2, 4)  # (quads, units, rows of the quad)
    vals = plan["vals"].reshape(1, 2, 4, 16)
    for r in range(rows):
        kept_cols = np.nonzero(w[r].numpy())[0]
        kept_vals = w[r].numpy()[kept_cols]
        for u in range(2):
            word = int(meta[0, u, r])
            xs = x[32 * u: 32 * u + 32].reshape(4, 8)  # xA..xD
            for j in range(16):
                half, k = divmod(j, 8)
                lane, i = divmod(k, 4)
                reg = 2 * half + (i // 2)  # slots 2,3 / 6,7 come from the second register
                picked = xs[reg][4 * lane + ((word >> (2 * j)) & 3)]
                kw = 16 * u + A.F32_ORDER[j]
                assert picked == x[kept_cols[kw]]
                assert vals[0, u, r, j] == kept_vals[kw]


def test_f32_reasons():
    assert "multiple of 32" in A.f32_unavailable_reason(pack_blocked(sparse_weight(8, 48), 2, 4))
    assert "not float32" in A.f32_unavailable_reason(pack_blocked(sparse_weight(8, 64), 2, 4, value_dtype="bfloat16"))


# ---------------------------------------------------------------- INT8 / INT4 activations
@needs_avx2
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 128), (5, 192), (197, 576), (640, 320), (7, 1536)])
@pytest.mark.parametrize("threads", [1, 2])
def test_a8_matches_the_w8a8_reference(codec, group_size, rows, cols, threads):
    if group_size and cols % 256:
        group_size = None  # a 128-value scale group must cover whole 256-input blocks
    layer = pack_blocked(sparse_weight(rows, cols, rows), 2, 4, codec, group_size, "float32", True)
    assert A.a8_unavailable_reason(layer) is None
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1)) * 3
    y = A.a8_matmul(layer, x, threads)
    torch.testing.assert_close(y, V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_matmul(layer, x, path="avx2-a8"), y)


@needs_avxvnni
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("rows,cols", [(3, 128), (197, 576), (640, 320)])
def test_avxvnni_variant_matches_the_w8a8_reference(codec, rows, cols):
    layer = pack_blocked(sparse_weight(rows, cols, rows), 2, 4, codec, None, "float32", True)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(2))
    y = A.a8_matmul(layer, x, 2, vnni=True)
    torch.testing.assert_close(y, V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(cpu_matmul(layer, x, path="avxvnni-a8"), y)


@needs_avx2
def test_int8_extreme_codes_do_not_saturate():
    """Codes +-127 against activations +-127 everywhere: the int16 pair sums of vpmaddubsw
    reach 2 * 127 * 127 = 32258, just inside int16 - the sign trick keeps them exact."""
    rows, cols = 4, 256
    w = torch.zeros(rows, cols)
    w[:, 0::4] = 1.0
    w[:, 1::4] = -1.0
    w[1] *= -1
    layer = pack_blocked(w, 2, 4, "int8")
    x = torch.ones(1, cols)
    x[0, 1::4] = -1.0  # every kept pair: 127 * 127 + (-127) * (-127)
    y = A.a8_matmul(layer, x, 1)
    torch.testing.assert_close(y, V.reference_w8a8(layer, x), rtol=0, atol=1e-4)
    assert y[0, 0] == pytest.approx(128.0) and y[0, 1] == pytest.approx(-128.0)


def test_a8_plan_layout_emulated():
    """Emulate the index build (vpbroadcastq, vpsrlvd by (0,0,2,2,4,4,6,6), and 3, or 4 * group),
    the two vpshufb and the vpblendd in numpy: byte j must be the activation of the kept weight
    A8_ORDER[j], and the weight bytes must hold that weight's code."""
    rows, cols = 3, 128
    w = sparse_weight(rows, cols, 5)
    for codec in ("int8", "int4"):
        layer = pack_blocked(w, 2, 4, codec)
        plan = A.prepare_a8(layer)
        cb = A.chunk_bytes(codec)
        stream = plan["stream"].reshape(rows, cols // 64, cb)
        xu = (np.arange(cols) % 251).astype(np.uint8)
        pos = positions_of(layer).numpy().reshape(rows, cols // 64, 32)
        kept_cols = (np.arange(cols // 2) // 2 * 4).reshape(cols // 64, 32) + pos  # (rows, chunks, 32)
        for r in range(rows):
            for k in range(cols // 64):
                m = int(stream[r, k, :8].view(np.uint64)[0])
                dwords = [m & 0xFFFFFFFF, m >> 32] * 4
                ms = [(dwords[i] >> A._A8_SHIFTS[i]) for i in range(8)]
                idx = [((ms[j // 4] >> (8 * (j % 4))) & 3) | (4 * ((j % 8) // 2)) for j in range(32)]
                xa, xb = xu[64 * k: 64 * k + 32], xu[64 * k + 32: 64 * k + 64]
                shuf = lambda t, j: t[16 * (j // 16) + idx[j]]  # noqa: E731 - in-lane table
                sel = [shuf(xa, j) if (j % 16) < 8 else shuf(xb, j) for j in range(32)]
                expect = xu[kept_cols[r, k, A.A8_ORDER]]
                assert sel == list(expect)
        assert plan["npairs"] == 1 and plan["tail"] == 0


def test_a8_reasons_follow_the_vnni_arithmetic():
    w = sparse_weight(64, 576)
    assert "asymmetric" in A.a8_unavailable_reason(pack_blocked(w, 2, 4, "int8", None, "float32", False))
    assert "not a multiple of 64" in A.a8_unavailable_reason(pack_blocked(sparse_weight(64, 100), 2, 4, "int8"))
    assert "not a multiple of 256" in A.a8_unavailable_reason(pack_blocked(w, 2, 4, "int8", 32))


@needs_avx2
def test_nan_inputs_take_the_float_path():
    layer = pack_blocked(sparse_weight(64, 256), 2, 4, "int8")
    x = torch.randn(1, 256)
    x[0, 9] = float("nan")
    assert A.a8_matmul(layer, x, 1) is None
    req = Req(layer, "int8")
    choice = select(req, x, forced="avx2-a8")
    assert choice.fallback is not None and choice.fallback.kernel.act_quant == "none"
    assert torch.isnan(choice.run(req, x)).any()


# ---------------------------------------------------------------- machine code
@pytest.mark.parametrize("vnni", [False, True])
def test_machine_code_is_avx2_only(vnni):
    """Compiled for x86-64-v3 (+avxvnni): no zmm registers, no EVEX, no mask registers."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    def assembly(prefetch):
        ir = "\n".join(A._a8_ir(f"k_{c}", c, vnni, prefetch) for c in ("int8", "int4"))
        ir += "" if vnni else "\n" + A._f32_ir()
        module = llvm.parse_assembly(merge_declarations(ir))
        machine = llvm.Target.from_default_triple().create_target_machine(
            cpu=A.TARGET_CPU, features="+avxvnni" if vnni else "", opt=3)
        return machine.emit_assembly(module)

    asm = assembly(A.A8_PREFETCH_DEFAULT[vnni])
    assert "zmm" not in asm and "{evex}" not in asm and "%k1" not in asm
    for op in ["vpshufb", "vpsrlvd", "vpblendd"] + (["vpdpbusd"] if vnni else ["vpmaddubsw", "vpermilps"]):
        assert op in asm, op
    # the software prefetch is there exactly when asked for, at its distance from the chunk
    assert "prefetch" not in assembly(0)
    ahead = [line for line in assembly(4096).splitlines() if "prefetcht0" in line]
    assert len(ahead) == 2 and all(line.split()[1].startswith("4096(") for line in ahead), ahead


# ---------------------------------------------------------------- the registry under a cap
@needs_avx2
def test_cap_avx2_picks_the_avx2_rows_and_never_an_avx512_one(monkeypatch):
    f32 = SparseLinear.from_dense(sparse_weight(70, 256))
    q8 = SparseLinear.from_dense(sparse_weight(70, 256), codec="int8")
    q8.act_quant = "int8"
    q4 = SparseLinear.from_dense(sparse_weight(70, 256), codec="int4", group_size=128)
    q4.act_quant = "int8"
    general = SparseLinear.from_dense(torch.randn(70, 256), n=4, m=8, prune=True)
    asym = SparseLinear.from_dense(sparse_weight(70, 256), codec="int8", symmetric=False)
    asym.act_quant = "int8"
    x = torch.randn(1, 256)
    for cap in ("context", "env"):
        if cap == "env":
            monkeypatch.setenv("SPARSEMERGE_CPU_FEATURES", "avx2")
            ctx = cpu_level(None)
        else:
            ctx = cpu_level("avx2")
        with ctx:
            picks = {n: layer.kernel_choice for n, layer in
                     (("f32", f32), ("q8", q8), ("q4", q4), ("general", general), ("asym", asym))}
            assert picks["f32"][0] == "avx2-f32" and picks["q8"][0] == "avx2-a8" and picks["q4"][0] == "avx2-a8"
            assert picks["general"][0] == "numba-general"
            assert dict(picks["general"][1])["avx2-f32"] == "4:8 is not 2:4"
            assert picks["asym"][0] == "numba-gemv24"
            assert "asymmetric" in dict(picks["asym"][1])["avx2-a8"]
            for name, _ in picks.values():
                assert not any(f.startswith("avx512") for f in KERNELS.get(name).features)
            with torch.no_grad():
                torch.testing.assert_close(f32(x), reference_matmul(f32.layout, x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(q8(x), V.reference_w8a8(q8.layout, x), rtol=1e-5, atol=1e-4)
                torch.testing.assert_close(q4(x.reshape(1, 1, 256)).reshape(1, -1), V.reference_w8a8(q4.layout, x),
                                           rtol=1e-5, atol=1e-4)
        monkeypatch.delenv("SPARSEMERGE_CPU_FEATURES", raising=False)
    if not A.cpu_features_missing(True):
        with cpu_level("avxvnni"):
            assert q8.kernel_choice[0] == "avxvnni-a8"


@needs_avx2
def test_swapped_model_decodes_with_the_avx2_rows():
    from conftest import make_tiny_llama
    from sparsemerge.prune.api import prune_

    model = make_tiny_llama()
    prune_(model, {"pattern": "2:4", "progress": False})
    ids = torch.randint(0, 384, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    sparsify_(model, SparsifyConfig())
    with cpu_level("avx2"), torch.no_grad():
        out = model(ids).logits
        assert model.model.layers[0].mlp.down_proj.kernel_choice[0] == "avx2-f32"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize("vnni", [False, pytest.param(True, marks=needs_avxvnni)])
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_prefetch_distance_changes_no_number(vnni, codec):
    """The software prefetch ahead of each chunk only warms the cache: with no prefetch, a
    short and the default distance the kernels give the same float32 numbers."""
    rows, cols = 37, 640
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(2))
    layer = pack_blocked(sparse_weight(rows, cols, 5), 2, 4, codec, 128)
    plan = A.prepare_a8(layer)
    xu = np.full((plan["npairs"] + 1) * 128, 128, np.uint8)
    xs = np.empty(-(-cols // 256), np.float32)
    assert V._quantize(x.numpy()[0], xu, xs)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    outs = []
    for prefetch in (0, 64, A.A8_PREFETCH_BYTES):
        out = np.zeros(rows, np.float32)
        A.compiled_functions(vnni, prefetch)[codec](ptr(plan["stream"]), ptr(plan["scale"]), ptr(plan["corr"]), ptr(xu),
                                                    ptr(xs), ptr(out), 0, rows, plan["npairs"], plan["tail"],
                                                    plan["nscale"], plan["xb_per_q"])
        outs.append(out)
    torch.testing.assert_close(torch.from_numpy(outs[0])[None], V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@needs_avx2
def test_f32_prefetch_changes_no_number():
    from sparsemerge.kernels import cpu_gather

    rows, cols = 40, 2048 + 320  # two column blocks
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(3))
    layer = pack_blocked(sparse_weight(rows, cols, 6), 2, 4)
    plan = A.prepare_f32(layer)
    outs = [cpu_gather._row_runner(A.compiled_functions(False, f32_prefetch=d)["f32"])(
        plan["vals"], plan["meta"], x.numpy(), rows, plan["units"], 1) for d in (0, 1024)]
    torch.testing.assert_close(torch.from_numpy(outs[0]), reference_matmul(layer, x), rtol=1e-4, atol=1e-4)
    assert np.array_equal(outs[0], outs[1])
    assert "prefetch.p0(ptr %pf" not in A._f32_ir(0) and A._f32_ir(1024).count("call void @llvm.prefetch") == 5


@needs_avx2
def test_raw_functions_follow_the_documented_abi():
    """The decode runtime calls the ctypes pointers itself: call them the same way here."""
    from sparsemerge.kernels import cpu_gather

    fns = A.compiled_functions()
    assert set(fns) == {"f32", "int8", "int4"}
    assert len(fns["f32"].argtypes) == 9 and len(fns["int8"].argtypes) == 12
    rows, cols = 10, 320
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(4))
    layer = pack_blocked(sparse_weight(rows, cols, 9), 2, 4, "int4", None)
    plan = A.prepare_a8(layer)
    nxb = -(-cols // 256)
    xu = np.full((plan["npairs"] + 1) * 128, 128, np.uint8)
    xs = np.empty(nxb, np.float32)
    assert V._quantize(x.numpy()[0], xu, xs)
    out = np.zeros(rows, np.float32)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    fns["int4"](ptr(plan["stream"]), ptr(plan["scale"]), ptr(plan["corr"]), ptr(xu), ptr(xs), ptr(out), 0, rows,
                plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"])
    torch.testing.assert_close(torch.from_numpy(out)[None], V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    f32 = pack_blocked(sparse_weight(rows, cols, 9), 2, 4)
    plan = A.prepare_f32(f32)
    quads = -(-rows // 4)
    out = np.zeros(4 * quads, np.float32)
    fns["f32"](ptr(plan["vals"]), ptr(plan["meta"]), ptr(x.numpy()), ptr(out), 0, 4 * quads, plan["units"], quads,
               cpu_gather.BLOCK_UNITS)
    torch.testing.assert_close(torch.from_numpy(out[:rows])[None], reference_matmul(f32, x), rtol=1e-5, atol=1e-5)
    if not cpu_gather.cpu_features_missing():
        assert set(cpu_gather.compiled_functions()) == {"f32"}
    if not V.cpu_features_missing():
        assert set(V.compiled_functions()) == {"int8", "int4"} and len(V.compiled_functions()["int8"].argtypes) == 12
