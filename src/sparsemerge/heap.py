"""Keeping glibc's heap from growing while a model is loaded and its decode plan is built.

Loading a packed checkpoint and preparing the runtime's weight streams make thousands of
temporary arrays of 0.1-10 MiB (decoded metadata, unblocked values, padded copies). glibc
serves an allocation above ``M_MMAP_THRESHOLD`` with its own ``mmap`` and returns it on free;
but the threshold is dynamic: each freed mmapped block raises it to that block's size (up to
32 MiB), so later temporaries come from the heap, where the free holes between long-lived
arrays are not returned to the system. Loading SmolLM2-135M 2:4 + INT4 and building its
decode engine holds ~140 MiB of arrays but grew the process by ~700 MiB with the dynamic
threshold (``benchmarks/bench_decode_memory.py``, BENCHMARKS.md "Decode memory").

:func:`fixed_mmap_threshold` fixes it (a glibc ``mallopt``; elsewhere a no-op that returns
False). It is process-wide and lasting, like ``MALLOC_MMAP_THRESHOLD_=131072`` in the
environment, which a user may set instead (then we leave it alone);
``SPARSEMERGE_MMAP_THRESHOLD=dynamic`` keeps glibc's behaviour. Decoding allocates nothing
per token, so the decode loop is unaffected; large temporaries of prompt processing then take
fresh pages from the system on every call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's own starting value
ENV = "MALLOC_MMAP_THRESHOLD_"
OPT_OUT = "SPARSEMERGE_MMAP_THRESHOLD"  # "dynamic": leave glibc's dynamic threshold

_state: dict[str, object] = {}


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


def fixed_mmap_threshold(nbytes: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation of ``nbytes`` or more with its own mmap, returned on free, for
    the rest of the process. True when glibc took it (or the user's environment already
    fixed the threshold); False where there is no glibc."""
    if nbytes < 0:
        raise ValueError(f"the mmap threshold must be >= 0 bytes, got {nbytes}")
    if os.environ.get(ENV):
        return True  # the user chose; glibc read it at start-up
    if os.environ.get(OPT_OUT, "").strip().lower() == "dynamic":
        return False
    if _state.get("threshold") == nbytes:
        return True
    lib = _libc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
    if ok:
        _state["threshold"] = nbytes
    return ok


def trim() -> bool:
    """Give the heap's free top and free whole pages back to the system (glibc ``malloc_trim``)."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None and hasattr(lib, "malloc_trim") else False
