"""heap.py: with the mmap threshold fixed, a large temporary gets its own mapping
(returned to the system on free) even after glibc's dynamic threshold would have risen; with
the dynamic threshold it comes from the heap. Counted with glibc's ``mallinfo2().hblks`` (the
number of mmapped blocks), in a fresh interpreter per case (the setting is process-wide)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from sparsemerge import heap

PROBE = textwrap.dedent("""
    import ctypes, sys
    from sparsemerge.heap import loading_heap
    libc = ctypes.CDLL("libc.so.6")
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def mapped_2mib():
        before = libc.mallinfo2().hblks
        p = libc.malloc(2 << 20)  # a 2 MiB temporary
        n = libc.mallinfo2().hblks - before
        libc.free(p)
        return n
    libc.free(libc.malloc(8 << 20))  # dynamic threshold: rises to 8 MiB here
    if sys.argv[1] == "loading":
        with loading_heap():
            with loading_heap():  # nested: the outer block decides
                pass
            inside = mapped_2mib()
        print(inside, mapped_2mib())
    else:
        print(mapped_2mib(), mapped_2mib())
""")


def _new_mappings(mode: str) -> "tuple[int, int]":
    env = {k: v for k, v in os.environ.items() if k not in (heap.ENV, heap.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    inside, after = out.stdout.strip().splitlines()[-1].split()
    return int(inside), int(after)


@pytest.mark.skipif(heap._libc() is None or not hasattr(heap._libc(), "mallinfo2"), reason="needs glibc >= 2.33")
def test_loading_heap_maps_large_temporaries_and_then_lets_the_heap_serve_them():
    assert _new_mappings("dynamic") == (0, 0)  # from the heap: its pages stay with the process after free
    assert _new_mappings("loading") == (1, 0)  # inside: its own mmap, munmapped on free; after: the heap


def test_the_users_choice_is_left_alone(monkeypatch):
    monkeypatch.delenv(heap.ENV, raising=False)
    monkeypatch.setenv(heap.OPT_OUT, "dynamic")
    assert heap.set_mmap_threshold(heap.LOADING_THRESHOLD) is False
    monkeypatch.delenv(heap.OPT_OUT)
    monkeypatch.setenv(heap.ENV, "65536")
    assert heap.set_mmap_threshold(heap.LOADING_THRESHOLD) is False


def test_threshold_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        heap.set_mmap_threshold(-1)
