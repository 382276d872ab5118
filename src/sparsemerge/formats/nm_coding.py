"""Position metadata codings for N:M groups (chapter 10.1.3, 10.2.2, exercise 7).

A group keeps exactly N of its M slots, at positions ``p_1 < ... < p_N``. Three codings:

``bits2`` (per-value positions, the hardware layout)
    each kept value's in-group position in ``ceil(log2 M)`` bits (2 bits for 2:4), so
    ``N * ceil(log2 M)`` bits per group (4 for 2:4).
``index`` (one combinatorial index per group)
    the group's rank in the combinatorial number system (colex order),
    ``r = sum_{i=1..N} C(p_i, i)`` in ``[0, C(M,N))``, stored in ``ceil(log2 C(M,N))`` bits
    (3 for 2:4: 6 combinations).
``entropy`` (row-level enumerative code)
    a row's G group ranks ``r_0 .. r_{G-1}`` read as one mixed-radix integer
    ``V = sum_j r_j * C(M,N)**j`` (``r_0`` least significant), stored in
    ``B = bitlength(C(M,N)**G - 1) = ceil(G * log2 C(M,N))`` bits: at most one bit per row
    above the entropy bound ``log2 C(M,N)`` bits per group (2.585 for 2:4). Coded with
    multi-limb integer arithmetic in numba, d digits at a time (D = C**d < 2**32, d = 12
    for 2:4): Horner steps ``V = V*D + c`` (encode) and long division by D (decode),
    O(G/d * B/32) limb operations per row.

All three are tensor-wide bitstreams (:mod:`sparsemerge.formats.bits` bit order) with a
fixed number of bits per row, so row ``i`` starts at bit ``i * row_bits``.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.bits import pack_codes, packed_nbytes, unpack_codes, width_for

CODINGS = ("bits2", "index", "entropy")
# Limb arithmetic keeps (limb * C + carry) within 64 bits: C must stay below 2**32.
ENTROPY_MAX_COMBINATIONS = 2**32 - 1


def binomial_table(m: int, n: int) -> torch.Tensor:
    """``T[p, i] = C(p, i)`` for ``p < m``, ``i <= n`` (int64)."""
    return torch.tensor([[math.comb(p, i) for i in range(n + 1)] for p in range(m)], dtype=torch.int64)


def rank_groups(positions: torch.Tensor, m: int) -> torch.Tensor:
    """Colex ranks ``r = sum_i C(p_i, i)`` of ascending positions ``(groups, n)`` -> int64."""
    n = positions.shape[1]
    pos = np.ascontiguousarray(positions.numpy().astype(np.uint8, copy=False))
    return torch.from_numpy(_rank(pos, binomial_table(m, n).numpy()))


def unrank_groups(ranks: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Inverse of :func:`rank_groups`: ascending positions ``(groups, n)`` uint8 (greedy:
    for i = n..1, p_i is the largest p with C(p, i) <= r, then r -= C(p_i, i))."""
    r = np.ascontiguousarray(ranks.numpy().astype(np.int64, copy=False))
    return torch.from_numpy(_unrank(r, n, m, binomial_table(m, n).numpy()))


def select_slots(nonzero: torch.Tensor, n: int) -> "tuple[torch.Tensor, int, int]":
    """Per group of M (rows of ``nonzero``): its N slots - the nonzeros, then the lowest-index
    zeros - ascending, uint8 ``(groups, n)``; plus the number of groups with more than N
    nonzeros and the first such group (-1 if none)."""
    mask = np.ascontiguousarray(nonzero.numpy())
    out = np.zeros((mask.shape[0], n), dtype=np.uint8)
    bad, first = _select(mask, n, out)
    return torch.from_numpy(out), int(bad), int(first)


@numba.njit(cache=True, nogil=True)
def _select(mask, n, out):  # pragma: no cover - compiled
    groups, m = mask.shape
    bad = 0
    first = -1
    for g in range(groups):
        count = 0
        for j in range(m):
            if mask[g, j]:
                count += 1
        if count > n:
            bad += 1
            if first < 0:
                first = g
            continue
        free = n - count  # lowest-index zeros fill the unused slots
        k = 0
        for j in range(m):
            if mask[g, j] or free > 0:
                if not mask[g, j]:
                    free -= 1
                out[g, k] = j
                k += 1
    return bad, first


@numba.njit(cache=True, nogil=True)
def _rank(pos, table):  # pragma: no cover - compiled
    groups, n = pos.shape
    out = np.zeros(groups, dtype=np.int64)
    for g in range(groups):
        r = 0
        for i in range(n):
            r += table[pos[g, i], i + 1]
        out[g] = r
    return out


@numba.njit(cache=True, nogil=True)
def _unrank(ranks, n, m, table):  # pragma: no cover - compiled
    groups = ranks.shape[0]
    out = np.zeros((groups, n), dtype=np.uint8)
    for g in range(groups):
        r = ranks[g]
        p = m - 1
        for i in range(n, 0, -1):
            while p > 0 and table[p, i] > r:
                p -= 1
            out[g, i - 1] = p
            r -= table[p, i]
            p -= 1
    return out


# A row's enumerative code is one integer below C**G; past this many groups per row (4M columns
# at 2:4, far wider than any weight) computing C**G alone takes seconds, and a corrupt manifest
# shape such as [1e12, 1e12] would hang on it.
ENTROPY_MAX_GROUPS_PER_ROW = 2**20


def entropy_row_bits(groups_per_row: int, combos: int) -> int:
    """``B = bitlength(C**G - 1)``: bits of one row's enumerative code."""
    if groups_per_row > ENTROPY_MAX_GROUPS_PER_ROW:
        raise SparsemergeError(
            f"entropy-coded N:M rows hold at most {ENTROPY_MAX_GROUPS_PER_ROW:,} groups, got {groups_per_row:,} "
            "(a corrupt shape, or use --metadata index for such wide rows)"
        )
    return (combos**groups_per_row - 1).bit_length() if groups_per_row else 0


def coding_row_bits(coding: str, n: int, m: int, groups_per_row: int) -> int:
    """Bits of metadata per row for ``coding``."""
    combos = math.comb(m, n)
    if coding == "bits2":
        return groups_per_row * n * width_for(m)
    if coding == "index":
        return groups_per_row * width_for(combos)
    if coding == "entropy":
        return entropy_row_bits(groups_per_row, combos)
    raise SparsemergeError(f"unknown N:M metadata coding {coding!r}; use one of {', '.join(CODINGS)}")


def encode_metadata(positions: torch.Tensor, coding: str, n: int, m: int, rows: int) -> torch.Tensor:
    """Positions ``(rows * G, n)`` (ascending per group) -> the coding's bitstream (uint8, 1-D)."""
    groups = positions.shape[0]
    gpr = groups // rows if rows else 0
    if coding == "bits2":
        return pack_codes(positions.reshape(-1), width_for(m))
    ranks = rank_groups(positions, m)
    combos = math.comb(m, n)
    if coding == "index":
        return pack_codes(ranks, width_for(combos))
    if coding == "entropy":
        _check_entropy(combos, n, m)
        row_bits = entropy_row_bits(gpr, combos)
        out = np.zeros(packed_nbytes(rows, row_bits), dtype=np.uint8)
        if groups:
            _entropy_encode(ranks.numpy().reshape(rows, gpr), np.uint64(combos), row_bits, out)
        return torch.from_numpy(out)
    raise SparsemergeError(f"unknown N:M metadata coding {coding!r}; use one of {', '.join(CODINGS)}")


def decode_metadata(stream: torch.Tensor, coding: str, n: int, m: int, rows: int, gpr: int, what: str = "tensor") -> torch.Tensor:
    """Bitstream -> positions ``(rows * gpr, n)`` uint8, validated (corrupt data raises)."""
    groups = rows * gpr
    combos = math.comb(m, n)
    if coding == "bits2":
        pos = torch.from_numpy(unpack_codes(stream, width_for(m), groups * n)).reshape(groups, n)
        if groups and (int(pos.max()) >= m or (n > 1 and bool((pos[:, 1:] <= pos[:, :-1]).any()))):
            raise SparsemergeError(
                f"{what}: N:M position metadata is invalid (positions must be ascending and < M={m}); corrupt file?"
            )
        return pos.to(torch.uint8)
    if coding == "index":
        ranks = torch.from_numpy(unpack_codes(stream, width_for(combos), groups))
    elif coding == "entropy":
        _check_entropy(combos, n, m)
        ranks_np = np.zeros((rows, gpr), dtype=np.int64)
        if groups:
            ok = _entropy_decode(stream.numpy(), np.uint64(combos), entropy_row_bits(gpr, combos), ranks_np)
            if not ok:
                raise SparsemergeError(f"{what}: entropy-coded N:M metadata is out of range (corrupt file?)")
        ranks = torch.from_numpy(ranks_np.reshape(-1))
    else:
        raise SparsemergeError(f"unknown N:M metadata coding {coding!r}; use one of {', '.join(CODINGS)}")
    if groups and int(ranks.max()) >= combos:
        raise SparsemergeError(f"{what}: N:M group index {int(ranks.max())} >= C({m},{n})={combos} (corrupt file?)")
    return unrank_groups(ranks, n, m)


def _check_entropy(combos: int, n: int, m: int) -> None:
    if combos > ENTROPY_MAX_COMBINATIONS:
        raise SparsemergeError(
            f"entropy coding supports C(M,N) < 2**32; C({m},{n}) = {combos} is larger - use --metadata index"
        )


def _chunk(combos: int) -> tuple[int, int]:
    """Digits per limb operation: the largest d with C**d < 2**32 (12 for C = 6), and C**d."""
    d = 1
    while combos ** (d + 1) < 2**32:
        d += 1
    return d, combos**d


@numba.njit(cache=True, nogil=True)
def _entropy_encode_kernel(ranks, combos, d, big, row_bits, out):  # pragma: no cover - compiled
    # V = sum_j r_j C^j = sum_i c_i D^i with D = C^d and c_i the i-th run of d digits;
    # Horner over the runs from the top: V = V * D + c_i.
    rows, groups = ranks.shape
    nlimbs = row_bits // 32 + 2
    limbs = np.zeros(nlimbs, dtype=np.uint64)
    mask = np.uint64(0xFFFFFFFF)
    nchunks = (groups + d - 1) // d
    for r in range(rows):
        limbs[:] = 0
        used = 1
        for ci in range(nchunks - 1, -1, -1):
            c = np.uint64(0)
            top = min(groups, (ci + 1) * d)
            for j in range(top - 1, ci * d - 1, -1):
                c = c * combos + np.uint64(ranks[r, j])
            carry = c
            for i in range(used):
                t = limbs[i] * big + carry
                limbs[i] = t & mask
                carry = t >> np.uint64(32)
            if carry != 0:
                limbs[used] = carry
                used += 1
        base = r * row_bits
        for b in range(row_bits):
            if (limbs[b >> 5] >> np.uint64(b & 31)) & np.uint64(1):
                pos = base + b
                out[pos >> 3] |= np.uint8(1 << (pos & 7))


@numba.njit(cache=True, nogil=True)
def _entropy_decode_kernel(stream, combos, d, big, row_bits, ranks):  # pragma: no cover - compiled
    rows, groups = ranks.shape
    nlimbs = row_bits // 32 + 2
    limbs = np.zeros(nlimbs, dtype=np.uint64)
    nchunks = (groups + d - 1) // d
    for r in range(rows):
        limbs[:] = 0
        base = r * row_bits
        for b in range(row_bits):
            pos = base + b
            if (stream[pos >> 3] >> (pos & 7)) & 1:
                limbs[b >> 5] |= np.uint64(1) << np.uint64(b & 31)
        used = nlimbs
        while used > 0 and limbs[used - 1] == 0:
            used -= 1
        for ci in range(nchunks):  # c = V mod D; V = V // D; then c's d digits
            rem = np.uint64(0)
            for i in range(used - 1, -1, -1):
                cur = (rem << np.uint64(32)) | limbs[i]
                limbs[i] = cur // big
                rem = cur % big
            while used > 0 and limbs[used - 1] == 0:
                used -= 1
            top = min(groups, (ci + 1) * d)
            for j in range(ci * d, top):
                ranks[r, j] = rem % combos
                rem = rem // combos
            if rem != 0:  # digits beyond G: not a valid code
                return False
        if used != 0:  # V >= C**G
            return False
    return True


def _entropy_encode(ranks: np.ndarray, combos: np.uint64, row_bits: int, out: np.ndarray) -> None:
    d, big = _chunk(int(combos))
    _entropy_encode_kernel(ranks, combos, d, np.uint64(big), row_bits, out)


def _entropy_decode(stream: np.ndarray, combos: np.uint64, row_bits: int, ranks: np.ndarray) -> bool:
    d, big = _chunk(int(combos))
    return bool(_entropy_decode_kernel(stream, combos, d, np.uint64(big), row_bits, ranks))
