"""2:4 + INT8/INT4 at batch 1 with AVX-512 VBMI2 + VNNI: expand, then integer dot products.

The blend kernels of ``kernels/cpu.py`` spend ~15 vector instructions per 32 kept weights on
picking inputs and converting codes; at batch 1 they are instruction-bound (INT8 read at about
a third of the memory bandwidth). This kernel instead works row by row on 64 input columns at a
time, the way the hardware wants it:

* ``vpexpandb`` (``llvm.masked.expandload``) scatters the 32 kept INT8 weights of a row chunk
  to their 64 column lanes, driven by the chunk's 64-bit keep-mask (one bit per weight - the
  same 4 bits per 2:4 group as the blocked layout); dropped lanes get the value 128;
* ``vpdpbusd`` multiplies the 64 unsigned bytes with 64 signed INT8 activations and adds them
  in 16 int32 lanes - one instruction for 64 multiply-adds.

Weights are stored as unsigned "offset codes" ``u = c + 128`` (``c`` the signed code; a dropped
weight is ``u = 128``, i.e. 0), so ``sum_j u_j x_j = sum_j c_j x_j + 128 sum_j x_j`` and the
second term, which does not depend on the row, is removed per activation block. INT4 codes
(unsigned ``0..15`` with zero point 8) are kept as nibbles, 16 bytes per chunk (byte ``i`` =
value ``i`` | value ``i+16`` << 4), and widened in registers before the expand.

Activations are quantized per call (dynamic, symmetric, per block of 256 inputs, like
llama.cpp's Q8 activations): ``x ~ xs_b * xq`` with ``xq = round(x / xs_b)``,
``xs_b = max|x_b| / 127``. So the result is ``sum_b s_rb * (dot(u, xq)_b - 128 sum xq_b)`` with
``s_rb = weight scale * xs_b`` - exact integer arithmetic inside a block (the offset term is
removed per int32 lane before any rounding), float across blocks.
This adds the activation rounding error (relative ~0.4% per block) to the weight codec's; it is
therefore opt-in (``SparsifyConfig.act_quant="int8"``, ``sparsemerge run/bench --act-quant int8``);
:func:`reference_w8a8` is the pure-torch statement of the same arithmetic that tests compare
against.

The kernel is LLVM IR compiled by llvmlite (numba's own LLVM; no C toolchain), called from a
numba ``prange`` over row ranges. :func:`unavailable_reason` says why it cannot run (CPU
without AVX-512 VBMI2/VNNI, layer not 2:4, columns not a multiple of 64, asymmetric codes...).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import numpy as np
import torch
from numba import njit

from sparsemerge.kernels.layout import BlockedNM, positions_of, unblock

CHUNK = 64  # input columns per expand + dot product
XBLOCK = 256  # input columns per activation scale (4 chunks)
CHUNKS_PER_XBLOCK = XBLOCK // CHUNK
REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512vbmi2", "avx512vnni")

_SPLAT128 = "<" + ", ".join(["i8 -128"] * 64) + ">"
_LOW_NIBBLE = "<" + ", ".join(["i8 15"] * 16) + ">"
_FOUR = "<" + ", ".join(["i8 4"] * 16) + ">"
_ADD120 = "<" + ", ".join(["i8 120"] * 32) + ">"
_CONCAT = "<" + ", ".join(f"i32 {i}" for i in range(32)) + ">"
_WIDEN = "<" + ", ".join([f"i32 {i}" for i in range(32)] + ["i32 poison"] * 32) + ">"

# Loads the expanded offset codes of chunk %c{S} of the row at %vrow into %w{S} (<64 x i8>),
# with the chunk's keep-mask %mk{S}.
_LOAD_INT8 = f"""
  %voff{{S}} = mul i64 %c{{S}}, 32
  %vp{{S}} = getelementptr i8, ptr %vrow, i64 %voff{{S}}
  %w{{S}} = call <64 x i8> @llvm.masked.expandload.v64i8(ptr %vp{{S}}, <64 x i1> %mk{{S}}, <64 x i8> {_SPLAT128})
"""
_LOAD_INT4 = f"""
  %voff{{S}} = mul i64 %c{{S}}, 16
  %vp{{S}} = getelementptr i8, ptr %vrow, i64 %voff{{S}}
  %packed{{S}} = load <16 x i8>, ptr %vp{{S}}, align 1
  %lo{{S}} = and <16 x i8> %packed{{S}}, {_LOW_NIBBLE}
  %hi{{S}} = lshr <16 x i8> %packed{{S}}, {_FOUR}
  %codes{{S}} = shufflevector <16 x i8> %lo{{S}}, <16 x i8> %hi{{S}}, <32 x i32> {_CONCAT}
  %offset{{S}} = add <32 x i8> %codes{{S}}, {_ADD120}
  %wide{{S}} = shufflevector <32 x i8> %offset{{S}}, <32 x i8> poison, <64 x i32> {_WIDEN}
  %w{{S}} = call <64 x i8> @llvm.x86.avx512.mask.expand.v64i8(<64 x i8> %wide{{S}}, <64 x i8> {_SPLAT128}, <64 x i1> %mk{{S}})
"""
# One chunk: keep-mask, expanded weights, activations, %d{S} = vpdpbusd(%a{S}, w, x).
_CHUNK = """
  %mp{S} = getelementptr i64, ptr %mrow, i64 %c{S}
  %m{S} = load i64, ptr %mp{S}, align 8
  %mk{S} = bitcast i64 %m{S} to <64 x i1>
LOAD_VALUES
  %xoff{S} = mul i64 %c{S}, 64
  %xp{S} = getelementptr i8, ptr %xq, i64 %xoff{S}
  %x{S} = load <64 x i8>, ptr %xp{S}, align 1
  %d{S} = call <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32> %a{S}, <64 x i8> %w{S}, <64 x i8> %x{S})
"""
# A full block of 4 chunks: four independent dot products (a chain through one accumulator
# would bound the loop by vpdpbusd's latency), summed at the end.
_FULL_BLOCK_SUM = """
  %s01 = add <16 x i32> %d0f, %d1f
  %s23 = add <16 x i32> %d2f, %d3f
  %accfull = add <16 x i32> %s01, %s23
  br label %xbend
"""

_IR = """
declare <64 x i8> @llvm.masked.expandload.v64i8(ptr, <64 x i1>, <64 x i8>)
declare <64 x i8> @llvm.x86.avx512.mask.expand.v64i8(<64 x i8>, <64 x i8>, <64 x i1>)
declare <16 x i32> @llvm.x86.avx512.vpdpbusd.512(<16 x i32>, <64 x i8>, <64 x i8>)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)

; out[r] = sum_b s(r,b) * (dot(u_r, xq)_b - c128[b]),  s(r,b) = wscale[r*nscale + b/xb_per_q] * xs[b]
; c128[b, k] = 128 * (the activations lane k of vpdpbusd saw in block b): subtracted lane by lane in
; int32 before the float conversion, so the large offset terms cancel exactly
define void @NAME(ptr %vals, ptr %masks, ptr %wscale, ptr %xq, ptr %xs, ptr %c128, ptr %out,
                  i64 %r0, i64 %r1, i64 %chunks, i64 %nscale, i64 %xb_per_q) {
entry:
  %nxb0 = add i64 %chunks, 3
  %nxb = udiv i64 %nxb0, 4
  br label %rowloop
rowloop:
  %r = phi i64 [ %r0, %entry ], [ %rnext, %rowend ]
  %rdone = icmp uge i64 %r, %r1
  br i1 %rdone, label %exit, label %rowbody
rowbody:
  %rowchunks = mul i64 %r, %chunks
  %vrowb = mul i64 %rowchunks, BYTES_PER_CHUNK
  %vrow = getelementptr i8, ptr %vals, i64 %vrowb
  %mrow = getelementptr i64, ptr %masks, i64 %rowchunks
  %srowi = mul i64 %r, %nscale
  %srow = getelementptr float, ptr %wscale, i64 %srowi
  br label %xbloop
xbloop:
  %xb = phi i64 [ 0, %rowbody ], [ %xbnext, %xbend ]
  %accf = phi <16 x float> [ zeroinitializer, %rowbody ], [ %accf2, %xbend ]
  %xbdone = icmp uge i64 %xb, %nxb
  br i1 %xbdone, label %rowend, label %xbbody
xbbody:
  %c0 = mul i64 %xb, 4
  %c1a = add i64 %c0, 4
  %full = icmp ule i64 %c1a, %chunks
  br i1 %full, label %fullblock, label %chloop
fullblock:
FULL_BLOCK
chloop:
  %c = phi i64 [ %c0, %xbbody ], [ %cnext, %chbody ]
  %a = phi <16 x i32> [ zeroinitializer, %xbbody ], [ %d, %chbody ]
  %cdone = icmp uge i64 %c, %chunks
  br i1 %cdone, label %xbend, label %chbody
chbody:
ONE_CHUNK
  %cnext = add i64 %c, 1
  br label %chloop
xbend:
  %acci = phi <16 x i32> [ %accfull, %fullblock ], [ %a, %chloop ]
  %q = udiv i64 %xb, %xb_per_q
  %wsp = getelementptr float, ptr %srow, i64 %q
  %ws = load float, ptr %wsp
  %xsp = getelementptr float, ptr %xs, i64 %xb
  %xsv = load float, ptr %xsp
  %s = fmul float %ws, %xsv
  %sv0 = insertelement <16 x float> poison, float %s, i32 0
  %sv = shufflevector <16 x float> %sv0, <16 x float> poison, <16 x i32> zeroinitializer
  %ccoff = mul i64 %xb, 16
  %ccp = getelementptr i32, ptr %c128, i64 %ccoff
  %ccv = load <16 x i32>, ptr %ccp, align 4
  %accic = sub <16 x i32> %acci, %ccv
  %accfl = sitofp <16 x i32> %accic to <16 x float>
  %accf2 = call <16 x float> @llvm.fma.v16f32(<16 x float> %accfl, <16 x float> %sv, <16 x float> %accf)
  %xbnext = add i64 %xb, 1
  br label %xbloop
rowend:
  %tot = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> %accf)
  %op = getelementptr float, ptr %out, i64 %r
  store float %tot, ptr %op
  %rnext = add i64 %r, 1
  br label %rowloop
exit:
  ret void
}
"""


def _kernel_ir(name: str, codec: str) -> str:
    chunk = _CHUNK.replace("LOAD_VALUES", _LOAD_INT8 if codec == "int8" else _LOAD_INT4)
    full = ""
    for k in range(4):
        full += f"  %c{k}f = add i64 %c0, {k}\n" + chunk.replace("%a{S}", "zeroinitializer").replace("{S}", f"{k}f")
    full += _FULL_BLOCK_SUM
    one = chunk.replace("{S}", "")
    return (_IR.replace("NAME", name).replace("BYTES_PER_CHUNK", "32" if codec == "int8" else "16")
            .replace("FULL_BLOCK", full).replace("ONE_CHUNK", one))


def cpu_features_missing() -> list[str]:
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    return [f for f in REQUIRED_FEATURES if not features.get(f, False)]


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[Optional[dict], Optional[str]]:
    """({codec: callable(...)}, None) or (None, reason). Compiled once per process."""
    try:
        missing = cpu_features_missing()
        if missing:
            return None, f"the CPU lacks {', '.join(missing)}"
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        ir = "\n".join(_kernel_ir(f"gemv24_{c}_a8", c) for c in ("int8", "int4"))
        # the declarations repeat per kernel: keep the first copy of each
        seen, lines = set(), []
        for line in ir.splitlines():
            if line.startswith("declare"):
                if line in seen:
                    continue
                seen.add(line)
            lines.append(line)
        module = llvm.parse_assembly("\n".join(lines))
        module.verify()
        target = llvm.Target.from_default_triple()
        machine = target.create_target_machine(
            cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=3
        )
        engine = llvm.create_mcjit_compiler(module, machine)
        engine.finalize_object()
        proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 7), *([ctypes.c_int64] * 5))
        fns = {c: proto(engine.get_function_address(f"gemv24_{c}_a8")) for c in ("int8", "int4")}
        _ENGINES.append(engine)  # keep the machine code alive
        return {c: _row_runner(fn) for c, fn in fns.items()}, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the VNNI kernel: {exc}"


_ENGINES: list = []


@njit(cache=True)
def _quantize(x, xq, xs, c128):  # pragma: no cover - jitted
    """Symmetric INT8 per block of 256: ``xs_b = max|x_b| / 127`` (1 for an all-zero block),
    ``xq = rint(x / xs_b)``; ``c128[b, k] = 128 *`` the sum of the ``xq`` that lane ``k`` of
    ``vpdpbusd`` adds in block ``b`` (bytes ``4k..4k+3`` of each 64-byte chunk)."""
    cols = x.shape[0]
    for b in range(xs.shape[0]):
        j0 = b * XBLOCK
        j1 = min(cols, j0 + XBLOCK)
        amax = np.float32(0.0)
        for j in range(j0, j1):
            amax = max(amax, abs(x[j]))
        step = amax / np.float32(127.0) if amax > 0 else np.float32(1.0)
        xs[b] = step
        for k in range(16):
            c128[b, k] = 0
        for j in range(j0, j1):
            q = min(max(np.rint(x[j] / step), np.float32(-127.0)), np.float32(127.0))
            xq[j] = np.int8(q)
            c128[b, (j % CHUNK) // 4] += np.int32(q)
        for k in range(16):
            c128[b, k] *= 128


def _row_runner(fn):
    """One numba call per matmul: quantize ``x``, then split the rows over numba's threads and
    call ``fn`` on each range (a ctypes function pointer, called without the GIL). Python-side
    work per call matters: a decoding step calls ~200 small layers."""
    import numba

    @numba.njit(parallel=True)
    def run(vals, masks, wscale, x, out, rows, chunks, nscale, xb_per_q, tasks):  # pragma: no cover - jitted
        nxb = (chunks + CHUNKS_PER_XBLOCK - 1) // CHUNKS_PER_XBLOCK
        xq = np.empty(chunks * CHUNK, np.int8)
        xs = np.empty(nxb, np.float32)
        c128 = np.empty((nxb, 16), np.int32)
        _quantize(x, xq, xs, c128)
        step = (rows + tasks - 1) // tasks
        for t in numba.prange(tasks):
            r0 = t * step
            r1 = min(rows, r0 + step)
            if r0 < r1:
                fn(vals.ctypes.data, masks.ctypes.data, wscale.ctypes.data, xq.ctypes.data, xs.ctypes.data,
                   c128.ctypes.data, out.ctypes.data, r0, r1, chunks, nscale, xb_per_q)

    return run


def unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when this kernel can run ``layer`` at batch 1; else why not."""
    if not layer.is_24:
        return f"{layer.n}:{layer.m} is not 2:4"
    if layer.codec == "int8":
        if layer.zero is not None:
            return "asymmetric int8 codes (zero points) are not supported"
    elif layer.codec == "int4":
        if layer.zero is None or not bool((layer.zero == 8).all()):
            return "int4 codes need the symmetric zero point 8"
    else:
        return f"codec {layer.codec!r} is not int8/int4"
    if layer.cols % CHUNK:
        return f"input features {layer.cols} are not a multiple of {CHUNK}"
    gps = layer.groups_per_scale
    if layer.group_size is not None and (4 * gps) % XBLOCK:
        return f"a scale group covers {4 * gps} inputs, not a multiple of {XBLOCK}"
    fns, reason = _compiled()
    return reason


def prepare(layer: BlockedNM) -> dict:
    """The row-major arrays the kernel reads (cached in ``layer.extra``)."""
    plan = layer.extra.get("vnni_plan")
    if plan is not None:
        return plan
    rows, cols = layer.rows, layer.cols
    pos = positions_of(layer).cpu()  # (rows, G, 2), p0 < p1
    keep = torch.zeros(rows, layer.groups, 4, dtype=torch.bool)
    keep.scatter_(2, pos, True)
    masks = np.packbits(keep.reshape(rows, cols).numpy(), axis=1, bitorder="little").view(np.uint64)
    v = unblock(layer.values, rows).cpu()
    chunks = cols // CHUNK
    if layer.codec == "int8":
        vals = (v.reshape(rows, -1).to(torch.int16) + 128).to(torch.uint8)  # offset codes, column order
    else:
        codes = torch.stack([v & 15, v >> 4], -1).reshape(rows, chunks, 32)  # unsigned, column order
        vals = (codes[..., :16] | (codes[..., 16:] << 4)).to(torch.uint8)
    scale = unblock(layer.scale, rows).cpu().float().contiguous()
    nxb = -(-chunks // CHUNKS_PER_XBLOCK)
    xb_per_q = nxb if layer.group_size is None else (4 * layer.groups_per_scale) // XBLOCK
    plan = {
        "vals": np.ascontiguousarray(vals.reshape(rows, -1).numpy()),
        "masks": np.ascontiguousarray(masks),
        "scale": np.ascontiguousarray(scale.numpy()),
        "chunks": chunks,
        "nscale": scale.shape[1],
        "xb_per_q": max(1, xb_per_q),
        "nbytes": vals.numel() + masks.nbytes + scale.numel() * 4,
    }
    layer.extra["vnni_plan"] = plan
    return plan


def quantize_activations(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xq int8 (cols,), xs float32 (nxb,), c128 int32 (nxb, 16))`` for one input row, as the
    kernel computes them (:func:`_quantize`)."""
    xn = np.ascontiguousarray(x.reshape(-1).detach().float().numpy())
    cols = xn.shape[0]
    nxb = -(-cols // XBLOCK)
    xq = np.zeros(nxb * XBLOCK, np.int8)
    xs = np.empty(nxb, np.float32)
    c128 = np.empty((nxb, 16), np.int32)
    _quantize(xn, xq, xs, c128)
    return xq[:cols], xs, c128


def fake_quant_activations(x: torch.Tensor) -> torch.Tensor:
    """``x (..., cols)`` rounded as the kernel sees it (every row on its own, per block of 256:
    ``xs_b * round(x / xs_b)``), in float - to evaluate a whole sequence at once with the
    decoding kernel's activation error (e.g. perplexity)."""
    cols = x.shape[-1]
    nxb = -(-cols // XBLOCK)
    rows = x.reshape(-1, cols).float()
    pad = torch.nn.functional.pad(rows, (0, nxb * XBLOCK - cols)).reshape(rows.shape[0], nxb, XBLOCK)
    amax = pad.abs().amax(dim=2, keepdim=True)
    xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    deq = torch.round(pad / xs).clamp_(-127, 127) * xs
    return deq.reshape(rows.shape[0], -1)[:, :cols].reshape(x.shape).to(x.dtype)


def fake_quant_inputs(model: torch.nn.Module, names: list[str]) -> list:
    """Forward pre-hooks that pass the inputs of the modules ``names`` through
    :func:`fake_quant_activations`; returns the handles (``h.remove()`` to undo)."""
    return [
        model.get_submodule(n).register_forward_pre_hook(lambda m, args: (fake_quant_activations(args[0]), *args[1:]))
        for n in names
    ]


def vnni_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x (1, cols)`` float32 -> ``(1, rows)`` with the VNNI kernel."""
    fns, reason = _compiled()
    if fns is None:
        raise RuntimeError(reason)
    plan = layer.extra.get("vnni_plan") or prepare(layer)
    out = np.empty(layer.rows, np.float32)
    tasks = threads if layer.rows >= 256 * threads else 1
    fns[layer.codec](plan["vals"], plan["masks"], plan["scale"], x.reshape(-1).numpy(), out, layer.rows,
                     plan["chunks"], plan["nscale"], plan["xb_per_q"], tasks)
    return torch.from_numpy(out).unsqueeze(0)


def reference_w8a8(layer: BlockedNM, x: torch.Tensor) -> torch.Tensor:
    """Pure torch: the same arithmetic as the kernel (activation blocks of 256, integer dots),
    in float64 - what tests compare the kernel with."""
    from sparsemerge.kernels.layout import to_dense

    xq, xs, _ = quantize_activations(x)
    x_hat = torch.from_numpy(xq.astype(np.float64)) * torch.from_numpy(xs.astype(np.float64)).repeat_interleave(XBLOCK)[: layer.cols]
    return (to_dense(layer).double() @ x_hat).float().unsqueeze(0)
