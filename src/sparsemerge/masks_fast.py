"""Numba kernel for N:M keep-masks on CPU (the hot path of every N:M pruning method).

One pass over the scores: for each group of M, rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}
and keep ``rank_i < N`` - the same rule (and tie-break) as the torch path in ``masks.py``,
which stays the reference. The loop is memory-bound: read M scores, write M bytes.
"""
from __future__ import annotations

import numba
import numpy as np
import torch


@numba.njit(parallel=True, cache=True, nogil=True)
def _nm_keep_kernel(scores: np.ndarray, n: int, m: int, keep: np.ndarray) -> None:  # pragma: no cover - jitted
    groups = scores.shape[0] // m
    for g in numba.prange(groups):
        base = g * m
        for i in range(m):
            si = scores[base + i]
            rank = 0
            for j in range(m):
                sj = scores[base + j]
                if sj > si or (sj == si and j < i):
                    rank += 1
            keep[base + i] = rank < n


def nm_keep_cpu(groups: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``groups``: any CPU float tensor whose numel is a multiple of ``m``; returns a bool mask."""
    flat = groups.detach().contiguous().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    keep = np.empty(flat.numel(), dtype=np.bool_)
    threads = torch.get_num_threads()  # numba's OpenMP pool start-up can reset torch's count
    _nm_keep_kernel(flat.numpy(), n, m, keep)
    torch.set_num_threads(threads)
    return torch.from_numpy(keep).reshape(groups.shape)
