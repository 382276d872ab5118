"""Kernel registry and dispatch: which implementation runs ``y = x W^T`` for a packed layer.

Kernels register in :data:`KERNELS` with a priority; :func:`run_kernel` picks the first
(lowest priority number) whose ``supports`` returns ``None`` for the layer and input.
:func:`force_kernel` (or the environment variable ``SPARSEMERGE_KERNEL``) forces one path,
e.g. in tests: ``with force_kernel("reference"): ...``. A forced kernel that cannot run
raises instead of falling back silently.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.registry import Registry


@dataclass(frozen=True)
class Kernel:
    name: str
    priority: int  # lower runs first
    supports: Callable[[object, torch.Tensor], Optional[str]]  # (SparseLinear, x2d) -> None | reason
    run: Callable[[object, torch.Tensor], torch.Tensor]  # (SparseLinear, x2d float32) -> (B, out) float32


KERNELS: Registry[Kernel] = Registry("kernel")
_state = threading.local()


def register_kernel(kernel: Kernel) -> Kernel:
    return KERNELS.register(kernel.name)(kernel)


def forced_kernel() -> Optional[str]:
    return getattr(_state, "forced", None) or os.environ.get("SPARSEMERGE_KERNEL") or None


@contextlib.contextmanager
def force_kernel(name: Optional[str]) -> Iterator[None]:
    """Force every SparseLinear in this thread onto kernel ``name`` (None: automatic)."""
    _ensure_loaded()
    if name is not None:
        KERNELS.get(name)  # unknown names fail here with the known list
    old = getattr(_state, "forced", None)
    _state.forced = name
    try:
        yield
    finally:
        _state.forced = old


_loaded = [False]


def _ensure_loaded() -> None:
    # importing the module registers the kernels
    if not _loaded[0]:
        import sparsemerge.kernels.backends  # noqa: F401

        _loaded[0] = True


def choose_kernel(layer: object, x: torch.Tensor) -> Kernel:
    _ensure_loaded()
    forced = forced_kernel()
    if forced:
        kernel = KERNELS.get(forced)
        reason = kernel.supports(layer, x)
        if reason is not None:
            raise SparsemergeError(f"kernel {forced!r} was forced but cannot run this layer: {reason}")
        return kernel
    reasons = []
    for kernel in _by_priority():
        reason = kernel.supports(layer, x)
        if reason is None:
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    raise SparsemergeError("no kernel can run this layer: " + "; ".join(reasons))


_sorted: list = [(), -1]


def _by_priority() -> tuple:
    names = KERNELS.names()
    if _sorted[1] != len(names):
        _sorted[0] = tuple(sorted((KERNELS.get(n) for n in names), key=lambda k: k.priority))
        _sorted[1] = len(names)
    return _sorted[0]


def run_kernel(layer: object, x: torch.Tensor) -> torch.Tensor:
    return choose_kernel(layer, x).run(layer, x)
