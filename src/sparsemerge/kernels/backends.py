"""The kernel registry: every path that can run ``y = x W^T`` for a packed layer is one row.

A row names what it handles (pattern, codec, value dtype, batch, activation quantization),
the CPU features it needs (LLVM feature names, checked against ``kernels/features.py``,
which a cap can narrow) and a ``supports(layer, x)`` check that returns None or the reason
it cannot run. ``kernels/dispatch.py`` takes the first row, by priority, whose check passes.

====================  ========  ============================================================
row                   priority  runs
====================  ========  ============================================================
cuda                  0         input on a CUDA device (2:4 -> semi-structured, else dense GPU)
avx512-vnni-a8        10        2:4 INT8/INT4 (symmetric), batch 1, INT8 activations
                                (``kernels/cpu_vnni.py``; AVX-512 VBMI + VNNI + GFNI)
avxvnni-a8            12        the same with the 256-bit VEX ``vpdpbusd`` (``kernels/cpu_avx2.py``;
                                AVX2 + FMA + AVX-VNNI: Alder Lake, Zen 5)
avx2-a8               14        the same with AVX2 + FMA (``kernels/cpu_avx2.py``; Haswell, Zen 1-3)
neon-dotprod-a8       16        the same with NEON + dotprod ``sdot`` (``kernels/cpu_neon.py``;
                                AArch64 only; tested under qemu, the numba run path untested)
avx512-gather-f32     20        2:4 float32, batch 1 (``kernels/cpu_gather.py``; AVX-512 VBMI)
avx2-f32              22        2:4 float32, batch 1 (``kernels/cpu_avx2.py``; AVX2 + FMA)
neon-f32              24        2:4 float32, batch 1 (``kernels/cpu_neon.py``; AArch64 NEON)
numba-gemv24          30        2:4, any codec, batch 1 (``kernels/cpu_blocked.py``)
numba-gemm24          31        2:4, any codec and batch
numba-general         32        any N:M, codec and batch (``kernels/cpu_general.py``)
numba-hier            40        hierarchical N:M (``hier:...``), any codec and batch
                                (``kernels/cpu_hier.py``; the only CPU row for that layout)
reference             100       always (pure torch, ``kernels/reference.py``; slow)
====================  ========  ============================================================

Groups (aliases for forcing): ``cpu`` = every CPU row, chosen by priority as usual.

A row may carry a ``token_runner(layout)`` factory: a callable for one float32 CPU input
row that skips the dispatch (a decoding step calls ~200 small layers and the generic path
costs ~15 us of Python per call). Rows with ``act_quant="int8"`` may return None for an
input they cannot carry (NaN/Inf): the dispatcher then runs the best float row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sparsemerge.kernels import features as F
from sparsemerge.io.dtypes import dtype_name
from sparsemerge.registry import Registry


@dataclass(frozen=True)
class Handles:
    """What a row can run; None means any."""

    patterns: Optional[tuple[str, ...]] = None  # e.g. ("2:4",)
    codecs: Optional[tuple[str, ...]] = None  # "none", "int8", "int4"
    value_dtypes: Optional[tuple[str, ...]] = None  # of codec "none": float32 / float16 / bfloat16
    batch1: bool = False  # batch 1 only
    act_quant: Optional[str] = None  # "int8": only layers with INT8 activations
    layouts: tuple[str, ...] = ("nm",)  # layout kinds: "nm" (BlockedNM), "hier" (kernels/hier.py)

    def reason(self, layout, act_quant: str, batch: int) -> Optional[str]:
        kind = getattr(layout, "kind", "nm")
        if kind not in self.layouts:
            return f"a {kind} layout, not {'/'.join(self.layouts)}"
        if self.act_quant is not None and act_quant != self.act_quant:
            return f"needs act_quant={self.act_quant!r}, the layer has {act_quant!r}"
        if self.batch1 and batch != 1:
            return f"batch is not 1 ({batch})"
        if self.patterns is not None and f"{layout.n}:{layout.m}" not in self.patterns:
            return f"{layout.n}:{layout.m} is not {' or '.join(self.patterns)}"
        if self.codecs is not None and layout.codec not in self.codecs:
            return f"codec {layout.codec!r} is not {'/'.join(self.codecs)}"
        if self.value_dtypes is not None and layout.codec == "none":
            dtype = dtype_name(layout.values.dtype)
            if dtype not in self.value_dtypes:
                return f"values are {dtype}, not {'/'.join(self.value_dtypes)}"
        return None

    def describe(self) -> str:
        kinds = "hierarchical N:M" if self.layouts == ("hier",) else "N:M"
        parts = [(kinds if self.patterns is None else "/".join(self.patterns))]
        parts.append("any codec" if self.codecs is None else "/".join(self.codecs))
        if self.value_dtypes is not None:
            parts.append("/".join(self.value_dtypes) + " values")
        parts.append("batch 1" if self.batch1 else "any batch")
        if self.act_quant:
            parts.append(f"{self.act_quant} activations")
        return ", ".join(parts)


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int  # lower runs first
    supports: Callable[[object, torch.Tensor], Optional[str]]  # (layer, x2d) -> None | reason
    run: Callable[[object, torch.Tensor], Optional[torch.Tensor]]  # (layer, x2d float32) -> (B, out) float32
    device: str = "cpu"  # "cpu", "cuda", or "any"
    features: tuple[str, ...] = ()  # LLVM feature names the row needs
    handles: Handles = Handles()
    act_quant: str = "none"  # "int8": run() may return None (input not finite)
    token_runner: Optional[Callable[[object], Callable]] = None  # (layout) -> (x -> (1, rows) | None)
    members: Optional[tuple[str, ...]] = None  # a group (alias) of rows, not a row itself
    source: str = ""  # the module that implements it

    @property
    def is_group(self) -> bool:
        return self.members is not None


KERNELS: Registry[Kernel] = Registry("kernel")


def register_kernel(kernel: Kernel) -> Kernel:
    return KERNELS.register(kernel.name)(kernel)


# ---------------------------------------------------------------- helpers
def layout_of(layer):
    """The ``BlockedNM`` of a SparseLinear (or of a bare layout / request)."""
    return getattr(layer, "layout", layer)


def act_quant_of(layer) -> str:
    return getattr(layer, "act_quant", "none")


def as_f32(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.float32 or not x.is_contiguous() or x.requires_grad:
        x = x.detach().to(torch.float32).contiguous()
    return x


def _cached_reason(layout, key: str, fn: Callable) -> Optional[str]:
    """``fn(layout)`` cached in ``layout.extra`` (a layout's shape and codec never change)."""
    if key not in layout.extra:
        layout.extra[key] = fn(layout)
    return layout.extra[key]


def cpu_row(name: str, priority: int, run, handles: Handles, features: tuple[str, ...] = (),
            check: Optional[Callable] = None, token_runner=None, act_quant: str = "none", source: str = "") -> Kernel:
    """A CPU row: device, handles and features are checked here, then ``check(layout)``
    (the module's own reason, e.g. a column count the layout needs; cached per layout)."""

    def supports(layer, x: torch.Tensor) -> Optional[str]:
        if x.device.type != "cpu":
            return f"input is on {x.device.type}, not cpu"
        layout = layout_of(layer)
        if layout.values.device.type != "cpu":
            return "the packed values are not on the cpu"
        reason = handles.reason(layout, act_quant_of(layer), x.shape[0])
        if reason is None and features:
            reason = F.missing_reason(features)
        if reason is None and check is not None:
            reason = _cached_reason(layout, f"reason:{name}", check)
        return reason

    return Kernel(name, priority, supports, run, "cpu", features, handles, act_quant, token_runner, None, source)


def group(name: str, members: tuple[str, ...]) -> Kernel:
    """An alias that stands for ``members`` (forcing it chooses among them by priority)."""

    def rows() -> list[Kernel]:
        return sorted((KERNELS.get(m) for m in members), key=lambda k: k.priority)

    def supports(layer, x):
        reasons = []
        for k in rows():
            r = k.supports(layer, x)
            if r is None:
                return None
            reasons.append(f"{k.name}: {r}")
        return "; ".join(reasons)

    def run(layer, x):
        for k in rows():
            if k.supports(layer, x) is None:
                return k.run(layer, x)
        raise RuntimeError(f"no row of group {name!r} can run this layer")

    return Kernel(name, min((KERNELS.get(m).priority for m in members), default=0), supports, run,
                  "cpu", (), Handles(), "none", None, tuple(members))


# ---------------------------------------------------------------- cuda
def _cuda_supports(layer, x: torch.Tensor) -> Optional[str]:
    return None if x.device.type == "cuda" else f"input is on {x.device.type}, not cuda"


def _cuda_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cuda import semi_structured_linear

    weight = layer.cuda_weight(x.device)
    return semi_structured_linear(x, weight, None).float()


# ---------------------------------------------------------------- AVX-512 rows
def _vnni_check(layout) -> Optional[str]:
    from sparsemerge.kernels.cpu_vnni import unavailable_reason

    return unavailable_reason(layout)


def _vnni_run(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    from sparsemerge.kernels.cpu_vnni import vnni_matmul
    from sparsemerge.kernels.threads import sync_threads

    return vnni_matmul(layout_of(layer), as_f32(x), sync_threads())


def _vnni_token(layout):
    from sparsemerge.kernels.cpu_vnni import token_runner

    return token_runner(layout)


def _gather_check(layout) -> Optional[str]:
    from sparsemerge.kernels.cpu_gather import unavailable_reason

    return unavailable_reason(layout)


def _gather_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cpu_gather import gather_matmul
    from sparsemerge.kernels.threads import sync_threads

    return gather_matmul(layout_of(layer), as_f32(x), sync_threads())


def _gather_token(layout):
    from sparsemerge.kernels.cpu_gather import token_runner

    return token_runner(layout)


# ---------------------------------------------------------------- AVX2 rows
def _avx2_f32_check(layout) -> Optional[str]:
    from sparsemerge.kernels.cpu_avx2 import f32_unavailable_reason

    return f32_unavailable_reason(layout)


def _avx2_f32_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cpu_avx2 import f32_matmul
    from sparsemerge.kernels.threads import sync_threads

    return f32_matmul(layout_of(layer), as_f32(x), sync_threads())


def _avx2_f32_token(layout):
    from sparsemerge.kernels.cpu_avx2 import f32_token_runner

    return f32_token_runner(layout)


def _avx2_a8(vnni: bool):
    def check(layout) -> Optional[str]:
        from sparsemerge.kernels.cpu_avx2 import a8_unavailable_reason

        return a8_unavailable_reason(layout, vnni)

    def run(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
        from sparsemerge.kernels.cpu_avx2 import a8_matmul
        from sparsemerge.kernels.threads import sync_threads

        return a8_matmul(layout_of(layer), as_f32(x), sync_threads(), vnni)

    def token(layout):
        from sparsemerge.kernels.cpu_avx2 import a8_token_runner

        return a8_token_runner(layout, vnni)

    return check, run, token


# ---------------------------------------------------------------- NEON rows (AArch64 hosts only)
def _neon_f32_check(layout) -> Optional[str]:
    from sparsemerge.kernels.cpu_neon import f32_unavailable_reason

    return f32_unavailable_reason(layout)


def _neon_f32_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cpu_neon import f32_matmul
    from sparsemerge.kernels.threads import sync_threads

    return f32_matmul(layout_of(layer), as_f32(x), sync_threads())


def _neon_a8_check(layout) -> Optional[str]:
    from sparsemerge.kernels.cpu_neon import a8_unavailable_reason

    return a8_unavailable_reason(layout)


def _neon_a8_run(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    from sparsemerge.kernels.cpu_neon import a8_matmul
    from sparsemerge.kernels.threads import sync_threads

    return a8_matmul(layout_of(layer), as_f32(x), sync_threads())


# ---------------------------------------------------------------- numba rows
def _numba(path: str):
    def run(layer, x: torch.Tensor) -> torch.Tensor:
        from sparsemerge.kernels.cpu_blocked import blocked_matmul

        return blocked_matmul(layout_of(layer), as_f32(x), path)

    return run


def _hier_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cpu_hier import hier_matmul

    return hier_matmul(layout_of(layer), as_f32(x))


# ---------------------------------------------------------------- reference
def _reference_supports(layer, x: torch.Tensor) -> Optional[str]:
    return None


def _reference_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.reference import reference_matmul

    return reference_matmul(layout_of(layer), x)


SYM_24_Q = Handles(patterns=("2:4",), codecs=("int8", "int4"), batch1=True, act_quant="int8")
F32_24 = Handles(patterns=("2:4",), codecs=("none",), value_dtypes=("float32",), batch1=True)
VNNI512 = ("avx512f", "avx512bw", "avx512vbmi", "avx512vnni", "gfni")
GATHER512 = ("avx512f", "avx512bw", "avx512vbmi")
AVX2 = ("avx2", "fma")
_vnni256 = _avx2_a8(True)
_avx2a8 = _avx2_a8(False)

register_kernel(Kernel("cuda", 0, _cuda_supports, _cuda_run, "cuda", handles=Handles(), source="kernels/cuda.py"))
register_kernel(cpu_row("avx512-vnni-a8", 10, _vnni_run, SYM_24_Q, VNNI512, _vnni_check, _vnni_token, "int8",
                        "kernels/cpu_vnni.py"))
register_kernel(cpu_row("avxvnni-a8", 12, _vnni256[1], SYM_24_Q, AVX2 + ("avxvnni",), _vnni256[0], _vnni256[2], "int8",
                        "kernels/cpu_avx2.py"))
register_kernel(cpu_row("avx2-a8", 14, _avx2a8[1], SYM_24_Q, AVX2, _avx2a8[0], _avx2a8[2], "int8", "kernels/cpu_avx2.py"))
register_kernel(cpu_row("neon-dotprod-a8", 16, _neon_a8_run, SYM_24_Q, ("neon", "dotprod"), _neon_a8_check, None,
                        "int8", "kernels/cpu_neon.py"))
register_kernel(cpu_row("avx512-gather-f32", 20, _gather_run, F32_24, GATHER512, _gather_check, _gather_token,
                        source="kernels/cpu_gather.py"))
register_kernel(cpu_row("avx2-f32", 22, _avx2_f32_run, F32_24, AVX2, _avx2_f32_check, _avx2_f32_token,
                        source="kernels/cpu_avx2.py"))
register_kernel(cpu_row("neon-f32", 24, _neon_f32_run, F32_24, ("neon",), _neon_f32_check, source="kernels/cpu_neon.py"))
register_kernel(cpu_row("numba-gemv24", 30, _numba("gemv24"), Handles(patterns=("2:4",), batch1=True),
                        source="kernels/cpu_blocked.py"))
register_kernel(cpu_row("numba-gemm24", 31, _numba("gemm24"), Handles(patterns=("2:4",)), source="kernels/cpu_blocked.py"))
register_kernel(cpu_row("numba-general", 32, _numba("general"), Handles(), source="kernels/cpu_general.py"))
register_kernel(cpu_row("numba-hier", 40, _hier_run, Handles(layouts=("hier",)), source="kernels/cpu_hier.py"))
register_kernel(Kernel("reference", 100, _reference_supports, _reference_run, "any", source="kernels/reference.py"))
register_kernel(group("cpu", tuple(n for n in KERNELS.names() if KERNELS.get(n).device == "cpu")))


def rows() -> list[Kernel]:
    """Every row (groups left out), by priority."""
    return sorted((k for k in map(KERNELS.get, KERNELS.names()) if not k.is_group), key=lambda k: (k.priority, k.name))
