"""Size calculator: exact bytes of every format for a weight shape and pattern, without a
model (chapter 10.2.2, 10.4.1; exercises 2, 4 and 7). The numbers equal ``nbytes`` of the
real formats (tested), assuming every kept slot holds a nonzero.

Sizes (``vb`` bytes per value, ``idx(x)`` bytes of the narrowest index dtype for values up
to ``x``, see :func:`sparsemerge.formats.bits.index_dtype`)::

    dense        rows * cols * vb
    coo          nnz * (idx(rows-1) + idx(cols-1) + vb)
    csr          (rows+1) * idx(nnz) + nnz * (idx(cols-1) + vb)
    bitmask      rows * ceil(cols/8) + nnz * vb
    bsr          (rows/b + 1) * idx(nb) + nb * idx(cols/b - 1) + nb * b*b * vb
    nm/<coding>  rows * cols*N/M * vb + ceil(rows * row_bits / 8)   (row_bits: nm_coding)
    ct 2:4       rows * cols/2 * vb + rows * ceil(cols/8) + 16      (compressed-tensors)
    + intB gG    values become rows * ceil(k*B/8) codes + rows * ceil(k/G) float32 scales
                 (k = stored values per row; symmetric, chapter 10.2.6:
                 compression ~ N/M * B/32 of fp32 before metadata and scales)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.bits import index_dtype
from sparsemerge.formats.nm_coding import CODINGS, coding_row_bits
from sparsemerge.patterns import NM, Block, Unstructured, parse_pattern


def _idx(max_value: int) -> int:
    return torch.empty(0, dtype=index_dtype(max_value)).element_size()


@dataclass
class PlanRow:
    format: str
    detail: str
    nbytes: int
    numel: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.numel, 1)

    def ratio(self, dense_bytes: int) -> float:
        """Dense bytes / these bytes (> 1 means smaller than dense)."""
        return dense_bytes / max(self.nbytes, 1)


def dense_nbytes(rows: int, cols: int, vb: int) -> int:
    return rows * cols * vb


def coo_nbytes(rows: int, cols: int, nnz: int, vb: int) -> int:
    return nnz * (_idx(max(rows - 1, 0)) + _idx(max(cols - 1, 0)) + vb)


def csr_nbytes(rows: int, cols: int, nnz: int, vb: int) -> int:
    return (rows + 1) * _idx(nnz) + nnz * (_idx(max(cols - 1, 0)) + vb)


def bitmask_nbytes(rows: int, cols: int, nnz: int, vb: int) -> int:
    return rows * math.ceil(cols / 8) + nnz * vb


def bsr_nbytes(rows: int, cols: int, block: int, nblocks: int, vb: int) -> int:
    return (rows // block + 1) * _idx(nblocks) + nblocks * _idx(max(cols // block - 1, 0)) + nblocks * block * block * vb


def nm_nbytes(rows: int, cols: int, n: int, m: int, coding: str, vb: int) -> int:
    row_bits = coding_row_bits(coding, n, m, cols // m)
    return rows * (cols * n // m) * vb + (rows * row_bits + 7) // 8


def ct_nbytes(rows: int, cols: int, vb: int) -> int:
    return rows * cols // 2 * vb + rows * math.ceil(cols / 8) + 16


def quantized_values_nbytes(rows: int, k: int, bits: int, group_size: int) -> int:
    """Codes plus float32 scales of :func:`sparsemerge.formats.quant.quantize` (symmetric)."""
    groups = 1 if group_size == 0 or k == 0 else math.ceil(k / group_size)
    return rows * math.ceil(k * bits / 8) + rows * groups * 4


def plan(
    shape: tuple[int, int],
    pattern: "str | NM | Block | Unstructured",
    value_bytes: int = 2,
    block: int = 16,
    quant_bits: "int | None" = None,
    group_size: int = 128,
) -> list[PlanRow]:
    """Bytes of each format for a ``shape`` weight pruned to ``pattern`` (``value_bytes`` per
    value); with ``quant_bits`` (4 or 8) also the N:M codings with quantized values."""
    rows, cols = (int(s) for s in shape)
    if rows <= 0 or cols <= 0:
        raise SparsemergeError(f"shape must be positive, got {rows}x{cols}")
    pattern = parse_pattern(pattern)
    numel = rows * cols
    vb = value_bytes
    out = [PlanRow("dense", f"{8 * vb}-bit values", dense_nbytes(rows, cols, vb), numel)]
    if isinstance(pattern, NM):
        if cols % pattern.m:
            raise SparsemergeError(f"N:M {pattern} needs cols divisible by {pattern.m}; got {cols}")
        nnz = numel * pattern.n // pattern.m
    elif isinstance(pattern, Block):
        nnz = numel - int(round(pattern.sparsity * (numel // (pattern.rows * pattern.cols)))) * pattern.rows * pattern.cols
    else:
        nnz = numel - int(round(pattern.sparsity * numel))
    out.append(PlanRow("coo", "row, col, value", coo_nbytes(rows, cols, nnz, vb), numel))
    out.append(PlanRow("csr", "indptr, col, value", csr_nbytes(rows, cols, nnz, vb), numel))
    out.append(PlanRow("bitmask", "1 bit/element + values", bitmask_nbytes(rows, cols, nnz, vb), numel))
    if isinstance(pattern, Block) and pattern.rows == pattern.cols and rows % pattern.rows == 0 and cols % pattern.cols == 0:
        nblocks = nnz // (pattern.rows * pattern.cols)
        out.append(PlanRow("bsr", f"{pattern.rows}x{pattern.rows} blocks", bsr_nbytes(rows, cols, pattern.rows, nblocks, vb), numel))
    elif rows % block == 0 and cols % block == 0 and not isinstance(pattern, Block):
        # N:M / unstructured zeros leave (almost) every block nonzero: BSR stores them all.
        nblocks = (rows // block) * (cols // block)
        out.append(PlanRow("bsr", f"{block}x{block} blocks, all nonzero", bsr_nbytes(rows, cols, block, nblocks, vb), numel))
    if isinstance(pattern, NM):
        n, m = pattern.n, pattern.m
        for coding in CODINGS:
            detail = {
                "bits2": f"{n}x{max(m - 1, 0).bit_length()} bits/group",
                "index": f"{max(math.comb(m, n) - 1, 0).bit_length()} bits/group",
                "entropy": f"~{math.log2(math.comb(m, n)):.3f} bits/group",
            }[coding]
            if coding == "entropy" and math.comb(m, n) >= 2**32:
                continue
            out.append(PlanRow(f"nm/{coding}", detail, nm_nbytes(rows, cols, n, m, coding, vb), numel))
        if (n, m) == (2, 4):
            out.append(PlanRow("ct 2:4", "compressed-tensors sparse-24-bitmask", ct_nbytes(rows, cols, vb), numel))
        if quant_bits is not None:
            if quant_bits not in (4, 8):
                raise SparsemergeError(f"quantized plans support 4 or 8 bits, got {quant_bits}")
            k = cols * n // m
            qbytes = quantized_values_nbytes(rows, k, quant_bits, group_size)
            for coding in CODINGS:
                if coding == "entropy" and math.comb(m, n) >= 2**32:
                    continue
                meta = (rows * coding_row_bits(coding, n, m, cols // m) + 7) // 8
                label = f"nm/{coding}+int{quant_bits}"
                detail = f"group {group_size or 'channel'}; N/M*B/32 = {n / m * quant_bits / 32:.4f} of fp32"
                out.append(PlanRow(label, detail, qbytes + meta, numel))
    return out


@dataclass
class Overhead:
    n: int
    m: int
    bits2: int  # bits per group, per-value positions
    index: int  # ceil(log2 C(M,N))
    entropy: float  # log2 C(M,N)

    @property
    def per_weight(self) -> dict[str, float]:
        return {"bits2": self.bits2 / self.m, "index": self.index / self.m, "entropy": self.entropy / self.m}


def nm_overheads(sparsity: float, max_m: int = 8) -> list[Overhead]:
    """Every N:M with ``1 - N/M == sparsity`` and ``M <= max_m``, with its index overhead."""
    target = Fraction(str(sparsity))
    out = []
    for m in range(2, max_m + 1):
        for n in range(1, m):
            if 1 - Fraction(n, m) == target:
                combos = math.comb(m, n)
                out.append(Overhead(n, m, n * (m - 1).bit_length(), (combos - 1).bit_length(), math.log2(combos)))
    return out


def overhead(pattern: "str | NM") -> Overhead:
    p = parse_pattern(pattern)
    if not isinstance(p, NM):
        raise SparsemergeError(f"index overhead is defined for N:M patterns, got {pattern!r}")
    combos = math.comb(p.m, p.n)
    return Overhead(p.n, p.m, p.n * (p.m - 1).bit_length(), (combos - 1).bit_length(), math.log2(combos))
