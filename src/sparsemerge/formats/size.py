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
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterator

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.bits import index_dtype
from sparsemerge.formats.nm_coding import CODINGS, ENTROPY_MAX_GROUPS_PER_ROW, coding_row_bits
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


@dataclass(frozen=True)
class PlanInput:
    """A weight ``rows x cols`` pruned to ``pattern`` with ``nnz`` nonzeros, ``value_bytes``
    per stored value; ``block``: the BSR block for patterns without blocks; ``quant_bits`` /
    ``group_size``: the quantized rows asked for (None: none)."""

    rows: int
    cols: int
    pattern: "NM | Block | Unstructured"
    nnz: int
    value_bytes: int
    block: int = 16
    quant_bits: "int | None" = None
    group_size: int = 128

    @property
    def numel(self) -> int:
        return self.rows * self.cols

    def row(self, format: str, detail: str, nbytes: int) -> PlanRow:
        return PlanRow(format, detail, nbytes, self.numel)


def plan(
    shape: tuple[int, int],
    pattern: "str | NM | Block | Unstructured",
    value_bytes: int = 2,
    block: int = 16,
    quant_bits: "int | None" = None,
    group_size: int = 128,
) -> list[PlanRow]:
    """Bytes of each format for a ``shape`` weight pruned to ``pattern`` (``value_bytes`` per
    value); with ``quant_bits`` (4 or 8) also the N:M codings with quantized values.

    Every registered format and pack layout gives its own rows (``plan_rows``, then
    ``plan_quant_rows``), ordered by its ``plan_order``: dense first."""
    from sparsemerge.formats.base import FORMATS, LAYOUTS

    rows, cols = (int(s) for s in shape)
    if rows <= 0 or cols <= 0:
        raise SparsemergeError(f"shape must be positive, got {rows}x{cols}")
    pattern = parse_pattern(pattern)
    numel = rows * cols
    if isinstance(pattern, NM):
        if cols % pattern.m:
            raise SparsemergeError(f"N:M {pattern} needs cols divisible by {pattern.m}; got {cols}")
        nnz = numel * pattern.n // pattern.m
        if quant_bits is not None and quant_bits not in (4, 8):
            raise SparsemergeError(f"quantized plans support 4 or 8 bits, got {quant_bits}")
    elif isinstance(pattern, Block):
        nnz = numel - int(round(pattern.sparsity * (numel // (pattern.rows * pattern.cols)))) * pattern.rows * pattern.cols
    else:
        nnz = numel - int(round(pattern.sparsity * numel))
    p = PlanInput(rows, cols, pattern, nnz, value_bytes, block, quant_bits, group_size)
    entries: list = [FORMATS.get(n) for n in FORMATS.names()] + [LAYOUTS.get(n) for n in LAYOUTS.names()]
    entries.sort(key=lambda e: (e.plan_order, e.name))
    out: list[PlanRow] = []
    for hook in ("plan_rows", "plan_quant_rows"):
        for entry in entries:
            fn = getattr(entry, hook, None)
            out.extend(fn(p) if fn is not None else [])
    return out


def nm_plan_rows(p: PlanInput) -> list[PlanRow]:
    """One row per N:M metadata coding (the entropy coding only while C(M,N) < 2**32)."""
    if not isinstance(p.pattern, NM):
        return []
    n, m = p.pattern.n, p.pattern.m
    out = []
    for coding in CODINGS:
        detail = {
            "bits2": f"{n}x{max(m - 1, 0).bit_length()} bits/group",
            "index": f"{max(math.comb(m, n) - 1, 0).bit_length()} bits/group",
            "entropy": f"~{math.log2(math.comb(m, n)):.3f} bits/group",
        }[coding]
        if coding == "entropy" and (math.comb(m, n) >= 2**32 or p.cols // m > ENTROPY_MAX_GROUPS_PER_ROW):
            continue
        out.append(p.row(f"nm/{coding}", detail, nm_nbytes(p.rows, p.cols, n, m, coding, p.value_bytes)))
    return out


def nm_quant_plan_rows(p: PlanInput) -> list[PlanRow]:
    """N:M codings with ``p.quant_bits``-bit codes and float32 scales per ``p.group_size`` values."""
    if not isinstance(p.pattern, NM) or p.quant_bits is None:
        return []
    n, m, bits = p.pattern.n, p.pattern.m, p.quant_bits
    qbytes = quantized_values_nbytes(p.rows, p.cols * n // m, bits, p.group_size)
    out = []
    for coding in CODINGS:
        if coding == "entropy" and (math.comb(m, n) >= 2**32 or p.cols // m > ENTROPY_MAX_GROUPS_PER_ROW):
            continue
        meta = (p.rows * coding_row_bits(coding, n, m, p.cols // m) + 7) // 8
        detail = f"group {p.group_size or 'channel'}; N/M*B/32 = {n / m * bits / 32:.4f} of fp32"
        out.append(p.row(f"nm/{coding}+int{bits}", detail, qbytes + meta))
    return out


def bsr_plan_rows(p: PlanInput) -> list[PlanRow]:
    """Square blocks of a block pattern; for other patterns every ``p.block`` block is stored
    (N:M / unstructured zeros leave almost every block nonzero)."""
    pattern, vb = p.pattern, p.value_bytes
    if isinstance(pattern, Block) and pattern.rows == pattern.cols and p.rows % pattern.rows == 0 and p.cols % pattern.cols == 0:
        nblocks = p.nnz // (pattern.rows * pattern.cols)
        return [p.row("bsr", f"{pattern.rows}x{pattern.rows} blocks", bsr_nbytes(p.rows, p.cols, pattern.rows, nblocks, vb))]
    if p.rows % p.block == 0 and p.cols % p.block == 0 and not isinstance(pattern, Block):
        nblocks = (p.rows // p.block) * (p.cols // p.block)
        return [p.row("bsr", f"{p.block}x{p.block} blocks, all nonzero", bsr_nbytes(p.rows, p.cols, p.block, nblocks, vb))]
    return []


MAX_PLAN_M = 64  # --max-m: N:M groups wider than this are not a storage format anyone uses
SPARSITY_TEXT = re.compile(r"^\s*0?\.\d+\s*$")


@dataclass
class PlanSection:
    """The plan of one pattern (``rows[0]`` is dense)."""

    pattern: str
    rows: list[PlanRow]


@dataclass
class SparsityChoices:
    """Every N:M with ``sparsity`` and ``M <= max_m``, with its index overhead."""

    sparsity: float
    max_m: int
    overheads: list["Overhead"]
    skipped: list[str] = field(default_factory=list)  # N:M whose M does not divide the columns


def storage_plan(
    shape: tuple[int, int],
    patterns: list[str],
    value_bytes: int = 2,
    max_m: int = 8,
    quant_bits: "int | None" = None,
    group_size: int = 128,
) -> "Iterator[PlanSection | SparsityChoices]":
    """``sparsemerge inspect --plan``, lazily in print order: for each text, a pattern (``2:4``,
    ``block16:0.5``, ``unstructured:0.5``) gives its :class:`PlanSection`; a sparsity
    (``0.75``) gives :class:`SparsityChoices` (every N:M reaching it with ``M <= max_m``), then
    the :class:`PlanSection` of each of those N:M."""
    if not 2 <= int(max_m) <= MAX_PLAN_M:
        raise SparsemergeError(f"--max-m must be between 2 and {MAX_PLAN_M}, got {max_m}")
    for text in patterns:
        if SPARSITY_TEXT.match(text):
            choices = SparsityChoices(float(text), max_m, nm_overheads(float(text), max_m))
            fitting = [o for o in choices.overheads if shape[1] % o.m == 0]
            choices.skipped = [f"{o.n}:{o.m}" for o in choices.overheads if o not in fitting]
            yield choices
            for o in fitting:
                yield PlanSection(f"{o.n}:{o.m}", plan(shape, f"{o.n}:{o.m}", value_bytes, quant_bits=quant_bits, group_size=group_size))
        else:
            yield PlanSection(text, plan(shape, text, value_bytes, quant_bits=quant_bits, group_size=group_size))


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
