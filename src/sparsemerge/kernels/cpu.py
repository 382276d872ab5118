"""CPU entry point ``cpu_matmul``: runs a layout on the best CPU row of the kernel registry
(``kernels/backends.py``) or on a row named by ``path``.

The kernels themselves live one family per module: ``cpu_blocked.py`` (numba, row-blocked
2:4), ``cpu_general.py`` (numba, any N:M), ``cpu_gather.py`` / ``cpu_vnni.py`` (AVX-512),
``cpu_avx2.py`` (AVX2 + FMA). Names of the numba module are re-exported here for older callers
(``cpu_blocked.py`` also says why its vectorised loops live in small ``@njit`` helpers).
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsemerge.kernels.backends import as_f32
from sparsemerge.kernels.cpu_blocked import (  # noqa: F401 - re-exports
    BITS,
    FP16_SCALE,
    PARALLEL,
    PARALLEL_MIN_BYTES,
    blocked_matmul,
    gemm24,
    gemv24_f32,
    gemv24_half,
    gemv24_q,
)
from sparsemerge.kernels.dispatch import KernelUnavailable, select
from sparsemerge.kernels.features import current_cap
from sparsemerge.kernels.layout import BlockedNM
from sparsemerge.kernels.threads import _threads, sync_threads  # noqa: F401 - re-exports

# the historical path names -> registry rows
PATHS = {
    "auto": "cpu",
    "gemv24": "numba-gemv24",
    "gemm24": "numba-gemm24",
    "general": "numba-general",
    "gather": "avx512-gather-f32",
    "vnni": "avx512-vnni-a8",
}


class _Request:
    """A layout with the activation mode a call asks for (what the rows read)."""

    __slots__ = ("layout", "act_quant")

    def __init__(self, layout: BlockedNM, act_quant: str) -> None:
        self.layout = layout
        self.act_quant = act_quant


def vnni_reason(layer: BlockedNM) -> Optional[str]:
    """Why the AVX-512 VNNI kernel cannot run ``layer`` (None: it can); cached per layout."""
    from sparsemerge.kernels.backends import _cached_reason, _vnni_check

    return _cached_reason(layer, "reason:avx512-vnni-a8", _vnni_check)


def gather_reason(layer: BlockedNM) -> Optional[str]:
    """Why the AVX-512 float32 gather kernel cannot run ``layer``; cached per layout."""
    from sparsemerge.kernels.backends import _cached_reason, _gather_check

    return _cached_reason(layer, "reason:avx512-gather-f32", _gather_check)


def cpu_matmul(layer: BlockedNM, x: torch.Tensor, path: str = "auto", act_quant: str = "none") -> torch.Tensor:
    """``x (B, cols)`` float32 CPU -> ``(B, rows)``.

    ``path``: "auto" (the best CPU row, :data:`PATHS`), a historical name ("gemv24",
    "gemm24", "general", "gather", "vnni") or any row name of the registry. A row with INT8
    activations (e.g. "vnni") quantizes the input whatever ``act_quant`` says; "auto" uses
    them only with ``act_quant="int8"``. The choice is cached per layout and situation."""
    x = as_f32(x)
    name = PATHS.get(path, path)
    from sparsemerge.kernels.backends import KERNELS

    if name in KERNELS and KERNELS.get(name).act_quant != "none":
        act_quant = KERNELS.get(name).act_quant
    key = ("choice", name, act_quant, x.shape[0] == 1, current_cap())
    choice = layer.extra.get(key)
    request = _Request(layer, act_quant)
    if choice is None:
        try:
            choice = select(request, x, forced=name)
        except KernelUnavailable as exc:
            raise ValueError(f"the {path} path cannot run this layer: {exc.reason}") from None
        layer.extra[key] = choice
    return choice.run(request, x)
