"""Rank-window selection that picks tied entries exactly as torch's CPU sort does, in O(n).

Why: mergekit (0.1.5) trims task vectors with ``torch.argsort(w, descending=True)[:k]`` (TIES)
and ``torch.sort(w).indices[lo:hi]`` (breadcrumbs), ``w = |tau|`` flattened, float32 on CPU.
Task vectors are differences of low-precision weights, so they hold many exactly equal
magnitudes, and when equal values straddle a cut, which of them are kept depends on the tie
order of torch's (unstable) sort. A plain O(n) selection (``kthvalue``) cannot reproduce that;
a full O(n log n) sort can, but costs as much as mergekit itself.

What torch does (torch 2.13, CPU, ``stable=False``, float32): ``sort_kernel`` in
``aten/src/ATen/native/cpu/SortingKernel.cpp`` fills the indices with ``0..n-1`` and calls
``std::sort`` on a composite (value, index) iterator with a comparator on the value only:
``KeyValueCompDesc``: ``(isnan(a) && !isnan(b)) || a > b``, ``KeyValueCompAsc``:
``(!isnan(a) && isnan(b)) || a < b``. (The x86-simd-sort path in that file is not compiled
into the PyPI wheels, and fbgemm's radix sort is for integer types only.) This build's
``std::sort`` is libstdc++'s introsort (``bits/stl_algo.h``): ``__introsort_loop`` with
``_S_threshold = 16``, pivot by ``__move_median_to_first(first, first+1, mid, last-1)``,
``__unguarded_partition(first+1, last, first)``, a depth limit of ``2*floor(log2 n)`` after
which a segment is heap-sorted, then ``__final_insertion_sort`` over the whole range.

How: the set of elements that end in positions ``[lo, hi)`` is fixed by the partition steps
alone. Partitioning never moves an element across an earlier segment boundary, and the final
insertion sort is stable (strict comparisons) and never moves an element past an equal one or
out of its leaf segment (everything left of a boundary is <= everything right of it). So we
replay exactly the same pivot choices and swaps on a copy of the keys and an index array, but
descend only into segments that have a cut strictly inside (a quickselect: O(n) expected);
a leaf of <= 16 elements holding a cut is finished by a stable insertion sort, which is what
the final insertion sort does to it. If the depth limit is reached in a segment holding a cut
(heapsort there; rare), the kernel reports it and the caller sorts for real.
Descending order is the ascending replay on negated keys (``a > b`` iff ``-a < -b``; NaN-free
input only, NaN also falls back).
"""
from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch

_THRESHOLD = 16  # libstdc++ _S_threshold


@numba.njit(cache=True, nogil=True)
def _load_keys(src: np.ndarray, negate: bool, keys: np.ndarray, idx: np.ndarray) -> bool:  # pragma: no cover - jitted
    """keys = src or -src, idx = 0..n-1; False if src holds a NaN."""
    ok = True
    if negate:
        for i in range(src.shape[0]):
            x = src[i]
            ok &= x == x
            keys[i] = -x
            idx[i] = i
    else:
        for i in range(src.shape[0]):
            x = src[i]
            ok &= x == x
            keys[i] = x
            idx[i] = i
    return ok


@numba.njit(cache=True, nogil=True, inline="always")
def _swap(keys, idx, i, j):  # pragma: no cover - jitted
    keys[i], keys[j] = keys[j], keys[i]
    idx[i], idx[j] = idx[j], idx[i]


@numba.njit(cache=True, nogil=True)
def _partition_pivot(keys, idx, first, last):  # pragma: no cover - jitted
    """libstdc++ ``__unguarded_partition_pivot`` with ``comp = operator<``."""
    mid = first + (last - first) // 2
    a, b, c = first + 1, mid, last - 1
    if keys[a] < keys[b]:
        if keys[b] < keys[c]:
            _swap(keys, idx, first, b)
        elif keys[a] < keys[c]:
            _swap(keys, idx, first, c)
        else:
            _swap(keys, idx, first, a)
    elif keys[a] < keys[c]:
        _swap(keys, idx, first, a)
    elif keys[b] < keys[c]:
        _swap(keys, idx, first, c)
    else:
        _swap(keys, idx, first, b)
    pivot = keys[first]
    i, j = first + 1, last
    while True:
        while keys[i] < pivot:
            i += 1
        j -= 1
        while pivot < keys[j]:
            j -= 1
        if not i < j:
            return i
        _swap(keys, idx, i, j)
        i += 1


@numba.njit(cache=True, nogil=True)
def _stable_insertion_sort(keys, idx, first, last):  # pragma: no cover - jitted
    for i in range(first + 1, last):
        k, v = keys[i], idx[i]
        j = i
        while j > first and k < keys[j - 1]:
            keys[j] = keys[j - 1]
            idx[j] = idx[j - 1]
            j -= 1
        keys[j] = k
        idx[j] = v


@numba.njit(cache=True, nogil=True, inline="always")
def _holds_cut(first, last, lo, hi):  # pragma: no cover - jitted
    return (first < lo and lo < last) or (first < hi and hi < last)


@numba.njit(cache=True, nogil=True)
def _replay_select(keys: np.ndarray, idx: np.ndarray, lo: int, hi: int, depth_limit: int = -1) -> bool:  # pragma: no cover - jitted
    """Permute (keys, idx) in place so that positions [lo, hi) hold the elements libstdc++'s
    ``std::sort(comp=<)`` puts there. False if a segment holding a cut hit the depth limit
    (``2*floor(log2 n)`` as in libstdc++; ``depth_limit >= 0`` overrides it, for tests)."""
    n = keys.shape[0]
    if n < 2:
        return True
    depth0 = 0
    m = n
    while m > 1:  # std::__lg(n)
        m >>= 1
        depth0 += 1
    depth0 *= 2
    if depth_limit >= 0:
        depth0 = depth_limit
    # At most two disjoint segments hold a cut at any time; 64 is ample.
    s_first = np.empty(64, np.int64)
    s_last = np.empty(64, np.int64)
    s_depth = np.empty(64, np.int64)
    s_first[0], s_last[0], s_depth[0] = 0, n, depth0
    top = 1
    while top > 0:
        top -= 1
        first, last, depth = s_first[top], s_last[top], s_depth[top]
        while _holds_cut(first, last, lo, hi):
            if last - first <= _THRESHOLD:
                _stable_insertion_sort(keys, idx, first, last)
                break
            if depth == 0:
                return False  # libstdc++ heap-sorts this segment: tie order not replayed
            depth -= 1
            cut = _partition_pivot(keys, idx, first, last)
            if _holds_cut(cut, last, lo, hi):  # __introsort_loop(cut, last, depth)
                s_first[top], s_last[top], s_depth[top] = cut, last, depth
                top += 1
            last = cut  # then loops on [first, cut)
    return True


@numba.njit(cache=True, nogil=True)
def _mark(idx: np.ndarray, lo: int, hi: int, mask: np.ndarray) -> None:  # pragma: no cover - jitted
    for p in range(lo, hi):
        mask[idx[p]] = True


def sort_window_mask(flat: torch.Tensor, lo: int, hi: int, descending: bool) -> Optional[torch.Tensor]:
    """Bool mask of the entries that ``torch.sort(flat, descending=descending)`` (stable=False,
    torch's CPU kernel) puts in positions ``[lo, hi)``; ``flat`` is a 1-D float32 CPU tensor.

    None when the replay cannot decide it (NaN in ``flat``, or libstdc++'s depth limit reached
    in a segment holding a cut); the caller then sorts for real."""
    if flat.dim() != 1 or flat.dtype != torch.float32 or flat.device.type != "cpu":
        raise ValueError("sort_window_mask needs a 1-D float32 CPU tensor")
    n = flat.numel()
    lo, hi = max(0, lo), min(n, hi)
    mask = np.zeros(n, dtype=np.bool_)
    if hi <= lo:
        return torch.from_numpy(mask)
    if lo == 0 and hi == n:
        mask[:] = True
        return torch.from_numpy(mask)
    src = flat.detach().contiguous().numpy()
    keys = np.empty(n, dtype=np.float32)
    idx = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    if not _load_keys(src, descending, keys, idx):
        return None
    if not _replay_select(keys, idx, lo, hi):
        return None
    _mark(idx, lo, hi, mask)
    return torch.from_numpy(mask)


@numba.njit(cache=True, nogil=True)
def _negate_checked(keys: np.ndarray) -> bool:  # pragma: no cover - jitted
    """keys = -keys in place; False if they hold a NaN."""
    ok = True
    for i in range(keys.shape[0]):
        x = keys[i]
        ok &= x == x
        keys[i] = -x
    return ok


@numba.njit(cache=True, nogil=True)
def _has_nan(keys: np.ndarray) -> bool:  # pragma: no cover - jitted
    for i in range(keys.shape[0]):
        if keys[i] != keys[i]:
            return True
    return False


@numba.njit(cache=True, nogil=True)
def _iota(idx: np.ndarray) -> None:  # pragma: no cover - jitted
    for i in range(idx.shape[0]):
        idx[i] = i


@numba.njit(cache=True, nogil=True)
def _mark_bits(idx: np.ndarray, lo: int, hi: int, bits: np.ndarray) -> None:  # pragma: no cover - jitted
    for p in range(lo, hi):
        j = idx[p]
        bits[j >> 3] |= np.uint8(1 << (j & 7))


def sort_window_bits(keys: np.ndarray, lo: int, hi: int, descending: bool) -> Optional[np.ndarray]:
    """:func:`sort_window_mask` on a float32 buffer the caller hands over (it is overwritten),
    as packed bits (``np.unpackbits(bits, bitorder="little")[:n]`` is the mask): 4 bytes of
    index per entry beside the keys and n/8 for the result - the least memory the replay
    needs, for tensors that are merged in row blocks (merge/memory.py). None where
    :func:`sort_window_mask` would be (NaN, depth limit)."""
    if keys.ndim != 1 or keys.dtype != np.float32 or not keys.flags.writeable:
        raise ValueError("sort_window_bits needs a writable 1-D float32 array")
    n = keys.shape[0]
    lo, hi = max(0, lo), min(n, hi)
    bits = np.zeros((n + 7) // 8, dtype=np.uint8)
    if hi <= lo:
        return bits
    if descending:
        if not _negate_checked(keys):
            return None
    elif _has_nan(keys):
        return None
    if lo == 0 and hi == n:
        bits[:] = 0xFF
        return bits
    idx = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    _iota(idx)
    if not _replay_select(keys, idx, lo, hi):
        return None
    _mark_bits(idx, lo, hi, bits)
    return bits

