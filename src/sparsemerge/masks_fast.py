"""Numba kernel for N:M keep-masks on CPU (the hot path of every N:M pruning method).

One pass over the scores: for each group of M, rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}
and keep ``rank_i < N`` - the same rule (and tie-break) as the torch path in ``masks.py``,
which stays the reference. The loop is memory-bound: read M scores, write M bytes.
"""
from __future__ import annotations

import numba
import numpy as np
import torch


# Serial on purpose: a parallel region fights torch's spinning OpenMP workers for the
# same cores (timings varied 5x) and its start-up reset torch's thread count.
@numba.njit(cache=True, nogil=True)
def _nm_keep_kernel(scores: np.ndarray, n: int, m: int, keep: np.ndarray) -> None:  # pragma: no cover - jitted
    groups = scores.shape[0] // m
    for g in range(groups):
        base = g * m
        for i in range(m):
            si = scores[base + i]
            rank = 0
            for j in range(m):
                sj = scores[base + j]
                if sj > si or (sj == si and j < i):
                    rank += 1
            keep[base + i] = rank < n


@numba.njit(cache=True, nogil=True)
def _nm_keep_m4(scores: np.ndarray, n: int, keep: np.ndarray) -> None:  # pragma: no cover - jitted
    """M = 4 unrolled and branch-free (the generic loop mispredicts on random scores)."""
    for g in range(scores.shape[0] // 4):
        base = g * 4
        a, b, c, d = scores[base], scores[base + 1], scores[base + 2], scores[base + 3]
        keep[base] = (np.int8(b > a) + np.int8(c > a) + np.int8(d > a)) < n
        keep[base + 1] = (np.int8(a >= b) + np.int8(c > b) + np.int8(d > b)) < n
        keep[base + 2] = (np.int8(a >= c) + np.int8(b >= c) + np.int8(d > c)) < n
        keep[base + 3] = (np.int8(a >= d) + np.int8(b >= d) + np.int8(c >= d)) < n


def nm_keep_cpu(groups: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``groups``: any CPU float tensor whose numel is a multiple of ``m``; returns a bool mask."""
    flat = groups.detach().contiguous().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    keep = np.empty(flat.numel(), dtype=np.bool_)
    if m == 4:
        _nm_keep_m4(flat.numpy(), n, keep)
    else:
        _nm_keep_kernel(flat.numpy(), n, m, keep)
    return torch.from_numpy(keep).reshape(groups.shape)
