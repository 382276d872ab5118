"""The CPU features the kernel registry may use: the host's, optionally capped.

Kernel rows (``kernels/backends.py``) name the LLVM feature names they need (``avx2``,
``fma``, ``avx512vnni``, ...). :func:`cpu_features` is the host's set (llvmlite) intersected
with a cap, so that an AVX-512 machine can run - and test, and benchmark - the kernels of
an AVX2-only CPU:

* ``with cpu_level("avx2"): ...`` (this thread), or
* the environment variable ``SPARSEMERGE_CPU_FEATURES`` (read at every choice).

A cap is a level name of :data:`LEVELS` (``avx2`` = x86-64-v3: AVX2, FMA, F16C, BMI1/2;
``avxvnni`` = that plus the 256-bit VNNI; ``avx512`` = no cap; ``none`` = no vector
extension, only the portable rows) or a comma-separated list of feature names. The cap only
narrows the choice of rows; the numba kernels are compiled for the host either way.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Iterable, Iterator, Optional

ENV = "SPARSEMERGE_CPU_FEATURES"
# x86-64-v3 (Haswell, Zen 1-3): what an AVX2 machine is guaranteed to have
_V3 = ("sse", "sse2", "sse3", "ssse3", "sse4.1", "sse4.2", "popcnt", "avx", "avx2", "fma", "f16c", "bmi", "bmi2",
       "lzcnt", "movbe")
LEVELS: dict[str, Optional[tuple[str, ...]]] = {
    "none": (),
    "avx2": _V3,
    "x86-64-v3": _V3,
    "avxvnni": _V3 + ("avxvnni",),
    "avx512": None,  # no cap: everything the host has
    "native": None,
}
_state = threading.local()


@functools.lru_cache(maxsize=1)
def host_features() -> frozenset:
    """LLVM feature names this CPU has (empty if llvmlite cannot tell)."""
    try:
        import llvmlite.binding as llvm

        return frozenset(k for k, v in llvm.get_host_cpu_features().items() if v)
    except Exception:  # noqa: BLE001 - no llvmlite / unknown host: no vector rows
        return frozenset()


def current_cap() -> Optional[str]:
    """The active cap (thread's :func:`cpu_level` first, then the environment), or None."""
    return getattr(_state, "cap", None) or os.environ.get(ENV) or None


def _allowed(cap: str) -> Optional[frozenset]:
    key = cap.strip().lower()
    if key in LEVELS:
        level = LEVELS[key]
        return None if level is None else frozenset(level)
    names = frozenset(f.strip() for f in key.split(",") if f.strip())
    if not names:
        raise ValueError(f"empty CPU feature cap {cap!r}; use one of {', '.join(LEVELS)} or a comma list of LLVM feature names")
    return names


def cpu_features() -> frozenset:
    """The host's features under the current cap."""
    cap = current_cap()
    host = host_features()
    if cap is None:
        return host
    allowed = _allowed(cap)
    return host if allowed is None else host & allowed


def missing(required: Iterable[str]) -> list[str]:
    """The names in ``required`` that :func:`cpu_features` lacks."""
    have = cpu_features()
    return [f for f in required if f not in have]


def missing_reason(required: Iterable[str]) -> Optional[str]:
    """None, or why rows needing ``required`` cannot run (naming the cap if one is set)."""
    lack = missing(required)
    if not lack:
        return None
    cap = current_cap()
    host_lack = [f for f in lack if f not in host_features()]
    if host_lack:
        return f"the CPU lacks {', '.join(host_lack)}"
    return f"the CPU feature cap {cap!r} excludes {', '.join(lack)}"


@contextlib.contextmanager
def cpu_level(level: Optional[str]) -> Iterator[None]:
    """Consider only the CPU features of ``level`` (see :data:`LEVELS`; None: no cap) in this
    thread, e.g. ``with cpu_level("avx2"):`` runs the AVX2 rows on an AVX-512 machine."""
    if level is not None:
        _allowed(level)  # validate
    old = getattr(_state, "cap", None)
    _state.cap = level
    try:
        yield
    finally:
        _state.cap = old
