"""The AArch64 NEON / dotprod kernels (kernels/cpu_neon.py), on an x86 machine: the IR is
compiled to an AArch64 object by llvmlite, linked with tests/kernels/neon_harness.c by
aarch64-linux-gnu-gcc and run under qemu-aarch64, and the outputs are compared with the
pure-torch references. The slot layouts are also emulated in numpy (those tests need none of
the tools). Skips, saying which, where the cross compiler, qemu-aarch64 or llvmlite's AArch64
target is missing (Debian: apt-get install qemu-user gcc-aarch64-linux-gnu; .ci/run does)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemerge.kernels import KERNELS, cpu_gather
from sparsemerge.kernels import cpu_neon as N
from sparsemerge.kernels import cpu_vnni as V
from sparsemerge.kernels.backends import rows as registry_rows
from sparsemerge.kernels.layout import pack_blocked, positions_of
from sparsemerge.kernels.reference import reference_matmul
from sparsemerge.masks import nm_mask

HARNESS = Path(__file__).with_name("neon_harness.c")
CC = "aarch64-linux-gnu-gcc"
QEMU = next((q for q in ("qemu-aarch64", "qemu-aarch64-static") if shutil.which(q)), None)
INSTALL = "apt-get install qemu-user gcc-aarch64-linux-gnu"


def _missing_tools() -> str | None:
    reason = N.aarch64_unavailable_reason()
    if reason:
        return reason
    if shutil.which(CC) is None:
        return f"no AArch64 cross compiler ({CC}; {INSTALL})"
    if QEMU is None:
        return f"no qemu-aarch64 to run AArch64 code ({INSTALL})"
    return None


needs_llvm_aarch64 = pytest.mark.skipif(bool(N.aarch64_unavailable_reason()),
                                        reason=str(N.aarch64_unavailable_reason()))
needs_emulation = pytest.mark.skipif(bool(_missing_tools()), reason=str(_missing_tools()))


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The harness linked statically with the kernels' object file."""
    d = tmp_path_factory.mktemp("neon")
    (d / "kernels.o").write_bytes(N.emit_object())
    exe = d / "neon_harness"
    subprocess.run([CC, "-O1", "-static", "-o", str(exe), str(HARNESS), str(d / "kernels.o")],
                   check=True, capture_output=True, text=True)
    return exe


def run_harness(exe: Path, kind: int, arrays: list[np.ndarray], calls: list[tuple[int, ...]]) -> np.ndarray:
    """Run the kernel ``kind`` (0 f32, 1 int8, 2 int4) under qemu once per argument tuple in
    ``calls`` on ``arrays`` (the last one is the output, returned after all calls)."""
    parts = [np.array([kind, len(arrays)], np.int64).tobytes()]
    for a in arrays:
        b = np.ascontiguousarray(a).tobytes()
        parts += [np.array([len(b)], np.int64).tobytes(), b]
    parts.append(np.array([len(calls), len(calls[0])], np.int64).tobytes())
    parts += [np.array(c, np.int64).tobytes() for c in calls]
    src, dst = exe.parent / f"in{kind}.bin", exe.parent / f"out{kind}.bin"
    src.write_bytes(b"".join(parts))
    proc = subprocess.run([QEMU, str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return np.frombuffer(dst.read_bytes(), arrays[-1].dtype).reshape(arrays[-1].shape)


def sparse_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), 2, 4)


def splits(rows: int, parts: int, step: int = 1) -> list[tuple[int, int]]:
    """``parts`` row ranges covering ``0..rows`` (bounds multiples of ``step``; some may be empty)."""
    per = -(-rows // (parts * step)) * step
    return [(min(rows, i * per), min(rows, (i + 1) * per)) for i in range(parts)]


# ---------------------------------------------------------------- float32 under qemu
@needs_emulation
@pytest.mark.parametrize("rows,cols,parts", [(1, 32, 1), (3, 64, 1), (5, 96, 2), (13, 4192, 3), (198, 576, 2),
                                             (67, 2080, 4)])
def test_f32_under_qemu_matches_the_reference(harness, rows, cols, parts):
    """Rows not in 4s (padded quads), a column count with a short last block (4192 = 2 blocks of
    2048 + 96), and the rows split over calls as the numba runner does."""
    w = sparse_weight(rows, cols, rows + cols)
    w[rows // 2] = 0  # an empty row
    layer = pack_blocked(w, 2, 4)
    plan = N.prepare_f32(layer)
    quads = -(-rows // 4)
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(cols))
    out = np.full(4 * quads, np.nan, np.float32)
    calls = [(r0, r1, plan["units"], quads, cpu_gather.BLOCK_UNITS) for r0, r1 in splits(4 * quads, parts, 4)]
    y = run_harness(harness, 0, [plan["vals"], plan["meta"], x.numpy()[0], out], calls)
    # float32 sums in another order: ~1e-5 relative over 1000 terms; a wrong gather is off by O(1)
    torch.testing.assert_close(torch.from_numpy(y[:rows].copy())[None], reference_matmul(layer, x),
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- INT8 / INT4 under qemu
def _a8_run(harness, layer, x: torch.Tensor, parts: int) -> np.ndarray:
    plan = N.prepare_a8(layer)
    nxb = -(-layer.cols // 256)
    xu = np.full((plan["npairs"] + 1) * 128, 128, np.uint8)  # as cpu_vnni's row runner allocates it
    xs = np.empty(nxb, np.float32)
    assert V._quantize(np.ascontiguousarray(x.numpy()[0]), xu, xs)
    out = np.full(layer.rows, np.nan, np.float32)
    calls = [(r0, r1, plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"])
             for r0, r1 in splits(layer.rows, parts)]
    kind = 1 if layer.codec == "int8" else 2
    return run_harness(harness, kind, [plan["stream"], plan["scale"], plan["corr"], xu, xs, out], calls)


@needs_emulation
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("rows,cols,parts", [(1, 64, 1), (3, 128, 1), (5, 192, 2), (197, 576, 3), (7, 1536, 2),
                                             (30, 1344, 4)])
def test_a8_under_qemu_matches_the_w8a8_reference(harness, codec, group_size, rows, cols, parts):
    """Tail chunks (cols % 128 = 64), last blocks of 1-3 chunks, per-channel and 128-value
    scale groups, an all-zero row (scale 0) and the rows split over calls."""
    if group_size and cols % 256:
        group_size = None  # a 128-value scale group must cover whole 256-input blocks
    w = sparse_weight(rows, cols, rows)
    w[rows - 1] = 0
    layer = pack_blocked(w, 2, 4, codec, group_size, "float32", True)
    assert N.prepare_a8(layer)["tail"] == (cols % 128) // 64
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1)) * 3
    y = _a8_run(harness, layer, x, parts)
    torch.testing.assert_close(torch.from_numpy(y.copy())[None], V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)


@needs_emulation
def test_extreme_codes_are_exact_under_qemu(harness):
    """INT8 codes +-127 against activations +-127 (sdot has no saturation), INT4 codes +-7
    against +-127 (the 16 c bytes reach -112..112): results exact."""
    rows, cols = 4, 256
    w = torch.zeros(rows, cols)
    w[:, 0::4] = 1.0
    w[:, 1::4] = -1.0
    w[1] *= -1
    x = torch.ones(1, cols)
    x[0, 1::4] = -1.0  # every kept pair: 127 * 127 + (-127) * (-127)
    for codec in ("int8", "int4"):
        layer = pack_blocked(w, 2, 4, codec)
        y = torch.from_numpy(_a8_run(harness, layer, x, 1).copy())[None]
        torch.testing.assert_close(y, V.reference_w8a8(layer, x), rtol=0, atol=1e-4)
        assert y[0, 0] == pytest.approx(128.0) and y[0, 1] == pytest.approx(-128.0)


# ---------------------------------------------------------------- the layouts, emulated in numpy
def test_f32_index_build_emulated():
    """ushl .4s by F32_SHIFTS, and 0x0c, tbl by F32_SELECT[i], orr F32_OFFSET, then the
    two-register tbl over the unit's inputs 8i..8i+7 (as bytes): lane t must be the input of
    kept weight 4i + t, and the plan's weight the kept weight."""
    rows, cols = 4, 64
    w = sparse_weight(rows, cols, 3)
    plan = N.prepare_f32(pack_blocked(w, 2, 4))
    x = (np.arange(cols, dtype=np.float32) + 1).view(np.uint8)
    meta = plan["meta"].reshape(2, 4)  # (units, rows of the quad)
    vals = plan["vals"].reshape(2, 4, 16)
    for r in range(rows):
        kept_cols = np.nonzero(w[r].numpy())[0]
        for u in range(2):
            word = int(meta[u, r])
            lanes = [(word << s) & 0xFFFFFFFF if s >= 0 else word >> -s for s in N.F32_SHIFTS]
            mc = np.array(lanes, np.uint32).view(np.uint8) & 12
            for i in range(4):
                idx = mc[N.F32_SELECT[i]] | np.array(N.F32_OFFSET, np.uint8)
                table = x[4 * (32 * u + 8 * i): 4 * (32 * u + 8 * i + 8)]
                got = table[idx].view(np.float32)
                want = kept_cols[16 * u + 4 * i: 16 * u + 4 * i + 4] + 1
                assert list(got) == list(want.astype(np.float32))
                assert list(vals[u, r, 4 * i: 4 * i + 4]) == list(w[r].numpy()[want - 1])


def test_a8_index_build_emulated():
    """dup + ushl .4s by A8_SHIFTS, sli #2 of A8_GROUP, tbl over the half's 32 activations:
    byte j must be the activation of kept weight j of the half; the codes in column order."""
    rows, cols = 3, 192
    w = sparse_weight(rows, cols, 5)
    for codec in ("int8", "int4"):
        layer = pack_blocked(w, 2, 4, codec)
        plan = N.prepare_a8(layer)
        cb = N.chunk_bytes(codec)
        stream = plan["stream"].reshape(rows, cols // 64, cb)
        q = (np.arange(cols) % 251).astype(np.uint8)
        pos = positions_of(layer).numpy().reshape(rows, cols // 64, 32)
        kept_cols = (np.arange(32) // 2 * 4)[None, None] + pos + (64 * np.arange(cols // 64))[None, :, None]
        for r in range(rows):
            for k in range(cols // 64):
                for h in range(2):
                    word = int(stream[r, k, 4 * h: 4 * h + 4].view(np.uint32)[0])
                    mb = np.array([word >> -s for s in N.A8_SHIFTS], np.uint32).view(np.uint8)
                    idx = (mb & 3) | (np.array(N.A8_GROUP, np.uint8) << 2)  # sli #2
                    got = q[64 * k + 32 * h: 64 * k + 32 * h + 32][idx]
                    assert list(got) == list(q[kept_cols[r, k, 16 * h: 16 * h + 16]])
        assert plan["npairs"] == 1 and plan["tail"] == 1 and not plan["corr"].any()


def test_a8_codes_emulated():
    """INT4 nibbles: shl 4 and and 0xf0 of byte i give 16 * (codes i and 16 + i) as signed bytes."""
    rows, cols = 2, 128
    layer = pack_blocked(sparse_weight(rows, cols, 7), 2, 4, "int4")
    plan = N.prepare_a8(layer)
    stream = plan["stream"].reshape(rows, 2, 24)
    from sparsemerge.kernels.layout import unblock

    v = unblock(layer.values, rows).to(torch.int16)
    c = (torch.stack([v & 15, v >> 4], -1).reshape(rows, -1) - 8).numpy().reshape(rows, 2, 32)
    b = stream[:, :, 8:]
    low = (b << 4).astype(np.uint8).view(np.int8).astype(np.int16)
    high = (b & 0xF0).astype(np.uint8).view(np.int8).astype(np.int16)
    assert (low == 16 * c[:, :, :16]).all() and (high == 16 * c[:, :, 16:]).all()
    i8 = pack_blocked(sparse_weight(rows, cols, 7), 2, 4, "int8")
    s8 = N.prepare_a8(i8)["stream"].reshape(rows, 2, 40)[:, :, 8:].view(np.int8)
    assert (s8 == unblock(i8.values, rows).numpy().reshape(rows, 2, 32)).all()


def test_prepare_a8_rejects_what_the_arithmetic_cannot_carry():
    w = sparse_weight(8, 256)
    with pytest.raises(ValueError, match="asymmetric"):
        N.prepare_a8(pack_blocked(w, 2, 4, "int8", None, "float32", False))
    with pytest.raises(ValueError, match="not a multiple of 256"):
        N.prepare_a8(pack_blocked(w, 2, 4, "int8", 32))


# ---------------------------------------------------------------- machine code and the registry
@needs_llvm_aarch64
def test_inner_loops_are_the_counted_instructions():
    """The estimate in the module docstring counts these: per chunk 2 ushl, 2 sli, 2 tbl,
    2 sdot (+ shl, and for INT4); per quad-unit of float32, 4 rows x (ushl, and, 8 tbl,
    4 orr, 4 fmla)."""
    asm = N.emit_assembly()
    assert "sdot" in asm and "zmm" not in asm and "ymm" not in asm
    counts = N.loop_instruction_counts(asm)
    for name in N.A8_NAMES.values():
        c = counts[name]
        assert (c.get("ushl"), c.get("sli"), c.get("tbl"), c.get("sdot")) == (2, 2, 2, 2), (name, c)
    assert counts["gemv24_int4_neon"].get("shl") == 1 and counts["gemv24_int4_neon"].get("and") == 1
    f = counts[N.F32_NAME]
    assert (f.get("ushl"), f.get("and"), f.get("tbl"), f.get("orr"), f.get("fmla")) == (4, 4, 32, 16, 16), f


def test_registry_rows_need_neon_and_are_never_chosen_here():
    f32, a8 = KERNELS.get("neon-f32"), KERNELS.get("neon-dotprod-a8")
    assert f32.features == ("neon",) and a8.features == ("neon", "dotprod")
    assert a8.act_quant == "int8" and {k.name for k in registry_rows()} >= {"neon-f32", "neon-dotprod-a8"}
    from sparsemerge.kernels.features import host_features

    if "neon" not in host_features():
        layer = pack_blocked(sparse_weight(8, 64), 2, 4)
        assert "lacks neon" in f32.supports(layer, torch.randn(1, 64))
        assert N.f32_unavailable_reason(layer) is not None


def test_native_path_says_why_it_cannot_run_on_other_hosts():
    import platform

    if platform.machine().lower() in ("aarch64", "arm64"):
        pytest.skip("an AArch64 host runs the kernels natively")
    f32 = pack_blocked(sparse_weight(8, 64), 2, 4)
    q8 = pack_blocked(sparse_weight(8, 256), 2, 4, "int8")
    assert "not an AArch64 host" in N.f32_unavailable_reason(f32)
    assert "not an AArch64 host" in N.a8_unavailable_reason(q8)
    assert "48 are not a multiple of 32" in N.f32_unavailable_reason(pack_blocked(sparse_weight(8, 48), 2, 4))
    with pytest.raises(RuntimeError, match="not an AArch64 host"):
        N.compiled_functions()
