"""Kernel choice: which registry row (``kernels/backends.py``) runs ``y = x W^T`` for a layer.

:func:`select` walks the rows by priority and takes the first whose ``supports(layer, x)``
returns None; the result, a :class:`KernelChoice`, keeps the reasons the faster rows were
skipped. :func:`force_kernel` (or the environment variable ``SPARSEMERGE_KERNEL``) forces
one row by name, or a group (``cpu``: the best CPU row), e.g. in tests:
``with force_kernel("reference"): ...``. A forced row that cannot run raises with its
reason instead of falling back silently. ``kernels/features.py`` caps the CPU features the
rows may use (``cpu_level("avx2")``, ``SPARSEMERGE_CPU_FEATURES=avx2``).

``SparseLinear`` calls :func:`select` once per layer and situation (device, batch 1 or not,
forced name, feature cap) and caches the choice.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels.backends import KERNELS, Kernel, register_kernel, rows
from sparsemerge.kernels.features import cpu_level, current_cap

__all__ = ["KERNELS", "Kernel", "KernelChoice", "KernelUnavailable", "register_kernel", "select", "choose_kernel",
           "run_kernel", "force_kernel", "forced_kernel", "cpu_level", "state_key", "cpu_fast_path_allowed"]

_state = threading.local()


class KernelUnavailable(SparsemergeError):
    """A forced kernel (row or group) cannot run a layer; ``.reason`` says why."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class KernelChoice:
    """The row chosen for a layer and input shape, and why."""

    kernel: Kernel
    skipped: tuple[tuple[str, str], ...]  # (row, reason) of every row tried before it
    forced: Optional[str] = None
    fallback: Optional["KernelChoice"] = None  # INT8-activation rows: the float row for NaN/Inf inputs

    @property
    def name(self) -> str:
        return self.kernel.name

    @property
    def reasons(self) -> tuple[tuple[str, str], ...]:
        return self.skipped

    def why(self) -> str:
        how = f"forced by {self.forced!r}" if self.forced else "the first row that can run it"
        text = f"{self.name} ({how}; {self.kernel.handles.describe()})"
        if self.skipped:
            text += "; skipped " + "; ".join(f"{n}: {r}" for n, r in self.skipped)
        return text

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        y = self.kernel.run(layer, x)
        if y is None:  # the row cannot carry this input (INT8 activations and NaN/Inf)
            if self.fallback is None:
                raise RuntimeError(f"kernel {self.name!r} refused the input and has no fallback")
            return self.fallback.run(layer, x)
        return y


def forced_kernel() -> Optional[str]:
    return getattr(_state, "forced", None) or os.environ.get("SPARSEMERGE_KERNEL") or None


def state_key() -> tuple:
    """What, besides the layer and input, a choice depends on: (forced name, feature cap)."""
    return (forced_kernel(), current_cap())


def _check_name(name: str) -> Kernel:
    if name not in KERNELS:
        row_names = ", ".join(k.name for k in rows())
        groups = ", ".join(n for n in KERNELS.names() if KERNELS.get(n).is_group)
        raise SparsemergeError(f"unknown kernel {name!r}; known kernels: {row_names}; groups: {groups}")
    return KERNELS.get(name)


@contextlib.contextmanager
def force_kernel(name: Optional[str]) -> Iterator[None]:
    """Force every SparseLinear in this thread onto kernel row or group ``name`` (None: automatic)."""
    if name is not None:
        _check_name(name)  # unknown names fail here with the known list
    old = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = old


def cpu_fast_path_allowed() -> bool:
    """Whether the dense CPU fast paths (``dense_f32``, ``dense_int8``) may run: nothing is
    forced, or the forced name is a CPU row or group (forcing ``reference``/``cuda`` skips them)."""
    forced = forced_kernel()
    if forced is None:
        return True
    return forced in KERNELS and KERNELS.get(forced).device == "cpu"


def _candidates(forced: Optional[str]) -> list[Kernel]:
    if forced is None:
        return rows()
    kernel = _check_name(forced)
    if kernel.is_group:
        return sorted((KERNELS.get(m) for m in kernel.members), key=lambda k: (k.priority, k.name))
    return [kernel]


def select(layer: object, x: torch.Tensor, forced: "str | None | bool" = True, float_only: bool = False) -> KernelChoice:
    """The row that runs ``layer`` (a SparseLinear, or anything with ``layout``/``act_quant``,
    or a bare ``BlockedNM``) on ``x (B, cols)``. ``forced``: True = the current
    :func:`force_kernel` / environment setting; a name; None = automatic. ``float_only``
    leaves out the rows with INT8 activations."""
    if forced is True:
        forced = forced_kernel()
    cands = _candidates(forced)
    if float_only:
        cands = [k for k in cands if k.act_quant == "none"]
    skipped = []
    for kernel in cands:
        reason = kernel.supports(layer, x)
        if reason is None:
            fallback = None
            if kernel.act_quant != "none":
                fallback = select(layer, x, None if forced == kernel.name else forced, float_only=True)
            return KernelChoice(kernel, tuple(skipped), forced or None, fallback)
        skipped.append((kernel.name, reason))
    if forced and len(cands) == 1:
        raise KernelUnavailable(f"kernel {forced!r} was forced but cannot run this layer: {skipped[0][1]}", skipped[0][1])
    why = "; ".join(f"{n}: {r}" for n, r in skipped)
    if forced:
        raise KernelUnavailable(f"kernel group {forced!r} was forced but none of its rows can run this layer: {why}", why)
    raise SparsemergeError("no kernel can run this layer: " + why)


def choose_kernel(layer: object, x: torch.Tensor) -> Kernel:
    """The row :func:`select` picks (kept for callers that want only the row)."""
    return select(layer, x).kernel


def run_kernel(layer: object, x: torch.Tensor) -> torch.Tensor:
    return select(layer, x).run(layer, x)


def describe_rows() -> list[tuple[str, int, str, str, str]]:
    """(name, priority, features, handles, module) of every row, by priority (docs, the CLI)."""
    return [(k.name, k.priority, ",".join(k.features) or "-", k.handles.describe() if k.device == "cpu" else k.device,
             k.source) for k in rows()]
