"""Ranks of the entries of each row (0 = smallest), by LSD radix sort - DELLA's hot path.

DELLA (``ops.della_magprune``) gives every entry of a task vector a keep-probability that grows
with its magnitude rank inside its row. mergekit and torch rank with ``argsort`` (twice, in
mergekit); here the float32 magnitudes are ranked by a stable least-significant-digit radix
sort on their bit patterns: non-negative IEEE floats order like their bits read as unsigned
integers (NaN after +inf, as in torch's sort). Four 8-bit passes (a pass whose byte is equal in
the whole row is skipped), rows in parallel; ~5x faster than ``torch.argsort`` on 576-wide
rows here. Equal magnitudes are ranked by position (stable); ``argsort``'s order of ties is
unspecified, so the two differ only there - DELLA's draws are random anyway.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange


@njit(parallel=True, cache=True)
def _radix_row_ranks(keys, ranks):  # pragma: no cover - jitted
    rows, n = keys.shape
    for i in prange(rows):
        k = keys[i]
        idx = np.arange(n).astype(np.int32)
        tmp = np.empty(n, np.int32)
        count = np.empty(257, np.int32)
        for shift in range(0, 32, 8):
            count[:] = 0
            for j in range(n):
                count[((k[j] >> shift) & 255) + 1] += 1
            if count[1 + ((k[0] >> shift) & 255)] == n:
                continue  # every key shares this byte: the pass would move nothing
            for b in range(256):
                count[b + 1] += count[b]
            for j in range(n):  # stable scatter by this byte
                e = idx[j]
                b = (k[e] >> shift) & 255
                tmp[count[b]] = e
                count[b] += 1
            idx, tmp = tmp, idx
        out = ranks[i]
        for r in range(n):
            out[idx[r]] = r


def row_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """``(rows, n)`` non-negative CPU tensor -> int32 ranks ``0..n-1`` along each row
    (stable: equal values rank by position)."""
    if magnitudes.dim() != 2 or magnitudes.device.type != "cpu":
        raise ValueError("row_ranks takes a 2-D CPU tensor")
    keys = magnitudes.detach().float().contiguous().numpy().view(np.uint32)
    ranks = np.empty(keys.shape, np.int32)
    if keys.size:
        _radix_row_ranks(keys, ranks)
    return torch.from_numpy(ranks)
