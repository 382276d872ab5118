"""Memory: resident set size now and at its peak (Linux ``/proc``), and the peak of a
workload measured in a fresh process, so that nothing this process already holds (other
models, allocator caches, compiled kernels) is counted or hidden.

``peak_memory(fn, args)`` spawns a process (nothing inherited), imports the heavy modules,
reads the resident memory (the baseline), runs ``fn(*args)`` and reads ``VmHWM``, the
high-water mark of resident memory: the workload costs ``peak - baseline``.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

# Imported in the fresh process before the baseline: what every run pays before its own work.
BASELINE_IMPORTS = ("torch", "transformers", "sparsemerge.kernels.model")


def rss_bytes() -> int:
    """Resident memory of this process now (``/proc/self/statm``); 0 where there is no ``/proc``."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak resident memory); 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (``VmHWM``); 0 where there is no ``/proc``."""
    return status_kib("VmHWM") * 1024


def _child(fn: Callable[..., Any], args: Sequence[Any], imports: Sequence[str], queue: Any) -> None:
    try:
        import importlib

        for name in imports:  # measured as part of the baseline
            importlib.import_module(name)
        base = rss_bytes()
        fn(*args)
        queue.put((base, peak_rss_bytes()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it
        queue.put(repr(exc))


def peak_memory(fn: Callable[..., Any], args: Sequence[Any] = (), imports: Sequence[str] = BASELINE_IMPORTS,
                timeout: float = 1800) -> "tuple[int, int] | str":
    """``(resident bytes after imports, peak resident bytes)`` of running ``fn(*args)`` in a
    fresh (spawned) process, or why not (a string). ``fn`` must be a module-level function and
    ``args`` picklable."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, tuple(args), tuple(imports), queue))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - queue.Empty or a dead child
        result = f"no result ({exc!r})"
    proc.join(timeout=60)
    return result
