"""The thread count every CPU kernel uses: numba's, kept equal to torch's."""
from __future__ import annotations

import numba
import torch

_threads = [0]
MIN_ROWS_PER_TASK = 128  # a batch-1 row kernel splits its rows only when each thread gets this many


def sync_threads() -> int:
    """Use as many numba threads as torch does (both default to the cores available); returns
    the count.

    numba's OpenMP threading layer shares libgomp with torch and starting its pool resets
    the OpenMP thread count, i.e. ``torch.get_num_threads()``: restore torch's setting.
    """
    torch_threads = torch.get_num_threads()
    want = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if _threads[0] != want:
        numba.set_num_threads(want)
        _threads[0] = want
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    return want


def row_tasks(rows: int) -> int:
    """How many row ranges a batch-1 row kernel splits ``rows`` into (after :func:`sync_threads`)."""
    t = _threads[0]
    return t if rows >= MIN_ROWS_PER_TASK * t else 1
