"""Keeping glibc's heap from growing while a model is loaded and its decode plan is built.

Loading a packed checkpoint and preparing the runtime's weight streams make thousands of
temporary arrays of 0.1-10 MiB (decoded metadata, unblocked values, padded copies). glibc
serves an allocation above ``M_MMAP_THRESHOLD`` with its own ``mmap`` and returns it on free;
but the threshold is dynamic: each freed mmapped block raises it to that block's size (up to
32 MiB), so later temporaries come from the heap, where the free holes between long-lived
arrays stay resident. Loading SmolLM2-135M 2:4 + INT4 and building its decode engine holds
~140 MiB of arrays but grew the process by ~750 MiB with the dynamic threshold
(``benchmarks/bench_decode_memory.py``, BENCHMARKS.md "Decode memory").

:func:`loading_heap` fixes the threshold at 128 KiB for the duration of a load (a glibc
``mallopt``; elsewhere nothing happens), then sets it to 32 MiB - where the dynamic
threshold ends up anyway - and trims the heap. The second step matters: with every large
allocation mmapped, prompt processing (torch's temporaries, allocated and freed per
operator) took fresh zeroed pages each time and ran at half the speed. glibc offers no way
back to the dynamic mode once a threshold is set. A user's ``MALLOC_MMAP_THRESHOLD_`` is left
alone, and ``SPARSEMERGE_MMAP_THRESHOLD=dynamic`` keeps glibc's behaviour throughout.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from typing import Iterator

M_MMAP_THRESHOLD = -3  # glibc malloc.h
LOADING_THRESHOLD = 128 * 1024  # glibc's own starting value: every large temporary mmapped
RUNNING_THRESHOLD = 32 * 1024 * 1024  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: the heap serves the rest
ENV = "MALLOC_MMAP_THRESHOLD_"
OPT_OUT = "SPARSEMERGE_MMAP_THRESHOLD"  # "dynamic": leave glibc's dynamic threshold

_state: dict[str, object] = {"depth": 0}


def _libc():
    if "libc" not in _state:
        lib = None
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if not hasattr(lib, "mallopt") or not hasattr(lib, "gnu_get_libc_version"):
                lib = None  # not glibc (musl, macOS): their mallocs have no such threshold
        except OSError:
            lib = None
        _state["libc"] = lib
    return _state["libc"]


def _ours() -> bool:
    """Whether we may set the threshold: glibc, and the user has not chosen."""
    if os.environ.get(ENV) or os.environ.get(OPT_OUT, "").strip().lower() == "dynamic":
        return False
    return _libc() is not None


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap (returned on free), for
    the rest of the process. True when glibc took it; False where there is no glibc or the
    user's environment decides."""
    if nbytes < 0:
        raise ValueError(f"the mmap threshold must be >= 0 bytes, got {nbytes}")
    if not _ours():
        return False
    return bool(_libc().mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def trim() -> bool:
    """Give the heap's free top and free whole pages back to the system (glibc ``malloc_trim``)."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None and hasattr(lib, "malloc_trim") else False


@contextlib.contextmanager
def loading_heap() -> Iterator[None]:
    """Large temporaries mmapped while the block runs (nested blocks: the outermost decides),
    the running threshold and a trim after it (see the module docstring)."""
    outer = _state["depth"] == 0
    _state["depth"] = int(_state["depth"]) + 1  # type: ignore[call-overload]
    try:
        if outer:
            set_mmap_threshold(LOADING_THRESHOLD)
        yield
    finally:
        _state["depth"] = int(_state["depth"]) - 1  # type: ignore[call-overload]
        if outer and set_mmap_threshold(RUNNING_THRESHOLD):
            trim()
