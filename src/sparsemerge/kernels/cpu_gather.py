"""2:4 float32 at batch 1 with AVX-512 VBMI: gather the inputs the kept weights need.

A batch-1 product reads every kept weight once, so it is bound by memory bandwidth - if the
instructions keep up. The blocked kernels of ``kernels/cpu.py`` (16 rows per vector, inputs
chosen by compare-and-blend) spend ~6 vector instructions per 16 kept weights and stream
~21 GB/s on one Zen 4 core, below the ~25 GB/s of a dense GEMV - so 2:4 float32, which
reads 34 of dense's 64 MiB for 4096 x 4096, stayed at 1.6x. This kernel goes row by row,
32 input columns (16 kept weights) at a time:

* metadata: the 2-bit in-group position ``p_j`` of each kept weight, 32 bits per 32 columns
  (4 bits per 2:4 group, as in the blocked layout). A broadcast load and one
  ``vpmultishiftqb`` put ``p_j`` into the low byte of 32-bit lane ``j``; an and/or
  (``vpternlogd``) forms the index ``4 * (j // 2) + p_j``;
* ``vpermi2ps`` picks those 16 of the 32 inputs (a two-register table);
* one ``vfmadd231ps`` with the 16 kept weights straight from memory.

Rows go in quads stored interleaved (one weight stream; the 32 inputs are loaded once per
four rows) and columns in blocks of 2048: streaming whole rows evicted the inputs from L1
before their next use (4096 x 4096 ran at 24 GB/s; with a fixed input, 34 GB/s).

That is four vector instructions per 64 bytes of weights, enough to stream at the memory
bandwidth (``benchmarks/bench_gemv.py``). Rows whose column count is not a multiple of 32
use the blocked kernels. The row-major plan (the kept values in column order and the
positions) is built on the first batch-1 call and kept in ``layer.extra`` beside the blocked
layout, which batches still use (so a layer called at batch 1 holds its weights twice).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Optional

import numpy as np
import torch

from sparsemerge.kernels.layout import BlockedNM, positions_of, unblock
from sparsemerge.kernels.llvm_jit import compile_functions, f32_row_kernel, features_missing

UNIT = 32  # input columns per vpermi2ps table (16 kept weights)
BLOCK_UNITS = 64  # units per column block: 2048 inputs, 8 KiB of x kept in L1
REQUIRED_FEATURES = ("avx512f", "avx512bw", "avx512vbmi")


def _vec(values, ty: str) -> str:
    return "<" + ", ".join(f"{ty} {v}" for v in values) + ">"


# byte 4j (the low byte of 32-bit lane j) takes the metadata bits 2j..2j+7; the rest stay 0
_SHIFTS = _vec([2 * (b // 4) if b % 4 == 0 else 0 for b in range(64)], "i8")
_GROUP_BASE = _vec([4 * (j // 2) for j in range(16)], "i32")  # first column of weight j's group
_THREE = _vec([3] * 16, "i32")

# one row k of the quad, unit %u: metadata -> index -> the 16 inputs -> fma into %a{k}
_ROW_STEP = """
  %mo{k} = add i64 %mbase, {k}
  %mp{k} = getelementptr i32, ptr %meta, i64 %mo{k}
  %m{k} = load i32, ptr %mp{k}, align 4
  %m1{k} = insertelement <16 x i32> poison, i32 %m{k}, i32 0
  %mv{k} = shufflevector <16 x i32> %m1{k}, <16 x i32> poison, <16 x i32> zeroinitializer
  %mb{k} = bitcast <16 x i32> %mv{k} to <64 x i8>
  %ms{k} = call <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8> SHIFTS, <64 x i8> %mb{k})
  %ms32{k} = bitcast <64 x i8> %ms{k} to <16 x i32>
  %pj{k} = and <16 x i32> %ms32{k}, THREE
  %ix{k} = or <16 x i32> %pj{k}, GROUP_BASE
  %xsel{k} = call <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float> %xl, <16 x i32> %ix{k}, <16 x float> %xh)
  %wo{k} = mul i64 %mo{k}, 16
  %wp{k} = getelementptr float, ptr %vals, i64 %wo{k}
  %w{k} = load <16 x float>, ptr %wp{k}, align 4
  %an{k} = call <16 x float> @llvm.fma.v16f32(<16 x float> %xsel{k}, <16 x float> %w{k}, <16 x float> %a{k})
"""
_ROW_END = """
  %tot{k} = call reassoc float @llvm.vector.reduce.fadd.v16f32(float 0.0, <16 x float> %a{k})
  %ro{k} = add i64 %r, {k}
  %op{k} = getelementptr float, ptr %out, i64 %ro{k}
  %old{k} = load float, ptr %op{k}
  %prev{k} = select i1 %first, float 0.0, float %old{k}
  %new{k} = fadd float %prev{k}, %tot{k}
  store float %new{k}, ptr %op{k}
"""

_IR = """
declare <64 x i8> @llvm.x86.avx512.pmultishift.qb.512(<64 x i8>, <64 x i8>)
declare <16 x float> @llvm.x86.avx512.vpermi2var.ps.512(<16 x float>, <16 x i32>, <16 x float>)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
declare float @llvm.vector.reduce.fadd.v16f32(float, <16 x float>)

"""
_PHI = """
  %a{k} = phi <16 x float> [ zeroinitializer, %quadbody ], [ %an{k}, %unitbody ]
"""
# the unit's 32 inputs as two 16-float vectors: the vpermi2ps table
_XLOADS = """
  %xlp = getelementptr float, ptr %x, i64 %xo
  %xhp = getelementptr float, ptr %xlp, i64 16
  %xl = load <16 x float>, ptr %xlp, align 4
  %xh = load <16 x float>, ptr %xhp, align 4
"""


def _kernel_ir() -> str:
    """The module: the shared float32 loop nest (``llvm_jit.F32_ROW_KERNEL``) with this
    kernel's accumulators, input loads, row steps and row ends."""
    def each(t: str) -> str:
        return "".join(t.replace("{k}", str(k)) for k in range(4))

    ir = _IR + f32_row_kernel("gemv24_f32_gather", each(_PHI), _XLOADS, each(_ROW_STEP), each(_ROW_END))
    return ir.replace("SHIFTS", _SHIFTS).replace("THREE", _THREE).replace("GROUP_BASE", _GROUP_BASE)


def cpu_features_missing() -> list[str]:
    return features_missing(REQUIRED_FEATURES)


@functools.lru_cache(maxsize=None)
def _compiled_fns() -> tuple[Optional[dict], Optional[str]]:
    """({"f32": ctypes function}, None) or (None, reason). Compiled once per process."""
    try:
        missing = cpu_features_missing()
        if missing:
            return None, f"the CPU lacks {', '.join(missing)}"
        proto = ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 4), *([ctypes.c_int64] * 5))
        fn = compile_functions(_kernel_ir(), {"gemv24_f32_gather": proto})["gemv24_f32_gather"]
        return {"f32": fn}, None
    except Exception as exc:  # noqa: BLE001 - any llvmlite failure means "not available", with the reason
        return None, f"could not compile the gather kernel: {exc}"


def compiled_functions() -> dict:
    """``{"f32": fn}``: the raw ctypes function ``fn(vals, meta, x, out, r0, r1, units, quads,
    block_units)`` (pointers, then int64s; rows ``r0..r1-1`` in multiples of 4) for callers
    that close over it in their own numba code. Raises RuntimeError when unavailable."""
    fns, reason = _compiled_fns()
    if fns is None:
        raise RuntimeError(reason)
    return fns


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple[Optional[object], Optional[str]]:
    """(numba runner, None) or (None, reason)."""
    fns, reason = _compiled_fns()
    return (None, reason) if fns is None else (_row_runner(fns["f32"]), None)


def _row_runner(fn):
    """One numba call per matmul (``x (1, cols)`` -> ``out (1, rows)``): the rows split over
    numba's threads, ``fn`` (a ctypes function pointer) called on each range."""
    import numba

    @numba.njit(parallel=True)
    def run(vals, meta, x2, rows, units, tasks):  # pragma: no cover - jitted
        x = x2[0]
        quads = (rows + 3) // 4
        out = np.empty((1, 4 * quads), np.float32)
        step = 4 * ((quads + tasks - 1) // tasks)
        for t in numba.prange(tasks):
            r0 = t * step
            r1 = min(4 * quads, r0 + step)
            if r0 < r1:
                fn(vals.ctypes.data, meta.ctypes.data, x.ctypes.data, out.ctypes.data, r0, r1, units, quads, BLOCK_UNITS)
        return out[:, :rows]

    return run


def unavailable_reason(layer: BlockedNM) -> Optional[str]:
    """None when this kernel can run ``layer`` at batch 1; else why not."""
    if not layer.is_24:
        return f"{layer.n}:{layer.m} is not 2:4"
    if layer.codec != "none" or layer.values.dtype != torch.float32:
        return "values are not float32"
    if layer.cols % UNIT:
        return f"input features {layer.cols} are not a multiple of {UNIT}"
    return _compiled_fns()[1]


def prepare(layer: BlockedNM, order: Optional[np.ndarray] = None, key: str = "gather_plan") -> dict:
    """The row-major arrays the kernel reads (cached in ``layer.extra[key]``). ``order``: the
    kept weight (0..15, column order) each of a unit's 16 slots holds (None: column order);
    the metadata field of slot j is the in-group position of that weight (the AVX2 kernel of
    ``kernels/cpu_avx2.py`` uses this layout with its own slot order)."""
    plan = layer.extra.get(key)
    if plan is not None:
        return plan
    rows, cols = layer.rows, layer.cols
    units = cols // UNIT
    quads = -(-rows // 4)
    pos = np.zeros((quads * 4, units, 16), np.uint32)  # padding rows: weight 0 at position 0
    pos[:rows] = positions_of(layer).cpu().numpy().reshape(rows, units, 16)
    if order is not None:
        pos = np.ascontiguousarray(pos[:, :, order])
    meta = np.zeros((quads * 4, units), np.uint32)
    for j in range(16):
        meta |= pos[:, :, j] << np.uint32(2 * j)
    vals = np.zeros((quads * 4, units, 16), np.float32)
    vals[:rows] = unblock(layer.values, rows).cpu().reshape(rows, units, 16).numpy()
    if order is not None:
        vals = np.ascontiguousarray(vals[:, :, order])
    # column block c, quad q, unit u of the block: the 4 rows' 16 weights one after the other
    blocks_meta, blocks_vals = [], []
    for c0 in range(0, units, BLOCK_UNITS):
        c1 = min(units, c0 + BLOCK_UNITS)
        blocks_meta.append(meta[:, c0:c1].reshape(quads, 4, c1 - c0).transpose(0, 2, 1).reshape(-1))
        blocks_vals.append(vals[:, c0:c1].reshape(quads, 4, c1 - c0, 16).transpose(0, 2, 1, 3).reshape(-1))
    meta = np.ascontiguousarray(np.concatenate(blocks_meta))
    vals = np.ascontiguousarray(np.concatenate(blocks_vals))
    plan = {"vals": vals, "meta": meta, "units": units}
    plan["nbytes"] = vals.nbytes + meta.nbytes
    layer.extra[key] = plan
    return plan


def runner_for(layer: BlockedNM) -> tuple:
    """``(run, plan)``: ``run(plan["vals"], plan["meta"], x (1, cols), rows, plan["units"], tasks)``
    returns ``out (1, rows)``."""
    run, reason = _compiled()
    if run is None:
        raise RuntimeError(reason)
    return run, prepare(layer)


def gather_matmul(layer: BlockedNM, x: torch.Tensor, threads: int) -> torch.Tensor:
    """``x (1, cols)`` float32 -> ``(1, rows)``."""
    cached = layer.extra.get("gather_runner")
    if cached is None:
        cached = layer.extra["gather_runner"] = runner_for(layer)
    run, plan = cached
    rows = layer.rows
    return torch.from_numpy(run(plan["vals"], plan["meta"], x.numpy(), rows, plan["units"],
                                threads if rows >= 128 * threads else 1))


def token_runner(layer: BlockedNM):
    """``x (..., cols) float32 CPU with one row -> (1, rows)``: the batch-1 shortcut of the
    registry row (no dispatch per call)."""
    from sparsemerge.kernels.threads import row_tasks, sync_threads

    run, plan = runner_for(layer)
    vals, meta, units, rows = plan["vals"], plan["meta"], plan["units"], layer.rows

    def token(x: torch.Tensor):
        sync_threads()
        return torch.from_numpy(run(vals, meta, x.detach().numpy().reshape(1, -1), rows, units, row_tasks(rows)))

    return token
